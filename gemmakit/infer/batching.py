"""Continuous batching: many requests share one model, joining and leaving at token boundaries.

Where it sits: over `model` and `infer.slots.SlotCache`, under `server` (which turns HTTP requests
into `Request`s and `Event`s back into SSE chunks). One worker thread owns the model and the cache;
`submit` only queues. Each loop turn the worker (1) drops cancelled and timed-out requests, (2) admits
waiting requests into free rows (up to MAX_PREFILL_ROWS at a time), reusing a finished request's row
when its tokens start the same way (the next turn of a chat), (3) feeds the next prompt chunk of every
request being admitted in one left-padded forward (at most PREFILL_BUDGET tokens: a burst of 16
arrivals is prefilled together, not one after another), and (4) decodes one token for every row
already generating, in one batched forward. A long prompt therefore delays the others by one chunk
per step, not by its whole prefill.

Each request samples with its own parameters and its own seeded generator, so its tokens do not
depend on which requests it shares a batch with, except through float rounding: a row's logits in a
batch of 4 differ from the same row alone by ~1e-6 (different matmul blocking), which can flip a
greedy tie or a sampled draw on a probability boundary. Greedy tokens equal `Engine.generate` in the
tests.

Key trade-off: one decode forward over every generating row per step (throughput grows with the
batch almost for free on a memory-bound CPU, since the weights are read once per step) against
per-row Python work for sampling and bookkeeping (~0.1 ms a row; a 262k-vocabulary argmax is ~0.4 ms).
A failed forward fails only the requests in it: they get a `Failed` event, their rows are emptied,
the worker goes on, and `healthy` is False until a forward succeeds again. Any other error stops the
worker: every queued and running request gets `Failed`, `dead` says why, new ones are `Busy`, and
`on_death` tells the owner (the server exits so its supervisor restarts it).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from gemmakit.errors import GemmakitError
from gemmakit.infer.engine import GenerationError, compute_dtype
from gemmakit.infer.sampler import GREEDY_BELOW, SamplingError, ScoreProcessor, check_sampling_args, sample
from gemmakit.infer.slots import SlotCache

logger = logging.getLogger(__name__)


MAX_PREFILL_ROWS = 16  # requests admitted and prefilled together
PREFILL_BUDGET = 1024  # prompt tokens fed per step over all prefilling rows (llama.cpp: 512 per ubatch)


class Busy(GemmakitError):
    """The queue is full or the batcher is shutting down; the caller should retry later (HTTP 429/503)."""


@dataclass(frozen=True)
class Token:
    """One generated token; with `Request.logprobs` set, its log-probability and the top alternatives."""

    id: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] | None = None  # (id, log-prob), most likely first


@dataclass(frozen=True)
class Finished:
    """The request ended: reason is "stop" (a stop token), "length" (max tokens or the deadline),
    or "cancelled"."""

    reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens whose keys were reused from an earlier request's row


@dataclass(frozen=True)
class Failed:
    """The request failed inside the engine; `message` is for logs, not for clients."""

    message: str


Event = Token | Finished | Failed


@dataclass(eq=False)
class Request:
    """What to generate; `on_event` is called from the worker thread, in order, ending with Finished or
    Failed. Keep it fast (hand the event to another thread's queue)."""

    prompt: list[int]
    max_new_tokens: int
    on_event: Callable[[Event], None]
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_tokens: frozenset[int] = frozenset()
    logprobs: int | None = None  # None: no log-probs; k >= 0: the chosen token's and the top k
    logit_bias: dict[int, float] | None = None  # added to the logits before sampling (OpenAI semantics)
    processor: ScoreProcessor | None = None  # e.g. a SynthID watermark; a fresh one per request
    # before top-k / top-p, unlike `processor`: a grammar's mask of the tokens allowed next, so the
    # filters choose among allowed tokens (after them, top_p=1e-9 keeps one token the mask may forbid)
    mask: ScoreProcessor | None = None
    deadline: float | None = None  # time.monotonic() after which it ends with reason "length"
    cancelled: bool = field(default=False, init=False)

    def cancel(self) -> None:
        """Stop generating at the next token boundary (the row is freed; Finished("cancelled") follows)."""
        self.cancelled = True


@dataclass(eq=False)
class _Seq:
    request: Request
    generator: torch.Generator
    pending: list[int]  # prompt tokens still to prefill
    cached: int  # prompt tokens reused from the row
    last: int = -1  # sampled, not yet fed
    generated: int = 0


class Batcher:
    """Serve `Request`s from one model with `n_slots` rows of `max_len` tokens each (a thread)."""

    def __init__(self, model: nn.Module, n_slots: int = 4, max_len: int | None = None, queue_limit: int = 64,
                 prefill_chunk: int = 256, on_death: Callable[[], None] | None = None) -> None:  # fmt: skip
        cfg = model.config
        max_len = max_len or cfg.max_seq_len
        for name, value in (("n_slots", n_slots), ("max_len", max_len), ("queue_limit", queue_limit),
                            ("prefill_chunk", prefill_chunk)):  # fmt: skip
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < (0 if name == "queue_limit" else 1)
            ):
                raise GenerationError(f"{name}: expected a positive integer, got {value!r}")
        if max_len > cfg.max_seq_len:
            raise GenerationError(f"max_len: {max_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
        self.model, self.config, self.max_len = model, cfg, max_len
        self.queue_limit, self.prefill_chunk = queue_limit, prefill_chunk
        self.device = next(model.parameters()).device
        self.cache = SlotCache(cfg, n_slots, max_len, dtype=compute_dtype(model), device=self.device)
        self._rows: list[_Seq | None] = [None] * n_slots  # decoding rows first, then the one prefilling
        self._ids: list[list[int]] = [[] for _ in range(n_slots)]  # the tokens each row's keys belong to
        self._used = [0.0] * n_slots  # when each row last served, for evicting the stalest finished row
        self._active = 0  # rows [0, active) are generating
        self._prefilling = 0  # rows [active, active + prefilling) are being fed their prompts
        self._waiting: collections.deque[Request] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self.healthy = True
        self.dead: str | None = None  # why the worker stopped, if it stopped on an unexpected error
        self._on_death = on_death  # called (from the worker) after it failed every request
        self.counters = collections.Counter()
        self.step_seconds = {
            "prefill": 0.0,
            "decode": 0.0,
        }  # worker time per kind of step, for /metrics  # requests, prompt/generated/cached tokens, failures
        self._thread = threading.Thread(target=self._run, name="gemmakit-batcher", daemon=True)
        self._thread.start()

    # ---- the callers' side ------------------------------------------------------------------------
    def submit(self, request: Request) -> Request:
        """Queue a request (validated first: GenerationError); Busy when the queue is full or closing."""
        self.check(request)
        with self._cond:
            if self.dead is not None:
                raise Busy("the engine stopped")
            if self._stopping:
                raise Busy("the server is shutting down")
            # the queue is what waits beyond the free rows: a burst into an idle server fills its rows
            # before the worker's next turn admits them, and must not be refused for it
            free = max(0, self.cache.n_slots - self.running)
            if len(self._waiting) - free >= self.queue_limit:
                raise Busy(f"the queue is full ({self.queue_limit} requests waiting)")
            self._waiting.append(request)
            self.counters["requests"] += 1
            self._cond.notify()
        return request

    def check(self, r: Request) -> None:
        """Raise GenerationError naming the field if `r` cannot be served."""
        vocab = self.config.vocab_size
        if not r.prompt:
            raise GenerationError("prompt: expected at least one token")
        bad = [t for t in r.prompt if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise GenerationError(f"prompt: token ids must be integers in [0, {vocab}), got {bad[0]!r}")
        if (
            isinstance(r.max_new_tokens, bool)
            or not isinstance(r.max_new_tokens, int)
            or r.max_new_tokens < 1
        ):
            raise GenerationError(f"max_new_tokens: expected an integer >= 1, got {r.max_new_tokens!r}")
        if len(r.prompt) + r.max_new_tokens > self.max_len:
            raise GenerationError(
                f"prompt of {len(r.prompt)} tokens + max_new_tokens {r.max_new_tokens} = "
                f"{len(r.prompt) + r.max_new_tokens} exceeds the context size {self.max_len}"
            )
        try:
            check_sampling_args(r.temperature, r.top_k, r.top_p)
        except SamplingError as e:
            raise GenerationError(str(e)) from None
        if r.logit_bias and any(not 0 <= t < vocab for t in r.logit_bias):
            raise GenerationError(f"logit_bias: token ids must be in [0, {vocab})")

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return self._active + self._prefilling

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, drain_s: float = 0.0) -> None:
        """Refuse new requests, let running and queued ones finish for up to `drain_s` seconds, cancel
        the rest, and stop the worker."""
        deadline = time.monotonic() + drain_s
        with self._cond:
            self._stopping = True
            self._cond.notify()
        while time.monotonic() < deadline and (self.running or self._waiting):
            time.sleep(0.01)
        with self._cond:
            for r in list(self._waiting) + [s.request for s in self._rows if s is not None]:
                r.cancel()
            self._cond.notify()
        self._thread.join(timeout=10)

    # ---- the worker -------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # a bug outside the per-forward handler: nobody may wait forever
            logger.critical("the batcher's worker stopped", exc_info=True)
            with self._cond:
                self.dead, self.healthy = f"{type(e).__name__}: {e}", False
                pending = list(self._waiting) + [s.request for s in self._rows if s is not None]
                self._waiting.clear()
            for r in pending:
                self._emit(r, Failed(f"the worker stopped: {self.dead}"))
            if self._on_death is not None:
                self._on_death()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._waiting or self.running or self._stopping):
                    self._cond.wait()
                if self._stopping and not (self._waiting or self.running):
                    return
            self._reap()
            while self.running < self.cache.n_slots and self._prefilling < MAX_PREFILL_ROWS:
                with self._cond:
                    request = self._waiting.popleft() if self._waiting else None
                if request is None:
                    break
                self._admit(request)
            if self._prefilling:
                t0 = time.perf_counter()
                self._prefill_step()
                self.step_seconds["prefill"] += time.perf_counter() - t0
                self.counters["prefill_steps"] += 1
            if self._active:
                t0 = time.perf_counter()
                self._decode()
                self.step_seconds["decode"] += time.perf_counter() - t0  # forward + sampling + emits
                self.counters["decode_steps"] += 1

    def _reap(self) -> None:
        """End cancelled or timed-out requests (queued or running)."""
        now = time.monotonic()
        with self._cond:
            for r in [
                r for r in self._waiting if r.cancelled or (r.deadline is not None and now > r.deadline)
            ]:
                self._waiting.remove(r)
                self._emit(r, Finished("cancelled" if r.cancelled else "length", len(r.prompt), 0, 0))
        for row in reversed(range(self._active)):
            seq = self._rows[row]
            if seq.request.cancelled:
                self._release(row, "cancelled")
            elif seq.request.deadline is not None and now > seq.request.deadline:
                self._release(row, "length")
        for row in reversed(range(self._active, self.running)):
            seq = self._rows[row]
            if seq.request.cancelled or (seq.request.deadline or now + 1) < now:
                self._drop_prefilling(row, Finished("cancelled" if seq.request.cancelled else "length",
                                                    len(seq.request.prompt), 0, seq.cached))  # fmt: skip

    def _emit(self, r: Request, event: Event) -> None:
        try:
            r.on_event(event)
        except Exception:  # a broken consumer must not stop the worker
            logger.exception("on_event raised; cancelling the request")
            r.cancel()

    def _admit(self, r: Request) -> None:
        """Put `r` into the first free row (after the generating and prefilling ones), taking the keys of
        the free row whose tokens share the longest prefix with it."""
        at = self.running
        best, best_keep = at, -1
        for row in range(at, self.cache.n_slots):
            ids = self._ids[row]
            n = 0
            limit = min(len(ids), len(r.prompt) - 1)  # the last prompt token is always fed: its logits
            while n < limit and ids[n] == r.prompt[n]:
                n += 1
            keep = n if self.cache.keepable(row, n) else 0
            # longest reuse first; then an empty row; then the row unused for the longest time
            if (keep, not ids, -self._used[row]) > (best_keep, not self._ids[best], -self._used[best]):
                best, best_keep = row, keep
        self._swap(best, at)
        self.cache.truncate(at, best_keep)
        self._ids[at] = self._ids[at][:best_keep]
        generator = torch.Generator(device=self.device)
        if r.seed is not None:
            generator.manual_seed(r.seed)
        else:
            generator.seed()
        self._rows[at] = _Seq(r, generator, r.prompt[best_keep:], best_keep)
        self._prefilling += 1
        self.counters["cached_tokens"] += best_keep

    def _prefill_step(self) -> None:
        """Feed the next prompt chunk of every prefilling row (up to PREFILL_BUDGET tokens in all) in one
        left-padded forward; rows whose prompt is complete sample their first token and join the
        generating rows."""
        first, budget, picked = self._active, PREFILL_BUDGET, []
        for row in range(first, self.running):
            pending = self._rows[row].pending
            take = min(len(pending), self.prefill_chunk, budget)
            if take == 0:
                break
            picked.append(pending[:take])
            budget -= take
        width = max(len(c) for c in picked)
        tokens = [[0] * (width - len(c)) + c for c in picked]  # the padding id is irrelevant: position -1
        positions = [[-1] * (width - len(c)) + list(range(self.cache.lengths[first + j], self.cache.lengths[first + j] + len(c)))
                     for j, c in enumerate(picked)]  # fmt: skip
        logits = self._forward(first, first + len(picked), tokens, positions, [len(c) for c in picked])
        if isinstance(logits, str):
            for j in reversed(range(len(picked))):
                self._drop_prefilling(first + j, Failed(f"prefill failed: {logits}"))
            return
        done = []
        for j, chunk in enumerate(picked):
            seq = self._rows[first + j]
            seq.pending = seq.pending[len(chunk) :]
            self._ids[first + j] += chunk
            self.counters["prompt_tokens"] += len(chunk)
            if not seq.pending:
                done.append((seq, logits[j : j + 1]))
        for seq, row_logits in done:  # each joins the generating rows: row `active`, then active += 1
            self._swap(self._rows.index(seq), self._active)
            self._active += 1
            self._prefilling -= 1
            seq.last = seq.request.prompt[-1]
            self._sample_and_emit(self._active - 1, row_logits)

    def _forward(
        self,
        start: int,
        stop: int,
        tokens: list[list[int]],
        positions: list[list[int]],
        valid: list[int] | None = None,
    ) -> torch.Tensor | str:
        """One model call on cache rows [start, stop): the last column's logits (B, V), or the error as
        text if it raised (logged and counted; `healthy` says whether the last call succeeded)."""
        try:
            self.cache.bind(start, stop, valid)
            with torch.inference_mode():
                t = torch.tensor(tokens, device=self.device)
                p = torch.tensor(positions, device=self.device)
                logits = self.model(t, p, cache=self.cache, last_only=True)[:, -1]
        except Exception as e:
            logger.exception("forward pass failed")
            self.healthy = False
            self.counters["failures"] += 1
            return f"{type(e).__name__}: {e}"
        self.healthy = True
        return logits

    def _drop_prefilling(self, row: int, event: Event) -> None:
        """End the prefilling request in `row`; its row becomes a free, empty one."""
        last = self.running - 1
        self._swap(row, last)  # the prefilling rows stay contiguous
        seq, row = self._rows[last], last
        self._prefilling -= 1
        self._rows[row] = None
        self.cache.truncate(row, 0)
        self._ids[row] = []
        self._emit(seq.request, event)

    def _decode(self) -> None:
        n = self._active
        seqs = self._rows[:n]
        logits = self._forward(0, n, [[s.last] for s in seqs], [[self.cache.lengths[r]] for r in range(n)])
        if isinstance(logits, str):
            for row in reversed(range(n)):
                self._release(row, None, Failed(f"decode failed: {logits}"))
            return
        for row, s in enumerate(seqs):
            self._ids[row].append(s.last)
        # plain greedy rows take one batched argmax instead of one call each (~0.4 ms a row at a
        # 262k vocabulary: 6 ms a step at 16 rows)
        plain = [row for row, s in enumerate(seqs) if _plain_greedy(s.request)]
        best = {}
        if len(plain) > 1:
            with torch.inference_mode():
                scores = logits[plain].float()  # float32 + bias, as the one-row path adds it
                for i, row in enumerate(plain):
                    bias = seqs[row].request.logit_bias
                    if bias:
                        scores[i, list(bias)] += torch.tensor(list(bias.values()), device=scores.device)
                best = dict(zip(plain, scores.argmax(-1).tolist(), strict=True))
        for row in reversed(range(n)):  # reversed: releasing a row moves only rows after it
            self._sample_and_emit(row, logits[row : row + 1], best.get(row))

    def _sample_and_emit(self, row: int, logits: torch.Tensor, greedy: int | None = None) -> None:
        """Sample row's next token from its (1, V) logits (or take `greedy`, its argmax computed in a
        batch), emit it, and end the request if it is done."""
        seq = self._rows[row]
        r = seq.request
        if greedy is not None:
            self._emit_token(row, greedy, Token(greedy))
            return
        try:
            with torch.inference_mode():
                if r.logit_bias:
                    logits = logits.float().clone()
                    for t, b in r.logit_bias.items():
                        logits[0, t] += b
                last = torch.tensor([seq.last], device=self.device)
                scores = logits if r.mask is None else r.mask(last, logits.float())
                tok = int(
                    sample(scores, r.temperature, r.top_k, r.top_p, seq.generator, r.processor, last)[0]
                )
                event = Token(tok)
                if r.logprobs is not None:
                    logp = torch.log_softmax(logits[0].float(), dim=-1)
                    top = ()
                    if r.logprobs:
                        values, ids = torch.topk(logp, min(r.logprobs, logp.numel()))
                        top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
                    event = Token(tok, float(logp[tok]), top)
        except Exception as e:
            logger.exception("sampling failed")
            self._release(row, None, Failed(f"sampling failed: {type(e).__name__}: {e}"))
            return
        self._emit_token(row, tok, event)

    def _emit_token(self, row: int, tok: int, event: Token) -> None:
        seq = self._rows[row]
        r = seq.request
        if tok in r.stop_tokens:  # not emitted and not counted as a completion token
            self._release(row, "stop")
            return
        seq.generated += 1
        self.counters["generated_tokens"] += 1
        seq.last = tok
        self._emit(r, event)
        if seq.generated >= r.max_new_tokens:
            self._release(row, "length")

    def _release(self, row: int, reason: str | None, event: Event | None = None) -> None:
        """End the generating request in `row`; its row joins the finished ones (keys kept on success)."""
        seq = self._rows[row]
        r = seq.request
        last = self._active - 1
        self._swap(row, last)
        if self._prefilling:  # keep the prefilling rows right after the generating ones
            self._swap(last, last + self._prefilling)
            last += self._prefilling
        self._rows[last] = None
        self._used[last] = time.monotonic()
        self._active -= 1
        if event is not None:  # failed: the row's keys may be half-written
            self.cache.truncate(last, 0)
            self._ids[last] = []
            self._emit(r, event)
        else:
            self._emit(r, Finished(reason, len(r.prompt), seq.generated, seq.cached))

    def _swap(self, a: int, b: int) -> None:
        if a == b:
            return
        self.cache.swap(a, b)
        for lst in (self._rows, self._ids, self._used):
            lst[a], lst[b] = lst[b], lst[a]


def _plain_greedy(r: Request) -> bool:
    """Whether `r`'s next token is the argmax of its logits plus its logit_bias (nothing per row else)."""
    return (
        r.temperature < GREEDY_BELOW and r.processor is None and r.mask is None and r.logprobs is None
    )  # fmt: skip
