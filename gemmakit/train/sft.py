"""Supervised fine-tuning data: chat JSONL -> rendered conversations -> padded, masked micro-batches.

Where it sits: `train.run` builds `ChatBatches` for recipes with method "sft"; the loop trains on
them with the same next-token objective as pretraining, counting only targets whose loss mask is 1
(the model turns and their <end_of_turn>, as `chat.render` marks them).

Input: one JSON object per line, either `{"messages": [{"role": "user"|"assistant"|"model"|"system",
"content": str}, ...]}` (the common chat format), `{"prompt": str, "completion": str}` (one user
turn and one model turn), or TRL's pre-tokenized form `{"input_ids": [int, ...], "completion_mask":
[0|1, ...]}` for text outside the chat template (the ShieldGemma classifier prompt of
`gemmakit.safety`: its answer token is the only 1). A bad line is an `SFTDataError` naming file:line.

Batching: padding, not packing. Each micro-batch takes `batch_size` conversations in a seeded
per-epoch order and right-pads them to the longest (pad id, loss mask 0); right padding under a
causal mask cannot change any real position's logits, so a conversation's loss is the same in any
batch. Packing would waste no compute on pads (measured on the nano chat data, ~30% of tokens are
padding at batch 16) but lets conversations attend to each other unless the model masks across
documents; padding keeps the loss exact. Conversations longer than seq_len + 1 tokens are cut (the
count is in `stats`); the recipe should choose seq_len so this is rare.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from gemmakit.chat import ChatError, render
from gemmakit.errors import UserError
from gemmakit.jsonl import read_jsonl
from gemmakit.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class SFTDataError(UserError):
    """A chat JSONL file or line is unusable; the message names file:line and what was expected."""


@dataclass(frozen=True)
class PreTokenized:
    """A pre-tokenized example: token ids and the 0/1 mask of the targets to train on."""

    input_ids: list[int]
    completion_mask: list[int]
    where: str  # file:line, for errors found once the tokenizer is known


def read_chat_jsonl(path: str | Path) -> list[list[dict] | PreTokenized]:
    """Conversations (lists of {"role", "content"}) or pre-tokenized examples from a chat JSONL file."""
    return [_messages(obj, where) for obj, where in read_jsonl(path, SFTDataError, "chat")]


def _int_list(obj: dict, key: str, where: str) -> list[int]:
    value = obj[key]
    if not isinstance(value, list) or not value or not all(type(v) is int for v in value):
        raise SFTDataError(f"{where}: {key}: expected a non-empty list of integers")
    return value


def _messages(obj: object, where: str) -> list[dict] | PreTokenized:
    if isinstance(obj, dict) and "input_ids" in obj:
        if set(obj) != {"input_ids", "completion_mask"}:
            raise SFTDataError(
                f"{where}: a pre-tokenized row has exactly the keys input_ids and completion_mask"
            )
        ids, mask = _int_list(obj, "input_ids", where), _int_list(obj, "completion_mask", where)
        if len(mask) != len(ids) or not set(mask) <= {0, 1}:
            raise SFTDataError(
                f"{where}: completion_mask: expected {len(ids)} values of 0 or 1, one per input id"
            )
        return PreTokenized(ids, mask, where)
    if isinstance(obj, dict) and "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
            raise SFTDataError(f"{where}: messages: expected a list of {{role, content}} objects")
        return msgs
    if isinstance(obj, dict) and "prompt" in obj and "completion" in obj:
        if not isinstance(obj["prompt"], str) or not isinstance(obj["completion"], str):
            raise SFTDataError(f"{where}: prompt and completion must be strings")
        return [{"role": "user", "content": obj["prompt"]}, {"role": "model", "content": obj["completion"]}]
    raise SFTDataError(f'{where}: expected {{"messages": [...]}} or {{"prompt": ..., "completion": ...}}')


def encode_conversations(convs: list[list[dict] | PreTokenized], tokenizer: Tokenizer, source: str = "<data>"
                         ) -> list[tuple[list[int], list[int]]]:  # fmt: skip
    """(tokens, loss_mask) per conversation, via `chat.render` (no generation prompt: training data);
    pre-tokenized rows pass through once their ids are checked against the tokenizer."""
    out = []
    for i, msgs in enumerate(convs):
        if isinstance(msgs, PreTokenized):
            bad = next((t for t in msgs.input_ids if not 0 <= t < tokenizer.vocab_size), None)
            if bad is not None:
                raise SFTDataError(f"{msgs.where}: input_ids: {bad} is outside the tokenizer's "
                                   f"{tokenizer.vocab_size} pieces")  # fmt: skip
            if not any(msgs.completion_mask):
                raise SFTDataError(f"{msgs.where}: completion_mask has no 1: nothing to learn from")
            out.append((msgs.input_ids, msgs.completion_mask))
            continue
        try:
            r = render(tokenizer, msgs, add_generation_prompt=False)
        except ChatError as e:
            raise SFTDataError(f"{source}: conversation {i + 1}: {e}") from None
        if not any(r.loss_mask):
            raise SFTDataError(f"{source}: conversation {i + 1}: no model turn to learn from")
        out.append((r.tokens, r.loss_mask))
    return out


class ChatBatches:
    """Padded, masked micro-batches over encoded conversations: deterministic, rank-disjoint, resumable.

    Epoch e visits conversations in a permutation seeded by (seed, e); global micro-batch j takes
    permutation slots [j*B*W, (j+1)*B*W) and rank r the slots r, r+W, ... of those, so W ranks with
    batch B see exactly the conversations one process with batch B*W sees, step for step.
    """

    def __init__(self, examples: list[tuple[list[int], list[int]]], seq_len: int, batch_size: int, *,
                 pad_id: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:  # fmt: skip
        if len(examples) < batch_size * world_size:
            raise SFTDataError(f"{len(examples)} conversations cannot fill one global batch of "
                               f"{batch_size} x {world_size} ranks")  # fmt: skip
        self.examples, self.seq_len, self.batch_size = examples, seq_len, batch_size
        self.pad_id, self.seed, self.rank, self.world_size = pad_id, seed, rank, world_size
        self.epoch, self.position = 0, 0  # position: global permutation slots consumed this epoch
        self.stats = {"truncated": sum(self.too_long(e) for e in examples)}
        self._order = self._permutation(0)

    def too_long(self, example: tuple[list[int], list[int]]) -> bool:
        """Whether `collate` will cut this example (counted in `stats`)."""
        return len(example[0]) > self.seq_len + 1

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.examples), generator=g).tolist()

    def next_indices(self) -> list[int]:
        """The example indices of this rank's next micro-batch (advancing the order)."""
        span = self.batch_size * self.world_size
        if self.position + span > len(self._order):  # the remainder is dropped: every batch is full
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        slots = self._order[self.position : self.position + span][self.rank :: self.world_size]
        self.position += span
        return slots

    def next_batch(self) -> dict[str, torch.Tensor]:
        return self.collate([self.examples[i] for i in self.next_indices()])

    def collate(self, items: list) -> dict[str, torch.Tensor]:
        cut = [(t[: self.seq_len + 1], m[: self.seq_len + 1]) for t, m in items]
        width = max(len(t) for t, _ in cut)
        tokens = torch.full((len(cut), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(cut), width), dtype=torch.long)
        for row, (t, m) in enumerate(cut):
            tokens[row, : len(t)] = torch.tensor(t)
            mask[row, : len(m)] = torch.tensor(m)
        return {"tokens": tokens, "loss_mask": mask}

    def epoch_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Every conversation once, in file order (evaluation); rank r takes every W-th batch."""
        span = self.batch_size
        starts = list(range(0, len(self.examples), span))[self.rank :: self.world_size]
        for s in starts:
            yield self.collate(self.examples[s : s + span])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "batch_size": self.batch_size, "n": len(self.examples)}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "rank", "world_size", "batch_size", "n"):
            if state.get(key) != self.state_dict()[key]:
                raise SFTDataError(f"loader state: {key} is {state.get(key)!r}, this run has "
                                   f"{self.state_dict()[key]!r}")  # fmt: skip
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)


def split_holdout(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held out): a seeded `fraction` of examples held out, the same for every rank."""
    if fraction <= 0:
        return examples, []
    g = torch.Generator().manual_seed(seed + 7919)
    order = torch.randperm(len(examples), generator=g).tolist()
    n_val = max(1, round(fraction * len(examples)))
    held = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]
