"""The LM protocol that evaluation tasks talk to, and its adapters: a gemmakit model, an HTTP server.

Where it sits: `eval.tasks` turn documents into requests (text in, numbers or text out), an `LM`
answers them, the tasks score the answers. Tasks never see tokens; adapters never see tasks. As in
lm-evaluation-harness's `api/model.py` there are three request types, and each method is called once
per task with every request of its type, so an adapter can sort and batch them; answers come back in
input order. Adapters: `GemmaLM` (a gemmakit model in this process) and `lm_http.OpenAICompatibleLM` (any
server with the OpenAI /v1/completions API: vLLM, llama.cpp's server, TGI, ...; stdlib urllib only).

Semantics follow lm-eval 0.4.13's HFLM (tests/test_eval_lmeval_agreement.py compares every request):
- loglikelihood: trailing spaces of the context move to the front of the continuation; the
  continuation's tokens are those of encode(context + continuation) after the first
  len(encode(context)) tokens (both with <bos>), so a token straddling the boundary counts as
  context. Inputs longer than max_length + 1 tokens lose their left end; an empty context is <bos>.
- loglikelihood_rolling: the text (no <bos>) is predicted after a <bos> prefix, in disjoint windows
  of max_length tokens (one window if it fits). lm-eval's HFLM with a Gemma tokenizer that adds
  <bos> scores "<bos><bos>text" (the second <bos> counts as text; -5.5 nats on a tiny model's
  5-token text); we do not. Log-likelihoods are float32 sums, as lm-eval's.
- generate_until: greedy; the prompt (with <bos>) is left-truncated to max_length - max_tokens; a
  row stops at <eos>/<end_of_turn> or at the first stop string, which is cut off. lm-eval also
  treats the text "<eos>" as a stop string, and so do we. The text is decoded as HF tokenizers do
  (skip_special_tokens=True: no <unk>, <mask>, <unusedN>, turn markers; see `GemmaLM._text`).
  One deliberate difference: HF's stopping criterion looks for stop strings in the last few tokens
  decoded WITH special pieces' names, so a stop "e" ends generation at "<unused3>"; we match stop
  strings against the text only. lm-eval's task stops ("\n\n", "Question:", "</s>") never occur
  inside those names, so this changes nothing for them.

Key trade-off: GemmaLM scores right-padded rows in one forward per batch and runs the (dim x vocab)
head only on the positions that predict continuation tokens: at vocab 256k a full (8, 1024, V)
float32 logits tensor is 8 GiB, while continuations are usually < 5% of positions. Batch shape and
padding change float32 summation order, so a log-likelihood depends on its batch mates by ~1e-6
(tested: <= 1e-5 against batch size 1 and against HF transformers); it is not bit-for-bit.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gemmakit.errors import UserError
from gemmakit.infer.engine import PAD_ID, Engine
from gemmakit.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class LMError(UserError):
    """A request or an endpoint's answer is unusable; the message is one line naming the culprit."""


@dataclass(frozen=True)
class LoglikelihoodRequest:
    context: str  # conditioning text; "" means only <bos>
    continuation: str  # the text to score; word-boundary spaces belong here (" Paris")


@dataclass(frozen=True)
class RollingRequest:
    text: str  # the whole text, scored token by token (perplexity, bits per byte)


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str  # the greedy continuation follows this text
    until: tuple[str, ...] = ()  # stop strings: generation ends at the first one, which is cut off
    max_tokens: int = 256  # new tokens at most (lm-eval's default max_gen_toks)


Request = LoglikelihoodRequest | RollingRequest | GenerateRequest


class LM(abc.ABC):
    """What a task needs from a model. Every method takes all requests of its type at once."""

    name: str = "lm"  # recorded in results.json

    @abc.abstractmethod
    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest]) -> list[tuple[float, bool]]:
        """Per request: (sum of the continuation tokens' log-probs given the context, whether greedy
        decoding from the context would produce exactly those tokens)."""

    @abc.abstractmethod
    def loglikelihood_rolling(self, requests: Sequence[RollingRequest]) -> list[float]:
        """Per request: the total log-likelihood of the text (rolling windows when it is long)."""

    @abc.abstractmethod
    def generate_until(self, requests: Sequence[GenerateRequest]) -> list[str]:
        """Per request: the greedy continuation, cut before the first stop string."""

    @abc.abstractmethod
    def token_count(self, text: str) -> int:
        """Tokens of `text` without <bos> (the denominator of per-token perplexity)."""


# ---- helpers shared by the adapters ------------------------------------------------------------


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """`text` up to the earliest occurrence of any non-empty stop string (lm-eval's postprocessing)."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def move_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval moves the context's trailing whitespace to the continuation ("A: ", "x" -> "A:", " x")."""
    n = len(context) - len(context.rstrip())
    return (context[:-n], context[-n:] + continuation) if n else (context, continuation)


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids with <bos>, continuation ids) exactly as lm-eval's `_encode_pair` splits them."""
    if context == "":
        return [tokenizer.bos_id], tokenizer.encode(continuation, bos=False)
    context, continuation = move_trailing_space(context, continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, tokenizer.encode(context + continuation)[len(context_ids) :]


def rolling_windows(tokens: list[int], prefix: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's `get_rolling_token_windows(context_len=1)` + `make_disjoint_window`: (context,
    predicted) pairs that predict every token once; context + predicted[:-1] is <= max_len tokens.

    With max_len 4 and tokens 0..9: ([prefix], 0..3), ([3], 4..7), ([5, 6, 7], 8..9): every window
    but the first starts where the previous one ended, and the last keeps a full-length input.
    """
    if not tokens:
        return []
    first = min(max_len, len(tokens))
    windows = [([prefix], tokens[:first])]
    predicted = first
    while predicted < len(tokens):
        n_pred = min(len(tokens) - predicted, max_len)
        end = predicted + n_pred
        context = tokens[end - max_len - 1 : end - 1]
        windows.append((context[: len(context) - (n_pred - 1)], tokens[end - n_pred : end]))
        predicted = end
    return windows


def rolling_loglikelihoods(
    tokenizer: Tokenizer,
    requests: Sequence[RollingRequest],
    max_len: int,
    score: Callable[[list[tuple[list[int], list[int]]]], list[tuple[float, bool]]],
) -> list[float]:
    """Per text, the sum of `score`'s log-likelihoods over its rolling windows (0.0 for "")."""
    windows, owner = [], []
    for i, request in enumerate(requests):
        for window in rolling_windows(tokenizer.encode(request.text, bos=False), tokenizer.bos_id, max_len):
            windows.append(window)
            owner.append(i)
    totals = [0.0] * len(requests)
    for i, (ll, _) in zip(owner, score(windows), strict=True):
        totals[i] += ll
    return totals


def check_max_tokens(request: GenerateRequest, index: int, max_length: int | None = None) -> None:
    """A generation budget is a positive integer, below max_length (room for one prompt token)."""
    n = request.max_tokens
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or (max_length and n >= max_length):
        allowed = f"in [1, {max_length})" if max_length else ">= 1"
        raise LMError(f"generate request {index}: max_tokens must be an integer {allowed}, got {n!r}")


# ---- the gemmakit adapter -----------------------------------------------------------------------


class GemmaLM(LM):
    """A gemmakit `Gemma` (plain, quantized or LoRA-merged) and its tokenizer behind the LM protocol.

    `batch_size` rows go through one forward (log-likelihoods) or one decode loop (generation);
    `max_length` caps tokens per row (default: the model's max_seq_len); `stop_tokens` end a
    generation (default: the tokenizer's <eos> and <end_of_turn>, as Gemma 2/3 generation configs).
    """

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, *, batch_size: int = 8,
                 max_length: int | None = None, stop_tokens: Sequence[int] | None = None,
                 name: str | None = None) -> None:  # fmt: skip
        cfg = model.config
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise LMError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
        limit = cfg.max_seq_len
        if max_length is not None and (
            isinstance(max_length, bool) or not isinstance(max_length, int) or not 2 <= max_length <= limit
        ):
            raise LMError(
                f"max_length: expected an integer in [2, {limit}] (max_seq_len), got {max_length!r}"
            )
        if tokenizer.vocab_size > cfg.vocab_size:
            raise LMError(
                f"tokenizer has {tokenizer.vocab_size} pieces, the model {cfg.vocab_size} embeddings"
            )
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.max_length = max_length or limit
        self.stop_tokens = tuple(tokenizer.stop_ids if stop_tokens is None else stop_tokens)
        self.name = name or f"gemmakit-{cfg.generation}"
        self.engine = Engine(model)
        self.device = next(model.parameters()).device
        # ids that carry no text: lm-eval decodes with skip_special_tokens=True
        special = {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id}
        self._silent = frozenset(tokenizer.reserved_ids) | special
        self._is_byte: dict[int, bool] = {}
        self._eos_text = tokenizer.id_to_piece(tokenizer.eos_id)  # "<eos>": lm-eval adds it to `until`

    # ---- log-likelihoods ------------------------------------------------------------------------

    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest]) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.tokenizer, r.context, r.continuation) for r in requests]
        return self._score_pairs(pairs, "loglikelihood request")

    def loglikelihood_rolling(self, requests: Sequence[RollingRequest]) -> list[float]:
        score = functools.partial(self._score_pairs, what="rolling window")
        return rolling_loglikelihoods(self.tokenizer, requests, self.max_length, score)

    def token_count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, bos=False))

    def _score_pairs(self, pairs: list[tuple[list[int], list[int]]], what: str) -> list[tuple[float, bool]]:
        """Score (context ids, continuation ids) pairs, longest first in batches, back in input order."""
        for i, (_, continuation) in enumerate(pairs):
            if not 1 <= len(continuation) <= self.max_length:
                n = len(continuation)
                raise LMError(f"{what} {i}: the continuation has {n} tokens, expected 1..{self.max_length}")
        # longest first, as lm-eval: rows of similar length share a batch, so little is padding
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            # the last token is never an input; inputs keep their last max_length tokens
            inputs = [(pairs[i][0] + pairs[i][1])[-(self.max_length + 1) :][:-1] for i in chunk]
            scores = self._score_batch(inputs, [pairs[i][1] for i in chunk])
            for i, score in zip(chunk, scores, strict=True):
                results[i] = score
        return results

    @torch.inference_mode()
    def _score_batch(
        self, inputs: list[list[int]], continuations: list[list[int]]
    ) -> list[tuple[float, bool]]:
        """One right-padded forward; the head runs only where continuation tokens are predicted."""
        width = max(len(x) for x in inputs)
        tokens = torch.full((len(inputs), width), PAD_ID, dtype=torch.long)
        positions = torch.full((len(inputs), width), -1, dtype=torch.long)  # -1: padding, never attended
        for row, ids in enumerate(inputs):
            tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            positions[row, : len(ids)] = torch.arange(len(ids))
        hidden = self.model.hidden(tokens.to(self.device), positions.to(self.device))  # (B, W, dim)
        spans = [(len(ids) - len(cont), len(ids)) for ids, cont in zip(inputs, continuations, strict=True)]
        picked = torch.cat([hidden[row, a:b] for row, (a, b) in enumerate(spans)])  # (N = sum of spans, dim)
        logprobs = F.log_softmax(self.model.head(picked).float(), dim=-1)  # (N, V), float32 as HFLM
        targets = torch.tensor([t for cont in continuations for t in cont], device=logprobs.device)
        token_lp = logprobs.gather(-1, targets[:, None])[:, 0]  # (N,)
        greedy = logprobs.argmax(-1) == targets  # argmax takes the first of tied maxima, as HF
        out, start = [], 0
        for cont in continuations:
            end = start + len(cont)
            out.append((float(token_lp[start:end].sum()), bool(greedy[start:end].all())))
            start = end
        return out

    # ---- generation -----------------------------------------------------------------------------

    def generate_until(self, requests: Sequence[GenerateRequest]) -> list[str]:
        requests = [self._fit(r, i) for i, r in enumerate(requests)]
        prompts = []
        for i, request in enumerate(requests):
            check_max_tokens(request, i, self.max_length)
            prompts.append(self.tokenizer.encode(request.prompt)[-(self.max_length - request.max_tokens) :])
        # one batch decodes for one max_tokens; within it, longest prompts first as lm-eval
        order = sorted(range(len(requests)), key=lambda i: (requests[i].max_tokens, -len(prompts[i])))
        results = [""] * len(requests)
        start = 0
        while start < len(order):
            budget = requests[order[start]].max_tokens
            chunk = [i for i in order[start : start + self.batch_size] if requests[i].max_tokens == budget]
            stops = [(*requests[i].until, self._eos_text) for i in chunk]
            texts = self._generate_batch([prompts[i] for i in chunk], budget, stops)
            for i, text in zip(chunk, texts, strict=True):
                results[i] = text
            start += len(chunk)
        return results

    def _fit(self, request: GenerateRequest, index: int) -> GenerateRequest:
        """A budget of max_length or more (HumanEval's 1024 on a 1024-token model) cannot leave room for
        the prompt; lm-eval would slice the prompt to nothing. Here the prompt keeps up to half the
        context and the budget is the rest, with a warning; budgets that fit are left as they are."""
        n = request.max_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < self.max_length:
            return request
        keep = min(len(self.tokenizer.encode(request.prompt)), self.max_length // 2)
        logger.warning("generate request %d asks for %d new tokens; the model's context is %d tokens, so it "
                       "gets %d", index, n, self.max_length, self.max_length - keep)  # fmt: skip
        return dataclasses.replace(request, max_tokens=self.max_length - keep)

    def _generate_batch(
        self, prompts: list[list[int]], max_tokens: int, stops: list[tuple[str, ...]]
    ) -> list[str]:
        """Greedy-decode rows together until each hit a stop id, a stop string, or `max_tokens`."""
        new: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        for step in self.engine.stream(prompts, max_tokens, stop_tokens=self.stop_tokens):
            for row, token in enumerate(step):
                if done[row]:
                    continue
                if token is None:  # the engine saw a stop id
                    done[row] = True
                    continue
                new[row].append(token)
                # the whole text is re-decoded: a stop string may span tokens, and multi-byte
                # characters complete late; <= 256 steps keep this quadratic cost small
                text = self._text(new[row])
                done[row] = any(stop and stop in text for stop in stops[row])
            if all(done):
                break
        return [cut_at_stop(self._text(ids), row_stops) for ids, row_stops in zip(new, stops, strict=True)]

    def _text(self, tokens: list[int]) -> str:
        """Generated text as HF tokenizers decode it (lm-eval's HFLM, vLLM): special pieces are skipped,
        and a run of byte pieces that is not valid UTF-8 as a whole becomes one U+FFFD per byte, its
        valid bytes included. (SentencePiece and `Tokenizer.decode` keep the valid characters of such
        a run: <0x78><0xC6><0x69> gives "x", U+FFFD, "i" there, three U+FFFD here.)"""
        parts, run = [], bytearray()
        for token in tokens:
            if token in self._silent:
                continue
            if token not in self._is_byte:
                piece = self.tokenizer.id_to_piece(token)  # HF's test: the piece is spelled <0xXX>
                self._is_byte[token] = len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")
            if self._is_byte[token]:
                run += self.tokenizer.token_bytes(token)
                continue
            parts.append(_byte_run(run))
            run.clear()
            parts.append(self.tokenizer.decode([token]))
        return "".join(parts) + _byte_run(run)


def _byte_run(run: bytearray) -> str:
    try:
        return run.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(run)


# ---- an OpenAI-compatible server ------------------------------------------------------------------
