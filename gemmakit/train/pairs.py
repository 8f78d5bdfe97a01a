"""Preference pairs as token ids and padded batches, shared by the reward model and DPO.

Where it sits: `data.preference` reads TRL-format JSONL into `PreferencePair`s; `encode_pairs` renders
each with `chat.render` into (prompt ids, chosen completion ids, rejected completion ids);
`PairBatches` stacks B pairs as 2B right-padded rows, the chosen half first (TRL's collators do the
same), for `train.reward` (pooled score) and `train.dpo` (summed completion log-probabilities).

A completion is everything after the prompt's "<start_of_turn>model\\n" header up to and including
its last <end_of_turn>: the "\\n" the template puts after that token is not part of it, since
generation stops at <end_of_turn> (chat.py's loss mask makes the same choice). TRL's Gemma template
scores that "\\n" too; the parity tests therefore feed both sides the same ids.

Key trade-off: a pair whose prompt + completion is longer than data.seq_len tokens is dropped (and
counted), not cut: a cut completion has another log-probability and a reward model would score a
token that is not the end of the answer (TRL's RewardTrainer drops too; its DPO cuts).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from gemmakit.chat import ChatError, render
from gemmakit.data.preference import PreferencePair
from gemmakit.errors import UserError
from gemmakit.tokenizer import Tokenizer
from gemmakit.train.sft import ChatBatches

log = logging.getLogger(__name__)


class PairDataError(UserError):
    """A preference pair cannot be used for training; the message names the file and the pair."""


@dataclass(frozen=True)
class PairIds:
    """One preference pair as ids: the shared prompt and the two completions that follow it."""

    prompt: list[int]  # through "<start_of_turn>model\n"
    chosen: list[int]  # ends with <end_of_turn>
    rejected: list[int]
    margin: float | None = None


def completion_ids(tokenizer: Tokenizer, prompt: list[dict], completion: list[dict], prompt_ids: list[int],
                   where: str) -> list[int]:  # fmt: skip
    """Ids of `completion` after `prompt_ids` in the rendered conversation, without the final "\\n"."""
    try:
        full = render(tokenizer, [*prompt, *completion], add_generation_prompt=False).tokens
    except ChatError as e:
        raise PairDataError(f"{where}: {e}") from None
    if full[: len(prompt_ids)] != prompt_ids:  # cannot happen with chat.render's piecewise ids
        raise PairDataError(f"{where}: the prompt's ids are not a prefix of the conversation's")
    newline = tokenizer.encode("\n", bos=False)
    out = full[len(prompt_ids) :]
    return out[: len(out) - len(newline)] if out[len(out) - len(newline) :] == newline else out


def encode_pairs(pairs: list[PreferencePair], tokenizer: Tokenizer, source: str = "<data>") -> list[PairIds]:
    """Every pair rendered with Gemma's chat template (the prompt with its generation header)."""
    out = []
    for i, pair in enumerate(pairs):
        where = f"{source}: pair {i + 1}"
        try:
            prompt_ids = render(tokenizer, list(pair.prompt), add_generation_prompt=True).tokens
        except ChatError as e:
            raise PairDataError(f"{where}: prompt: {e}") from None
        chosen = completion_ids(
            tokenizer, list(pair.prompt), list(pair.chosen), prompt_ids, f"{where}: chosen"
        )
        rejected = completion_ids(tokenizer, list(pair.prompt), list(pair.rejected), prompt_ids,
                                  f"{where}: rejected")  # fmt: skip
        out.append(PairIds(prompt_ids, chosen, rejected, pair.margin))
    return out


def drop_long(pairs: list[PairIds], seq_len: int, source: str) -> list[PairIds]:
    """The pairs whose two sequences both fit in seq_len tokens; a warning counts the others."""
    kept = [p for p in pairs if len(p.prompt) + max(len(p.chosen), len(p.rejected)) <= seq_len]
    if len(kept) < len(pairs):
        log.warning("%s: %d of %d pairs are longer than data.seq_len = %d tokens and are dropped", source,
                    len(pairs) - len(kept), len(pairs), seq_len)  # fmt: skip
    if not kept:
        raise PairDataError(f"{source}: every pair is longer than data.seq_len = {seq_len} tokens")
    return kept


class PairBatches(ChatBatches):
    """B pairs per micro-batch as {"tokens" (2B, W), "completion_mask" (2B, W)} plus "margin" (B,) when
    the data has margins and "ref_logps" (2B,) when reference log-probs are attached (DPO).

    Rows 0..B-1 are prompt + chosen, rows B..2B-1 prompt + rejected, right-padded with `pad_id`; the
    order, rank split and resume state are ChatBatches' (seeded per-epoch permutation)."""

    def __init__(self, pairs: list[PairIds], batch_size: int, *, pad_id: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, ref_logps: torch.Tensor | None = None) -> None:  # fmt: skip
        width = max(len(p.prompt) + max(len(p.chosen), len(p.rejected)) for p in pairs)
        self.ref_logps = ref_logps  # (N, 2): reference log-probs of (chosen, rejected) per pair
        self.has_margin = any(p.margin is not None for p in pairs)
        super().__init__(list(range(len(pairs))), width, batch_size, pad_id=pad_id, seed=seed, rank=rank,
                         world_size=world_size)  # fmt: skip
        self.pairs = pairs

    def too_long(self, example: object) -> bool:
        return False  # drop_long already removed them

    def collate(self, items: list) -> dict[str, torch.Tensor]:
        pairs = [self.pairs[i] for i in items]
        rows = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
        width = max(len(a) + len(b) for a, b in rows)
        tokens = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (prompt, completion) in enumerate(rows):
            tokens[r, : len(prompt) + len(completion)] = torch.tensor(prompt + completion)
            mask[r, len(prompt) : len(prompt) + len(completion)] = 1
        batch = {"tokens": tokens, "completion_mask": mask}
        if self.has_margin:
            batch["margin"] = torch.tensor([p.margin or 0.0 for p in pairs], dtype=torch.float32)
        if self.ref_logps is not None:
            idx = torch.tensor(items)
            batch["ref_logps"] = torch.cat([self.ref_logps[idx, 0], self.ref_logps[idx, 1]])
        return batch
