"""Training losses: next-token cross-entropy, computed chunk by chunk over the sequence.

Where it sits: `train.loop` calls an objective on each micro-batch; `pretrain` and `sft` choose which
one and build the batches. An objective returns the SUM of per-token losses and the number of
tokens it covers, never a mean: the loop divides by the tokens of the whole optimizer step (every
micro-batch and every rank), so gradient accumulation and data parallelism give the gradient of the
same global mean (the bug of litgpt#1073 / torchtune#2307 was averaging per micro-batch).

Key trade-off: the (dim x V) output head runs on `chunk` positions at a time under activation
checkpointing, so at most (B, chunk, V) float32 logits exist at once, in the forward and in the
backward: with Gemma's 256k vocabulary, B=8, T=2048 that is 0.5 GB per 64-position chunk instead of
16.8 GB for (B, T, V). The price is one extra head matmul per chunk in the backward (recompute).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE = -100  # target id that contributes no loss (padding, prompt tokens under SFT)
# Below this many bytes of float32 logits the head runs in one piece without recompute: the nano
# model's 16 x 256 x 8192 logits (134 MB) train 6% faster that way (1,500 -> 1,590 tokens/s).
WHOLE_LOGITS_BYTES = 256 << 20


def head_rows(model: nn.Module) -> int:
    """Vocabulary size of `model`'s output head (its config's, for a Gemma)."""
    return model.config.vocab_size


def _chunk_loss(head: torch.nn.Module, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()  # (B, c, V): the softmax runs in float32 even under bf16 autocast
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")


def chunked_cross_entropy(model: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                          chunk: int = 256) -> torch.Tensor:  # fmt: skip
    """Sum over positions of -log p(target) from final hidden states (B, T, dim); IGNORE targets skipped.

    `model.head` maps hidden states to logits; it is applied to `chunk` positions at a time.
    """
    b, t, _ = hidden.shape
    if b * t * head_rows(model) * 4 <= WHOLE_LOGITS_BYTES:  # small vocab or batch: one piece, no recompute
        return _chunk_loss(model.head, hidden, targets)
    total = hidden.new_zeros((), dtype=torch.float32)
    for t0 in range(0, t, chunk):
        h, y = hidden[:, t0 : t0 + chunk], targets[:, t0 : t0 + chunk]
        if not (y != IGNORE).any():
            continue
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(_chunk_loss, model.head, h, y, use_reentrant=False)
        else:
            total = total + _chunk_loss(model.head, h, y)
    return total


def targets_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Targets (B, T) of rows `batch["tokens"]` (B, T+1): tokens[:, 1:], IGNORE where `loss_mask` is 0."""
    targets = batch["tokens"][:, 1:].clone()
    if "loss_mask" in batch:
        targets[~batch["loss_mask"][:, 1:].bool()] = IGNORE
    return targets


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry loss in `batch` (known before any forward, so the loop can normalise)."""
    return int((targets_of(batch) != IGNORE).sum())


class NextTokenLoss(nn.Module):
    """The model plus its loss as one module: forward(batch) -> sum of per-token losses.

    Pretraining counts every target; SFT batches carry `loss_mask` (1 on model turns). Wrapping the
    loss into the module's forward lets DDP and FSDP2 see one forward per micro-batch (their hooks
    run in `__call__`), while the head still runs chunk by chunk on hidden states.
    """

    units = staticmethod(count_targets)  # the loop normalises by the target tokens of the whole step

    def __init__(self, model: nn.Module, chunk: int = 256) -> None:
        super().__init__()
        self.model, self.chunk = model, chunk

    def forward(self, tokens: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch = {"tokens": tokens} if loss_mask is None else {"tokens": tokens, "loss_mask": loss_mask}
        hidden = self.model.hidden(tokens[:, :-1])  # (B, T, dim)
        return chunked_cross_entropy(self.model, hidden, targets_of(batch), self.chunk)


# ---- per-token log-probabilities (DPO, RL) ---------------------------------------------------------------


def _chunk_logps(head: nn.Module, h: torch.Tensor, targets: torch.Tensor, temperature: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(log p(target), entropy) per position of one chunk; logits in float32, divided by `temperature`
    first (the distribution sampling drew from), log p as logit - logsumexp (TRL's selective_log_softmax)."""
    logits = head(h).float()
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    with torch.no_grad():  # entropy is logged, never trained on
        probs = torch.softmax(logits, dim=-1)
        entropy = lse - (probs * logits).sum(-1)
    return logp, entropy


def token_logps(model: nn.Module, tokens: torch.Tensor, *, temperature: float = 1.0, chunk: int = 256
                ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(log p(tokens[:, t+1] | tokens[:, :t+1]), entropy) for t < T-1: two (B, T-1) float32 tensors.

    The head runs `chunk` positions at a time under activation checkpointing when the (B, T, V) logits
    would exceed WHOLE_LOGITS_BYTES, as in `chunked_cross_entropy`. Rows are right-padded; callers mask."""
    hidden = model.hidden(tokens[:, :-1])
    targets = tokens[:, 1:]
    b, t, _ = hidden.shape
    if b * t * head_rows(model) * 4 <= WHOLE_LOGITS_BYTES:
        return _chunk_logps(model.head, hidden, targets, temperature)
    parts = []
    for t0 in range(0, t, chunk):
        h, y = hidden[:, t0 : t0 + chunk], targets[:, t0 : t0 + chunk]
        if torch.is_grad_enabled() and h.requires_grad:
            parts.append(checkpoint(_chunk_logps, model.head, h, y, temperature, use_reentrant=False))
        else:
            parts.append(_chunk_logps(model.head, h, y, temperature))
    return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)
