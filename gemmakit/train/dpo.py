"""Direct preference optimisation: the policy's completion log-probs against a frozen reference's.

Where it sits: `train.run` builds a `DPOLoss` around the policy for recipes with method "dpo" and
feeds it `pairs.PairBatches` that carry the reference's log-probs ("ref_logps"), computed once by
`reference_logps` before the first step and cached in the run directory.

Per pair (TRL's DPOTrainer, `loss_type` "sigmoid", the default), with log-probs summed over the
completion tokens (<end_of_turn> included, the prompt excluded, no length normalisation):

    delta = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r)),   loss = -log sigmoid(beta * delta)

"ipo": `((delta_c / |c| - delta_r / |r|) - 1 / (2 beta))^2`, each side's log-ratio averaged over its
completion tokens (TRL, as the IPO authors confirmed). At policy = reference delta is 0 and the
first step's loss ln 2: exactly when the reference pass batched the pairs as the step does, else up
to float32 rounding (~1e-6: on CPU a row's log-probs shift with its batch's padded width). Logged per pair: rewards/chosen `beta * delta_c`, rewards/rejected,
accuracy `mean(reward_c > reward_r)` (strict), margin, and the policy's summed log-probs.

Key trade-off: the reference's log-probs are computed once over the whole training set and cached
(`ref_logps.safetensors`, keyed by a hash of the reference weights and the data) instead of running
a frozen copy beside the policy at every step: no second model in memory and a third less compute
per step, for one pass over the data up front. The reference is frozen and deterministic, so the
numbers are those a live reference would give (up to batch composition, which on CPU float32
changes summation order only).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gemmakit.train import checkpoints as ckpt
from gemmakit.train.objectives import token_logps
from gemmakit.train.pairs import PairBatches, PairIds

log = logging.getLogger(__name__)

LOSSES = ("sigmoid", "ipo")


def completion_logps(model: nn.Module, tokens: torch.Tensor, completion_mask: torch.Tensor, chunk: int = 256
                     ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(summed log-probs of each row's completion tokens (B,), completion token counts (B,))."""
    logp, _ = token_logps(model, tokens, chunk=chunk)
    mask = completion_mask[:, 1:].to(logp.dtype)
    return (logp * mask).sum(-1), mask.sum(-1)


class DPOLoss(nn.Module):
    """The DPO objective around the policy, as a loss module for `loop.fit` (units: pairs)."""

    def __init__(self, model: nn.Module, beta: float = 0.1, loss: str = "sigmoid", chunk: int = 256) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")
        self.model, self.beta, self.loss, self.chunk = model, beta, loss, chunk

    unit_name = "pairs"  # the metrics key of the step's count

    @staticmethod
    def units(batch: dict[str, torch.Tensor]) -> int:
        return batch["tokens"].shape[0] // 2

    def forward(self, tokens: torch.Tensor, completion_mask: torch.Tensor, ref_logps: torch.Tensor,
                margin: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
        logps, counts = completion_logps(self.model, tokens, completion_mask, self.chunk)
        ratio = logps - ref_logps
        rc, rr = ratio.chunk(2)
        if self.loss == "sigmoid":
            loss = -F.logsigmoid(self.beta * (rc - rr))
        else:
            nc, nr = counts.clamp(min=1.0).chunk(2)
            loss = (rc / nc - rr / nr - 1 / (2 * self.beta)) ** 2
        wc, wr = (self.beta * rc).detach(), (self.beta * rr).detach()
        lc, lr = logps.detach().chunk(2)
        stats = {"rewards/chosen": wc.sum(), "rewards/rejected": wr.sum(), "rewards/accuracy": (wc > wr).float().sum(),
                 "rewards/margin": (wc - wr).sum(), "logps/chosen": lc.sum(), "logps/rejected": lr.sum()}  # fmt: skip
        return loss.sum(), stats


# ---- the reference's log-probs, once ---------------------------------------------------------------------


def data_key(pairs: list[PairIds]) -> str:
    """sha256 over every pair's ids: the cache is valid only for exactly this data."""
    h = hashlib.sha256()
    for p in pairs:
        for part in (p.prompt, p.chosen, p.rejected):
            h.update(len(part).to_bytes(4, "little"))
            h.update(torch.tensor(part, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def compute_reference_logps(reference: nn.Module, pairs: list[PairIds], *, pad_id: int, batch_size: int,
                            chunk: int = 256) -> torch.Tensor:  # fmt: skip
    """(N, 2) float32 summed completion log-probs of (chosen, rejected) under `reference`, in data order."""
    was = reference.training
    reference.eval()
    loader = PairBatches(pairs, min(batch_size, len(pairs)), pad_id=pad_id)  # its collate only
    out = []
    for s in range(0, len(pairs), batch_size):
        b = loader.collate(list(range(s, min(s + batch_size, len(pairs)))))
        logps, _ = completion_logps(reference, b["tokens"], b["completion_mask"], chunk)
        c, r = logps.chunk(2)
        out.append(torch.stack([c, r], 1))
    reference.train(was)
    return torch.cat(out).float()


def cached_reference_logps(path: Path, key: str, compute: Callable[[], torch.Tensor], *, write: bool = True
                           ) -> torch.Tensor:  # fmt: skip
    """The (N, 2) log-probs stored at `path` under `key`, or `compute()` (written there atomically when
    `write`: rank 0 of a distributed run; every rank computes the same numbers).

    A file with another key (other data or reference weights) or one that does not read is recomputed
    and replaced, with a warning: it is a cache, never a source of truth."""
    if path.is_file():
        try:
            t = ckpt.read_tensors(path)
            if set(t) == {"logps", "key"} and bytes(t["key"].tolist()).decode() == key:
                return t["logps"]
            log.warning("%s: made for other data or another reference; recomputing", path)
        except (ckpt.CheckpointError, UnicodeDecodeError, ValueError) as e:
            log.warning("%s: unreadable (%s); recomputing", path, e)
    logps = compute()
    if not write:
        return logps
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt.write_tensors(path, {"logps": logps, "key": torch.tensor(list(key.encode()), dtype=torch.uint8)})
    return logps
