"""SynthID Text: a keyed tournament watermark applied while sampling, and the detectors that find it.

Where it sits: `watermark_processor(config)` gives a per-request callable that `infer.engine` applies
to the float32 scores after temperature / top-k / top-p and before softmax + multinomial (the order
of HF `generate()`); detection (`Watermark.g_values`, the masks, `mean_score`, `weighted_mean_score`,
`p_value`, `BayesianDetector`) needs only token ids, so `gemmakit watermark detect` loads no model.

Bit-compatible with HF transformers' `SynthIDTextWatermarkLogitsProcessor` (checked in
tests/test_watermark.py): the same int64 LCG hash with initial value 1, the same sampling table
(`torch.randint` on torch's CPU generator: CPU- and torch-version-dependent, so tables built on CUDA
differ), floor-modulo indexing, zero context on the first call, repeated-context masking against a
1024-entry history, and the same float ops in the same order in the tournament update. NOT
compatible with `synthid-text` 0.2.1 (another initial hash, no table) nor with Gemini's watermark.

Key trade-off: HF hashes all V candidates at every layer (262144 x 30 = 7.9M int64 hash chains per
row and step). Tokens whose probability is exactly 0 (removed by top-k / top-p) contribute 0 to
every sum whatever their g, so we hash only the survivors but still reduce over a full-size,
zero-filled (B, V) tensor: same values in the same layout, so the sums stay bit-identical.
Measured (benchmarks/watermark.md, 1 thread, V=262144, depth 30, batch 1): sampling costs 7.9 ms
per token with the watermark vs 5.9 without at top_k=64, 30 vs 5 ms without top-k; HF's processor
adds ~300 ms either way. The table is always the CPU one, also for models on CUDA (where HF's would
differ), so text generated on any device is detected on any machine.
Bits equal HF's only under the same torch build and thread count (the reductions split by threads).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gemmakit.artifact import atomic_open
from gemmakit.errors import UserError

MULTIPLIER = 6364136223846793005  # the LCG multiplier of HF / synthid-text (Knuth's MMIX constant)
_MASK64 = (1 << 64) - 1
# The 30 keys of HF's SynthID Space and the reference README. PUBLIC: anyone can detect (and forge)
# text watermarked with them; real deployments keep their keys private.
EXAMPLE_KEYS = (654, 400, 836, 123, 340, 443, 597, 160, 57, 29, 590, 639, 13, 715, 468,
                990, 966, 226, 324, 585, 118, 504, 421, 521, 129, 669, 732, 225, 90, 960)  # fmt: skip


class WatermarkError(UserError):
    """A bad watermark keys file, detector file or detection input; the message names it."""


def _wrap(x: int) -> int:
    """`x` reduced to a signed int64, as torch's int64 arithmetic wraps."""
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


@dataclass(frozen=True)
class WatermarkConfig:
    """The secret and the shape of a SynthID Text watermark (HF `SynthIDTextWatermarkingConfig`)."""

    keys: tuple[int, ...]  # one distinct int64 key per tournament layer; depth = len(keys) (HF uses 30)
    ngram_len: int = 5  # context = the last ngram_len-1 generated tokens (paper and HF default 5)
    context_history_size: int = 1024  # contexts remembered per row; a repeated context is not watermarked
    sampling_table_seed: int = 0  # seed of the CPU generator that draws the 0/1 g-value table
    sampling_table_size: int = 2**16  # table entries; HF rejects > 2**24 (16M int64 = 128 MiB)
    skip_first_ngram_calls: bool = False  # leave the first ngram_len-1 steps unwatermarked (HF option)

    def __post_init__(self) -> None:
        keys = self.keys
        if not isinstance(keys, (list, tuple)) or not keys:
            raise WatermarkError(f"keys: expected a non-empty list of integers, got {keys!r}")
        for k in keys:
            if isinstance(k, bool) or not isinstance(k, int) or not -(2**63) <= k < 2**63:
                raise WatermarkError(f"keys: expected int64 integers, got {k!r}")
        if len(set(keys)) != len(keys):
            raise WatermarkError(
                f"keys: expected distinct integers, got {len(keys) - len(set(keys))} repeats"
            )
        object.__setattr__(self, "keys", tuple(keys))
        _check_int("ngram_len", self.ngram_len, 2, 2**10)
        _check_int("context_history_size", self.context_history_size, 1, 2**20)
        _check_int("sampling_table_seed", self.sampling_table_seed, 0, 2**63 - 1)
        _check_int("sampling_table_size", self.sampling_table_size, 2, 2**24)
        if not isinstance(self.skip_first_ngram_calls, bool):
            raise WatermarkError(
                f"skip_first_ngram_calls: expected true or false, got {self.skip_first_ngram_calls!r}"
            )

    @property
    def depth(self) -> int:
        """Tournament layers = g-values per token."""
        return len(self.keys)

    def fingerprint(self) -> str:
        """16 hex digits of sha256 over everything that decides the g-values (not the keys themselves)."""
        fields = [list(self.keys), self.ngram_len, self.sampling_table_seed, self.sampling_table_size]
        return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:16]


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise WatermarkError(f"{name}: expected an integer in [{lo}, {hi}], got {value!r}")


def load_keys(path: str | Path) -> WatermarkConfig:
    """A `WatermarkConfig` from a TOML file of `WatermarkConfig` fields (see recipes/watermark/example-keys.toml)."""
    import tomllib

    path = Path(path)
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WatermarkError(f"{path}: no such watermark keys file") from None
    except IsADirectoryError:
        raise WatermarkError(f"{path}: is a directory; expected a watermark keys TOML file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise WatermarkError(f"{path}: not valid TOML ({e})") from None
    except OSError as e:
        raise WatermarkError(f"{path}: cannot read ({e.strerror or e})") from None
    fields = [f.name for f in dataclasses.fields(WatermarkConfig)]
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise WatermarkError(f"{path}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(fields)}")
    if "keys" not in table:
        raise WatermarkError(f"{path}: missing `keys` (a list of distinct integers, one per layer)")
    if not isinstance(table["keys"], list):
        raise WatermarkError(f"{path}: keys: expected a list of integers, got {table['keys']!r}")
    try:
        return WatermarkConfig(**{**table, "keys": tuple(table["keys"])})
    except WatermarkError as e:
        raise WatermarkError(f"{path}: {e}") from None


def sampling_table(seed: int, size: int) -> torch.Tensor:
    """HF's g-value table: `size` int64 0/1 entries from torch's CPU generator seeded with `seed`."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, 2, (size,), generator=generator, device="cpu")


def accumulate_hash(h: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """h <- (h + x) * MULTIPLIER + 1 for each x along data's last dim (int64, wrapping)."""
    for i in range(data.shape[-1]):
        h = (h + data[..., i]) * MULTIPLIER + 1
    return h


class Watermark:
    """The keyed g-function of one `WatermarkConfig`: stateless, shared by processors and detectors."""

    def __init__(self, config: WatermarkConfig) -> None:
        self.config = config
        self.ngram_len, self.depth = config.ngram_len, config.depth
        self.table = sampling_table(config.sampling_table_seed, config.sampling_table_size)
        size = config.sampling_table_size
        self._pow2 = size & (size - 1) == 0  # floor-mod by 2**k is a bit-and in two's complement
        # hash(h, [v, key_l]) = ((h+v)*M + 1 + key_l)*M + 1 = ((h+v)*M + 1)*M + (key_l*M + 1) mod 2**64
        self.key_terms = torch.tensor([_wrap(k * MULTIPLIER + 1) for k in config.keys], dtype=torch.long)

    def _index(self, keys: torch.Tensor) -> torch.Tensor:
        size = self.config.sampling_table_size
        return keys & (size - 1) if self._pow2 else torch.remainder(keys, size)

    def table_indices(self, token_hash: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """(base, terms) with table index of layer l = `add_index(base, terms[l])`. For a 2**k table
        only the low k bits matter ((a + b) mod 2**k = (a mod 2**k + b mod 2**k) mod 2**k), so the
        per-layer work runs in int32, half the bytes of HF's int64 chain."""
        if self._pow2:
            low = self.config.sampling_table_size - 1
            return (token_hash & low).int(), [int(t) & low for t in self.key_terms.tolist()]
        return token_hash, self.key_terms.tolist()

    def add_index(self, base: torch.Tensor, term: int, out: torch.Tensor) -> torch.Tensor:
        """The table index `hash + term` of one layer, written into `out`."""
        torch.add(base, term, out=out)
        if self._pow2:
            return out.bitwise_and_(self.config.sampling_table_size - 1)
        return torch.remainder(out, self.config.sampling_table_size, out=out)

    def context_hash(self, contexts: torch.Tensor) -> torch.Tensor:
        """(...,) int64 hash of (..., ngram_len-1) contexts from the initial value 1 (HF's `torch.ones`)."""
        return accumulate_hash(torch.ones(contexts.shape[:-1], dtype=torch.long), contexts)

    def g_values(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L-n+1, depth) int64 g of every n-gram of (B, L) tokens (HF `compute_g_values`)."""
        tokens = _check_tokens(tokens)
        ngrams = tokens.unfold(1, self.ngram_len, 1)  # (B, L-n+1, n)
        token_hash = (self.context_hash(ngrams) * MULTIPLIER)[..., None]  # (B, L-n+1, 1)
        return self.table[self._index(token_hash + self.key_terms)]

    def repetition_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L-n+1) int64: 1 where the n-gram's context was not among the last `context_history_size`
        contexts (a fresh history, HF `compute_context_repetition_mask`)."""
        tokens = _check_tokens(tokens)
        hashes = self.context_hash(tokens[:, :-1].unfold(1, self.ngram_len - 1, 1)).tolist()
        size = self.config.context_history_size
        out = []
        for row in hashes:
            # a FIFO of the last `size` hashes with a count per hash: O(1) per position instead of
            # HF's O(size) compare; it starts as `size` zeros, as HF's (so hash 0 counts as seen)
            fifo, counts = deque([0] * size), Counter({0: size})
            seen = []
            for h in row:
                seen.append(0 if counts[h] else 1)
                fifo.appendleft(h)
                counts[h] += 1
                counts[fifo.pop()] -= 1
            out.append(seen)
        return torch.tensor(out, dtype=torch.long).reshape(tokens.shape[0], -1)

    def eos_mask(self, tokens: torch.Tensor, eos_id: int | None) -> torch.Tensor:
        """(B, L-n+1) int64: 1 before the row's first `eos_id` (all 1 for None), sliced like g-values."""
        tokens = _check_tokens(tokens)
        if eos_id is None:
            keep = torch.ones_like(tokens)
        else:
            keep = (torch.cumsum((tokens == eos_id).long(), dim=1) == 0).long()
        return keep[:, self.ngram_len - 1 :]

    def mask(self, tokens: torch.Tensor, eos_id: int | None) -> torch.Tensor:
        """eos mask x repetition mask: the positions whose g-values count as evidence."""
        return self.eos_mask(tokens, eos_id) * self.repetition_mask(tokens)

    def score_inputs(
        self, texts: Sequence[Sequence[int]], eos_id: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(g (B, T, depth), mask (B, T)) for generated-token lists of any lengths, right-padded with
        mask 0 (T = longest - n + 1, at least 1). Pass generated tokens only, never the prompt."""
        width = max([len(t) for t in texts] + [self.ngram_len])
        g = torch.zeros(len(texts), width - self.ngram_len + 1, self.depth, dtype=torch.long)
        mask = torch.zeros(len(texts), width - self.ngram_len + 1, dtype=torch.long)
        for i, text in enumerate(texts):
            if len(text) < self.ngram_len:
                continue
            row = torch.tensor([list(text)], dtype=torch.long)
            n = len(text) - self.ngram_len + 1
            g[i, :n], mask[i, :n] = self.g_values(row)[0], self.mask(row, eos_id)[0]
        return g, mask


def _check_tokens(tokens: torch.Tensor) -> torch.Tensor:
    if tokens.dim() != 2:
        raise WatermarkError(f"tokens: expected a (batch, length) tensor, got shape {tuple(tokens.shape)}")
    return tokens.long()


class WatermarkProcessor:
    """One generation request's watermark state; call as `processor(last_tokens, scores) -> scores`.

    The contract of `infer.engine` processors: `last_tokens` (B,) are the ids in each row's last
    position (the prompt's last token on the first call, then the previously sampled token) and
    `scores` (B, V) the filtered float scores. As HF, the first call uses an all-zero context (the
    prompt is never context) and later calls shift `last_tokens` in, so one instance serves exactly
    one request: build a fresh one for each.
    """

    def __init__(self, watermark: Watermark) -> None:
        self.watermark, self.config = watermark, watermark.config
        self.context: torch.Tensor | None = None  # (B, n-1) the last n-1 generated ids
        self.history: torch.Tensor | None = None  # (B, context_history_size) newest first
        self.calls = 0

    def __call__(self, last_tokens: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        batch = scores.shape[0]
        if self.context is None:
            self.context = torch.zeros(batch, self.config.ngram_len - 1, dtype=torch.long)
            self.history = torch.zeros(batch, self.config.context_history_size, dtype=torch.long)
        else:
            new = last_tokens.reshape(batch, 1).to("cpu", torch.long)
            self.context = torch.cat((self.context[:, 1:], new), dim=1)
        self.calls += 1
        if self.config.skip_first_ngram_calls and self.calls < self.config.ngram_len:
            return scores  # HF returns before touching the history here
        assert self.history is not None
        ctx_hash = self.watermark.context_hash(self.context)  # (B,)
        repeated = (self.history == ctx_hash[:, None]).any(dim=1)  # (B,)
        self.history = torch.cat((ctx_hash[:, None], self.history[:, :-1]), dim=1)
        if bool(repeated.all()):
            return scores  # HF computes the update and discards it; the result is the same
        updated = self._tournament(scores.cpu(), ctx_hash).to(scores.device)
        return torch.where(repeated[:, None].to(scores.device), scores, updated)

    def _tournament(self, scores: torch.Tensor, ctx_hash: torch.Tensor) -> torch.Tensor:
        """HF `update_scores`: softmax, then per layer p *= 1 + g - sum(g*p), then log (non-finite -> min)."""
        batch, vocab = scores.shape
        probs = torch.softmax(scores, dim=1)  # (B, V) over the full row, as HF
        flat = probs.reshape(-1)
        support = torch.nonzero(flat).squeeze(1)  # (S,) flat indices of p > 0
        dense = 2 * len(support) > len(flat)  # no filtering: index everything, skip the scatter
        rows = support // vocab
        if dense:  # (B, V) -> flat: every candidate of every row
            with_token = (ctx_hash[:, None] + torch.arange(vocab)).reshape(-1)
        else:
            with_token = ctx_hash[rows] + support % vocab
        # token hash * M per candidate; layer l's key adds key_terms[l] (see Watermark.__init__)
        base, terms = self.watermark.table_indices((with_token * MULTIPLIER + 1) * MULTIPLIER)
        table = self.watermark.table.to(scores.dtype)
        p = flat if dense else flat[support]
        prod = torch.zeros_like(flat)  # g*p over the full (B, V): zeros where p == 0, as in HF's product
        index = torch.empty_like(base)
        for term in terms:
            g = torch.index_select(
                table, 0, self.watermark.add_index(base, term, out=index)
            )  # (S,) float 0/1
            if dense:
                prod = g * p
            else:
                prod[support] = g * p
            mass = prod.view(batch, vocab).sum(dim=1)  # (B,) same values, same layout -> same sum as HF
            if dense:
                p = (p.view(batch, vocab) * (1 + g.view(batch, vocab) - mass[:, None])).view(-1)
            else:
                p = p * (1 + g - mass[rows])
        logp = torch.log(p)
        logp = torch.where(torch.isfinite(logp), logp, torch.finfo(scores.dtype).min)
        if dense:
            return logp.view(batch, vocab)
        out = torch.full_like(flat, torch.finfo(scores.dtype).min)  # log 0 = -inf -> min, as HF
        out[support] = logp
        return out.view(batch, vocab)


def update_scores(scores: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The tournament on dense g (B, V, depth): HF `update_scores`, op for op (the processor computes
    the same values with g hashed only where p > 0)."""
    probs = torch.softmax(scores, dim=1)
    for layer in range(g.shape[-1]):
        g_l = g[:, :, layer]
        mass = (g_l * probs).sum(dim=1, keepdim=True)  # (B, 1)
        probs = probs * (1 + g_l - mass)
    logp = torch.log(probs)
    return torch.where(torch.isfinite(logp), logp, torch.finfo(logp.dtype).min)


def watermark_processor(config: WatermarkConfig | Watermark) -> WatermarkProcessor:
    """A fresh processor (new state) for one generation request."""
    return WatermarkProcessor(config if isinstance(config, Watermark) else Watermark(config))


def expected_mean_g(vocab_size: int) -> float:
    """Mean g of one-layer watermarked samples from uniform logits: 0.5 + 0.25 (1 - 1/V) (HF's check)."""
    return 0.5 + 0.25 * (1 - 1 / vocab_size)


# ---- unsupervised scores -------------------------------------------------------------------------


def mean_score(g: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) mean of the masked g-values (0.5 expected without watermark); 0.5 for an empty mask."""
    count = mask.sum(dim=1).double() * g.shape[-1]
    total = (g.double() * mask[..., None]).sum(dim=(1, 2))
    return torch.where(count > 0, total / count.clamp(min=1), 0.5)


def weighted_mean_score(g: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) mean with layer weights linspace(10, 1, depth) scaled to sum to depth (synthid-text's)."""
    depth = g.shape[-1]
    weights = torch.linspace(10, 1, depth, dtype=torch.float64)
    return mean_score(g.double() * (weights * depth / weights.sum()), mask)


def p_value(g: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """Per row the exact one-sided P[X >= sum of masked g], X ~ Binomial(depth * positions, 1/2).

    Under H0 (no watermark) each unmasked g is a fair coin; the table's actual mean (32743/65536 for
    the default table) makes this slightly conservative. Exact big-integer tail sums: ~1 ms at 6000 bits.
    """
    ones = (g.long() * mask[..., None]).sum(dim=(1, 2)).tolist()
    trials = (mask.sum(dim=1) * g.shape[-1]).tolist()
    return [_binomial_tail(int(s), int(n)) for s, n in zip(ones, trials, strict=True)]


def _binomial_tail(s: int, n: int) -> float:
    """P[Binomial(n, 1/2) >= s], summing the shorter side of the distribution exactly."""
    if s <= 0:
        return 1.0
    if s > n:
        return 0.0
    upper = s > n // 2
    ks = range(s, n + 1) if upper else range(0, s)
    c = math.comb(n, ks[0])
    total = 0
    for k in ks:
        total += c
        c = c * (n - k) // (k + 1)
    return total / (1 << n) if upper else ((1 << n) - total) / (1 << n)


# ---- the Bayesian detector -----------------------------------------------------------------------


class BayesianDetector(nn.Module):
    """P(watermarked | g) from a learned watermarked likelihood (HF `BayesianDetectorModel`'s math).

    psi_tl = sigmoid(beta_l + sum_{j<l} delta_lj g_tj) (the chance layer l's match had two distinct
    tokens); P(g|w) = 0.5 ((g + 0.5) psi + 1 - psi), P(g|not w) = 0.5; the posterior is
    sigmoid(logit(clamp(prior)) + sum_t mask_t sum_l (log P(g|w) - log P(g|not w))). Valid only for the
    non-distortionary N=2 tournament with Bernoulli(1/2) g, i.e. this module's watermark.
    `delta` is applied through tril(delta, -1) instead of HF's tril of a repeated g: equal in exact
    arithmetic, ~1e-7 apart in float32, 30x less memory.
    """

    def __init__(self, depth: int, base_rate: float = 0.5, seed: int | None = None) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.depth = depth
        self.beta = nn.Parameter(-2.5 + 0.001 * torch.randn(1, 1, depth, generator=generator))
        self.delta = nn.Parameter(0.001 * torch.randn(1, 1, depth, depth, generator=generator))
        self.prior = nn.Parameter(torch.tensor([float(base_rate)]))  # trainable, as in HF

    def forward(self, g: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B,) posterior for g (B, T, depth) and mask (B, T)."""
        return torch.sigmoid(self.log_odds(g, mask))

    def log_odds(self, g: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B,) the posterior's logit: ranks texts like the posterior, without its float32 saturation
        (every text past ~17 nats reads 1.0), so thresholds at 1% FPR stay meaningful."""
        g = g.to(self.beta.dtype)
        lower = torch.tril(self.delta[0, 0], diagonal=-1)  # (depth, depth): layer l sees layers < l
        psi = torch.sigmoid(g @ lower.T + self.beta)  # (B, T, depth)
        watermarked = 0.5 * ((g + 0.5) * psi + (1 - psi))
        log_odds = torch.log(watermarked.clamp(min=1e-30)) - math.log(0.5)
        evidence = (log_odds * mask[..., None].to(g.dtype)).sum(dim=(1, 2))
        prior = self.prior.clamp(1e-5, 1 - 1e-5)
        return torch.log(prior) - torch.log(1 - prior) + evidence

    def loss(
        self, g: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, l2_weight: float
    ) -> torch.Tensor:
        """BCE on the clamped posterior + l2_weight * sum(delta^2) (HF's `loss_batch_weight`)."""
        out = self(g, mask).clamp(1e-5, 1 - 1e-5)
        bce = nn.functional.binary_cross_entropy(out, labels.to(out.dtype))
        return bce + l2_weight * (self.delta**2).sum()


def tpr_at_fpr(positive: torch.Tensor, negative: torch.Tensor, fpr: float = 0.01) -> float:
    """Share of positives scoring >= the (1 - fpr) quantile of the negatives (synthid-text's metric,
    numpy's linear-interpolated percentile). Pass -p_value to rank p-values this way."""
    threshold = torch.quantile(negative.double(), 1 - fpr)
    return float((positive.double() >= threshold).double().mean())


@dataclass(frozen=True)
class DetectorTraining:
    """How `train_detector` fits a `BayesianDetector` (synthid-text `detector_bayesian.py` defaults)."""

    epochs: int = 50  # full passes over the training split per L2 weight (reference: 50)
    learning_rate: float = 2.1e-2  # Adam step size (reference: 2.1e-2)
    batch_size: int = 64  # minibatch rows (reference: 64)
    l2_weights: tuple[float, ...] = (1e-3, 10 ** (-2 / 3 - 2), 10 ** (-1 / 3 - 2), 1e-2)  # logspace(-3,-2,4)
    validation_fraction: float = 0.3  # held out per class for model selection (reference test_size=0.3)
    seed: int = 0  # initialisation, split and minibatch order


@dataclass(frozen=True)
class TrainedDetector:
    """The selected detector and how it scored on the validation split."""

    detector: BayesianDetector  # parameters of the best (l2 weight, epoch) by validation TPR@1%FPR
    validation_tpr: float  # TPR at 1% FPR on the validation split of that detector
    l2_weight: float  # the winning L2 weight
    epoch: int  # the winning epoch (1-based; 0 = the initialisation)


def train_detector(positive: tuple[torch.Tensor, torch.Tensor], negative: tuple[torch.Tensor, torch.Tensor],
                   training: DetectorTraining = DetectorTraining()) -> TrainedDetector:  # fmt: skip
    """Fit a `BayesianDetector` on (g, mask) of watermarked (`positive`) and unwatermarked texts.

    Each class is split train / validation separately; every epoch of every L2 weight is scored by
    TPR at 1% FPR on validation and the best one wins (ties: the earliest), as the reference does,
    ranking by `log_odds` (the reference ranks by the posterior, which ties at 1.0 for long texts).
    """
    gen = torch.Generator().manual_seed(training.seed)

    def split(
        g: torch.Tensor, mask: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        order = torch.randperm(g.shape[0], generator=gen)
        n_val = max(1, round(training.validation_fraction * g.shape[0]))
        val, tr = order[:n_val], order[n_val:]
        if len(tr) == 0:
            raise WatermarkError(f"training texts: expected at least 2 per class, got {g.shape[0]}")
        return (g[tr], mask[tr]), (g[val], mask[val])

    (pg, pm), (vpg, vpm) = split(*positive)
    (ng, nm), (vng, vnm) = split(*negative)
    g, mask = _cat_padded(pg, ng), _cat_padded(pm, nm)
    labels = torch.cat((torch.ones(len(pg)), torch.zeros(len(ng))))
    depth = g.shape[-1]

    def validate(det: BayesianDetector) -> float:
        with torch.no_grad():
            return tpr_at_fpr(det.log_odds(vpg, vpm), det.log_odds(vng, vnm))

    best: TrainedDetector | None = None
    for l2 in training.l2_weights:
        det = BayesianDetector(depth, seed=int(torch.randint(0, 2**31, (1,), generator=gen)))
        opt = torch.optim.Adam(det.parameters(), lr=training.learning_rate)
        for epoch in range(training.epochs + 1):
            if epoch:
                for idx in torch.randperm(len(labels), generator=gen).split(training.batch_size):
                    opt.zero_grad()
                    det.loss(g[idx], mask[idx], labels[idx], l2).backward()
                    opt.step()
            tpr = validate(det)
            if best is None or tpr > best.validation_tpr:
                copy = BayesianDetector(depth)
                copy.load_state_dict(det.state_dict())
                best = TrainedDetector(copy, tpr, l2, epoch)
    assert best is not None
    return best


def _cat_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Concatenate along batch, right-padding the time dim (dim 1) with zeros (= masked out)."""
    width = max(a.shape[1], b.shape[1])
    a, b = (nn.functional.pad(x, [0, 0] * (x.dim() - 2) + [0, width - x.shape[1]]) for x in (a, b))
    return torch.cat((a, b))


DETECTOR_WEIGHTS, DETECTOR_META = "detector.safetensors", "detector.json"


def save_detector(detector: BayesianDetector, config: WatermarkConfig, out_dir: str | Path,
                  extra: dict[str, Any] | None = None) -> Path:  # fmt: skip
    """Write `out_dir/detector.safetensors` (beta, delta, prior) and `detector.json` (depth, ngram
    length, key fingerprint, `extra`), each atomically; the JSON last, so it names finished weights."""
    from safetensors.torch import save

    if detector.depth != config.depth:
        raise WatermarkError(f"detector depth {detector.depth} does not match the {config.depth} keys")
    out = Path(out_dir)
    tensors = {k: v.detach().contiguous().float() for k, v in detector.state_dict().items()}
    with atomic_open(out / DETECTOR_WEIGHTS, "wb") as f:
        f.write(save(tensors))
    meta = {"format": "gemmakit-synthid-bayesian-detector", "version": 1, "depth": config.depth,
            "ngram_len": config.ngram_len, "keys_fingerprint": config.fingerprint(), **(extra or {})}  # fmt: skip
    with atomic_open(out / DETECTOR_META) as f:
        f.write(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return out


def load_detector(path: str | Path, config: WatermarkConfig) -> BayesianDetector:
    """The detector saved in `path` (its directory or either file), checked against `config`'s keys."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    root = path if path.is_dir() else path.parent
    meta_path, weights_path = root / DETECTOR_META, root / DETECTOR_WEIGHTS
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        tensors = load_file(weights_path)
    except FileNotFoundError as e:
        raise WatermarkError(
            f"{e.filename or root}: no such detector file (see `watermark train-detector`)"
        ) from None
    except (ValueError, SafetensorError, OSError) as e:
        raise WatermarkError(f"{root}: not a readable detector ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(meta, dict) or meta.get("format") != "gemmakit-synthid-bayesian-detector":
        raise WatermarkError(f"{meta_path}: not a gemmakit SynthID detector (no format field)")
    if meta.get("keys_fingerprint") != config.fingerprint() or meta.get("ngram_len") != config.ngram_len:
        raise WatermarkError(f"{meta_path}: detector was trained for other keys (fingerprint "
                             f"{meta.get('keys_fingerprint')}, these keys give {config.fingerprint()})")  # fmt: skip
    detector = BayesianDetector(config.depth)
    try:
        detector.load_state_dict(tensors)
    except RuntimeError as e:
        raise WatermarkError(
            f"{weights_path}: weights do not fit depth {config.depth} ({str(e).splitlines()[0]})"
        ) from None
    return detector.eval()
