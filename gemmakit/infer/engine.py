"""Generation: token ids in, new token ids out, in named steps prefill -> decode_one -> sample.

Where it sits: after `model` (and `checkpoint`/`quantize`, which build it), before `cli`/`server`.
The engine knows nothing about tokenization or chat formats: callers give lists of ids and stop ids
and turn the returned ids into text themselves (with `tokenizer.StreamDecoder` for streaming).

A batch of prompts of different lengths is LEFT-padded with id 0 at position -1, so every row's last
prompt token sits in the last column and all rows decode in lockstep; each row's positions still
start at 0, so a row's tokens equal what it would get alone (greedy). Padding is never visible to
attention but still costs compute and cache slots: prompts of 10 and 100 tokens waste 45% of the
prefill. Key trade-off: one batched forward per step for every row, including rows that already
stopped (they are fed but ignored), instead of shrinking the batch and re-packing the cache.

An optional `processor` (`sampler.ScoreProcessor`, e.g. a SynthID watermark) sees every step's
filtered scores and the ids in each row's last position; it is stateful, so pass a fresh one per
request. The engine does not know what it does and never imports it.

Everything runs under `torch.inference_mode()`, entered around each step rather than around the
`stream` generator, so a caller's code between yielded steps never runs in inference mode.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from gemmakit.errors import UserError
from gemmakit.infer.kv_cache import KVCache, StaticKVCache
from gemmakit.infer.sampler import SamplingError, ScoreProcessor, check_sampling_args, sample

logger = logging.getLogger(__name__)

PAD_ID = 0  # Gemma's <pad>; the value is irrelevant for correctness since padded keys are masked


class GenerationError(UserError):
    """A generation request is invalid; the message names the argument and what was expected."""


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The activation dtype (that of the embedding); the first floating parameter if it is quantized."""
    embed = getattr(model, "embed", None)
    weight = getattr(embed, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight.dtype
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def left_pad(
    prompts: Sequence[Sequence[int]], device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, positions), both (B, L) with L the longest prompt; padding is id 0 at position -1."""
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), PAD_ID, dtype=torch.long)
    positions = torch.full((len(prompts), width), -1, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        positions[row, width - len(prompt) :] = torch.arange(len(prompt))
    return tokens.to(device), positions.to(device)


def _check_ids(name: str, ids: Iterable[object], vocab: int) -> None:
    bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < vocab]
    if bad:
        raise GenerationError(f"{name}: token ids must be integers in [0, {vocab}), got {bad[0]!r}")


class Engine:
    """Batched prefill + KV-cached decoding for a `Gemma` model (or anything with its forward signature).

    `prefill_chunk` splits long prompts into chunks of that many columns: peak attention memory drops
    from (B, H, L, L) scores to (B, H, chunk, L); results equal the unchunked prefill up to float32
    rounding (summation order; <= 2e-5 on logits of magnitude ~10 in tests/test_infer.py).

    `compile=True` decodes through a `StaticKVCache` (fixed shapes) and a `torch.compile`d model
    call for one-token steps, compiled once per batch size and context length on the first step
    (tens of seconds on a 2-core CPU: the benchmark reports it). Prefill stays eager: its shapes
    change with every prompt.
    """

    def __init__(self, model: nn.Module, prefill_chunk: int | None = None, compile: bool = False) -> None:
        if prefill_chunk is not None and (
            not isinstance(prefill_chunk, int) or isinstance(prefill_chunk, bool) or prefill_chunk < 1
        ):
            raise GenerationError(f"prefill_chunk: expected None or an integer >= 1, got {prefill_chunk!r}")
        self.model = model
        self.config = model.config
        self.prefill_chunk = prefill_chunk
        self.dtype = compute_dtype(model)
        self.device = next(model.parameters()).device
        self.static = compile
        self._step = torch.compile(model, dynamic=False) if compile else model

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty cache in the model's activation dtype and device (static shapes when compiling)."""
        cls = StaticKVCache if self.static else KVCache
        return cls(self.config, batch_size, max_len, dtype=self.dtype, device=self.device)

    # ---- the named steps ------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, positions: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
        """Feed (B, L) prompt tokens into `cache`; return the last column's logits (B, V).

        `positions` None means contiguous positions continuing from `cache.length` (no padding).
        """
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise GenerationError(
                f"prefill: expected (batch, time>=1) tokens, got shape {tuple(tokens.shape)}"
            )
        if positions is None:
            start = cache.length
            positions = torch.arange(start, start + tokens.shape[1], device=tokens.device).expand_as(tokens)
        step = self.prefill_chunk or tokens.shape[1]
        for s in range(0, tokens.shape[1], step):
            # last_only: intermediate chunks only fill the cache, the last keeps a (B, 1, V) slice
            logits = self._forward(tokens[:, s : s + step], positions[:, s : s + step], cache)
        return logits[:, -1]

    @torch.inference_mode()
    def decode_one(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed one token per row, tokens and positions (B,); return that position's logits (B, V)."""
        return self._forward(tokens[:, None], positions[:, None], cache)[:, -1]

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One model call (B, T) -> last-column logits (B, 1, V); one-token steps of a static cache are
        compiled (if enabled) and counted here, since the static cache does not count them itself."""
        if isinstance(cache, StaticKVCache) and tokens.shape[1] == 1:
            logits = self._step(tokens, positions, cache=cache, last_only=True)
            cache.advance(1)
            return logits
        return self.model(tokens, positions, cache=cache, last_only=True)

    # ---- whole requests ---------------------------------------------------------------------------
    def stream(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_tokens: Iterable[int] | None = None,
        include_stop: bool = False,
        processor: ScoreProcessor | None = None,
    ) -> Iterator[list[int | None]]:
        """Yield one list per decode step: entry i is row i's new token, or None once row i has stopped.

        A row stops at its first stop token, which is yielded only with `include_stop` (RL rollouts
        need to know which stop id ended a row and train on it); steps where every row is None
        are not yielded, so a single-prompt caller can use `step[0]` as an int. Concatenating the
        non-None entries of row i over all steps gives exactly `generate(...)[i]`. Arguments are
        checked here, before the first step is requested; the model first runs on the first `next`.
        `processor(last_tokens, scores)` runs on each step's filtered scores (see `sampler.sample`).
        """
        stops = self._check(prompts, max_new_tokens, temperature, top_k, top_p, stop_tokens)
        return self._steps(
            [[int(t) for t in p] for p in prompts],
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            stops,
            include_stop,
            processor,
        )

    def _steps(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        seed: int | None,
        stops: frozenset[int],
        include_stop: bool = False,
        processor: ScoreProcessor | None = None,
    ) -> Iterator[list[int | None]]:
        """The decode loop behind `stream`, on already-validated arguments."""
        if not prompts or max_new_tokens == 0:
            return
        with torch.inference_mode():
            tokens, positions = left_pad(prompts, self.device)
            width = tokens.shape[1]
            if logger.isEnabledFor(logging.DEBUG):
                padding = 100 * (positions < 0).float().mean().item()
                logger.debug("prefill: %d rows x %d columns, %.0f%% padding", len(prompts), width, padding)
            # the last sampled token is never fed back, hence the -1
            cache = self.new_cache(len(prompts), width + max_new_tokens - 1)
            logits = self.prefill(tokens, positions, cache)
            next_pos = positions[:, -1] + 1  # (B,) position of each row's first new token
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        done = [False] * len(prompts)
        last = tokens[:, -1]  # (B,) each row's last prompt token (left padding), then the sampled ones
        for step in range(max_new_tokens):
            with torch.inference_mode():
                new = sample(logits, temperature, top_k, top_p, generator, processor, last)  # (B,)
            last = new
            out: list[int | None] = []
            for row, tok in enumerate(new.tolist()):
                stopped_now = not done[row] and tok in stops
                done[row] = done[row] or tok in stops
                out.append(tok if (stopped_now and include_stop) or not done[row] else None)
            if all(t is None for t in out):
                return
            yield out
            if all(done):
                return
            if step + 1 < max_new_tokens:
                logits = self.decode_one(new, next_pos + step, cache)  # rows that stopped are fed too

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_tokens: Iterable[int] | None = None,
        include_stop: bool = False,
        processor: ScoreProcessor | None = None,
    ) -> list[list[int]]:
        """Per prompt, only the NEW tokens, ending before the first stop token (which is dropped, or
        kept as the last token with `include_stop`).

        Rows that stopped stop growing while others go on; the loop ends when every row stopped or
        after `max_new_tokens` steps. An empty `prompts` list returns []. See `stream` for the rest.
        """
        out: list[list[int]] = [[] for _ in prompts]
        for step in self.stream(
            prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_tokens, include_stop, processor
        ):
            for row, tok in enumerate(step):
                if tok is not None:
                    out[row].append(tok)
        return out

    def _check(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        stop_tokens: Iterable[int] | None,
    ) -> frozenset[int]:
        """Validate a request before any compute; return the stop ids as a set."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise GenerationError(f"max_new_tokens: expected an integer >= 0, got {max_new_tokens!r}")
        try:
            check_sampling_args(temperature, top_k, top_p)
        except SamplingError as e:  # one error type for every bad request (the CLI catches it)
            raise GenerationError(str(e)) from None
        vocab, limit = self.config.vocab_size, self.config.max_seq_len
        if not isinstance(prompts, Sequence) or isinstance(prompts, str):
            raise GenerationError(f"prompts: expected a list of token-id lists, got {type(prompts).__name__}")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, Sequence) or len(prompt) == 0:
                raise GenerationError(f"prompts[{i}]: expected a non-empty list of token ids, got {prompt!r}")
            _check_ids(f"prompts[{i}]", prompt, vocab)
        stops = list(stop_tokens or ())
        _check_ids("stop_tokens", stops, vocab)
        longest = max((len(p) for p in prompts), default=0)
        if longest + max_new_tokens > limit:
            raise GenerationError(
                f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} = {longest + max_new_tokens} "
                f"exceeds the model's max_seq_len {limit}"
            )
        return frozenset(int(t) for t in stops)
