"""Reward models: a Gemma with a scalar head, trained on preference pairs under Bradley-Terry.

Where it sits: `train.run` builds a `RewardLoss` for recipes with method "reward" and feeds it
`pairs.PairBatches`; `train.rl` scores rollouts with a loaded `RewardModel`; `gemmakit reward score`
scores a pair file. The saved form is transformers' `Gemma*ForSequenceClassification` directory
(num_labels 1): the decoder's tensors under their usual names plus `score.weight` (1, dim), so
`AutoModelForSequenceClassification.from_pretrained(dir)` gives the same scores.

Score: the bias-free head applied to the final-normed hidden state of the rightmost token whose id
is not the pad id, `(arange(T) * (ids != pad)).argmax(-1)` as transformers pools; with right-padded
rows that end at <end_of_turn> this is the last token of the model turn.

Loss per pair (TRL's RewardTrainer): `-log sigmoid(r_chosen - r_rejected - margin)` plus, with
`center_coef` c > 0, `c * (r_chosen + r_rejected)^2` (TRL: coefficient times the batch mean of the
squared sum, i.e. the same per-pair term), which keeps rewards near zero since the loss alone only
sees differences. Returned as a sum over pairs; the loop divides by the pairs of the whole step.

Key trade-off: the head starts from N(0, 0.02) (transformers' initializer_range) while the body
starts from the policy: the score is meaningless until trained, and a 1e-4 learning rate moves a
14M body far; recipes use ~1e-5 for full fine-tunes, as TRL's docs advise.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gemmakit.checkpoint import CheckpointError, load_model_with_heads, save_hf
from gemmakit.config import to_hf_dict
from gemmakit.model import Gemma
from gemmakit.tokenizer import Tokenizer

SCORE = "score.weight"  # transformers' name of the head
# Gemma generation -> transformers' sequence-classification class (model_type in config.json).
_HF_CLASS = {
    "gemma": "GemmaForSequenceClassification",
    "gemma2": "Gemma2ForSequenceClassification",
    "gemma3_text": "Gemma3TextForSequenceClassification",
}


class RewardModel(nn.Module):
    """tokens (B, T), right-padded with `pad_id` -> one score per row (B,) in float32."""

    def __init__(self, model: Gemma, score: torch.Tensor | None = None, *, pad_id: int = 0,
                 seed: int = 0) -> None:  # fmt: skip
        super().__init__()
        self.model, self.pad_id = model, pad_id
        dim = model.config.dim
        if score is None:
            g = torch.Generator().manual_seed(seed)
            score = torch.randn(1, dim, generator=g) * 0.02
        weight = model.embed.weight
        self.score = nn.Linear(dim, 1, bias=False, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.score.weight.copy_(score)

    @property
    def config(self):  # noqa: ANN201 (the Gemma's ModelConfig)
        return self.model.config

    def last_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B,) index of each row's rightmost non-pad token (transformers' pooling rule)."""
        t = torch.arange(tokens.shape[1], device=tokens.device)
        return (t * (tokens != self.pad_id)).argmax(-1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.model.hidden(tokens)  # (B, T, dim)
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        return self.score(hidden[rows, self.last_index(tokens)]).squeeze(-1).float()


class RewardLoss(nn.Module):
    """The Bradley-Terry pair loss as a loss module for `loop.fit` (units: pairs)."""

    def __init__(self, reward_model: RewardModel, center_coef: float = 0.0) -> None:
        super().__init__()
        self.reward_model, self.center_coef = reward_model, center_coef

    unit_name = "pairs"  # the metrics key of the step's count

    @staticmethod
    def units(batch: dict[str, torch.Tensor]) -> int:
        return batch["tokens"].shape[0] // 2

    def forward(self, tokens: torch.Tensor, completion_mask: torch.Tensor | None = None,
                margin: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
        r = self.reward_model(tokens)
        rc, rr = r.chunk(2)
        diff = rc - rr
        loss = -F.logsigmoid(diff if margin is None else diff - margin)
        if self.center_coef > 0:
            loss = loss + self.center_coef * (rc + rr) ** 2
        d = diff.detach()
        stats = {"accuracy": (d > 0).float().sum(), "margin": d.sum(), "reward_chosen": rc.detach().sum(),
                 "reward_rejected": rr.detach().sum()}  # fmt: skip
        return loss.sum(), stats


# ---- saving and loading -------------------------------------------------------------------------------


def hf_config(model: Gemma) -> dict:
    """config.json keys that make transformers build `Gemma*ForSequenceClassification` with one label."""
    model_type = to_hf_dict(model.config)["model_type"]
    return {"architectures": [_HF_CLASS[model_type]], "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0},
            "pad_token_id": 0}  # fmt: skip


def save_reward_model(rm: RewardModel, out: str | Path, tokenizer: Tokenizer | None = None, *,
                      overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:  # fmt: skip
    """An HF sequence-classification directory (config.json, model.safetensors, manifest.json)."""
    copy = [Path(tokenizer.source)] if tokenizer is not None else []
    out = save_hf(rm.model, out, dtype, overwrite=overwrite, heads={SCORE: rm.score.weight},
                  hf_config=hf_config(rm.model), copy_files=copy)  # fmt: skip
    return out


def load_reward_model(path: str | Path, dtype: torch.dtype | None = torch.float32, device: str = "cpu",
                      *, pad_id: int = 0) -> RewardModel:  # fmt: skip
    """A RewardModel from a sequence-classification directory; a causal LM (no score.weight) or a head
    with more than one label is a CheckpointError naming the file."""
    model, heads = load_model_with_heads(path, (SCORE,), dtype, device)
    score = heads[SCORE]
    if tuple(score.shape) != (1, model.config.dim):
        labels = f"{score.shape[0]} labels" if score.dim() == 2 else f"shape {list(score.shape)}"
        raise CheckpointError(f"{path}: {SCORE} has {labels}; a reward model has one label, shape "
                              f"[1, {model.config.dim}]")  # fmt: skip
    return RewardModel(model, score, pad_id=pad_id).eval()


@torch.no_grad()
def score_sequences(rm: RewardModel, sequences: list[list[int]], batch_size: int = 8) -> list[float]:
    """Scores of token-id sequences, `batch_size` right-padded rows per forward."""
    rm.eval()
    out: list[float] = []
    for s in range(0, len(sequences), batch_size):
        rows = sequences[s : s + batch_size]
        tokens = torch.full((len(rows), max(len(r) for r in rows)), rm.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        out += rm(tokens.to(rm.score.weight.device)).tolist()
    return out
