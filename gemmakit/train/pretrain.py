"""Pretraining data: packed token shards -> next-token micro-batches.

Where it sits: `train.run` builds `ShardBatches` for recipes with method "pretrain" from a shard
directory (`gemmakit shards`, or the data pipeline's output: the format of `data.shards`); the loop
trains on rows of seq_len + 1 tokens with the plain next-token objective (every target counts).

Key trade-off: evaluation batches come from a loader with a fixed seed, rebuilt for every
evaluation, so every eval sees the same rows and val losses are comparable across steps and runs,
at the cost of re-reading those rows (a few MB) each time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from gemmakit.data.loader import PackedLoader
from gemmakit.data.shards import Shards
from gemmakit.tokenizer import Tokenizer


class ShardBatches:
    """`data.loader.PackedLoader` rows as {"tokens": (B, seq_len + 1)} batches, resumable."""

    def __init__(self, path: str | Path, seq_len: int, batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, tokenizer: Tokenizer | None = None) -> None:  # fmt: skip
        self.shards = Shards.open(path)
        if tokenizer is not None:
            self.shards.check_tokenizer(tokenizer)
        self.loader = PackedLoader(
            self.shards, seq_len, batch_size, seed=seed, rank=rank, world_size=world_size
        )

    def next_batch(self) -> dict[str, torch.Tensor]:
        return {"tokens": self.loader.next_batch()}

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


def eval_batches(path: str | Path, seq_len: int, batch_size: int, n_batches: int, *, rank: int = 0,
                 world_size: int = 1) -> Iterator[dict[str, torch.Tensor]]:  # fmt: skip
    """The same `n_batches` held-out batches every call (seed 0, first epoch)."""
    loader = PackedLoader(Shards.open(path), seq_len, batch_size, seed=0, rank=rank, world_size=world_size)
    for _ in range(n_batches):
        yield {"tokens": loader.next_batch()}
