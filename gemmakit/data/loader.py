"""PackedLoader: deterministic, resumable, rank-disjoint packing of token shards into training rows.

Where it sits: `data.shards.Shards` (memory-mapped documents) -> `PackedLoader` -> `train.loop`. Each
batch is a LongTensor (batch_size, seq_len + 1): inputs are [:, :-1], targets [:, 1:]. There is no
padding: every position is a real token.

Order. Epoch e visits every document once, in `torch.randperm(n_docs)` drawn from a torch.Generator
seeded by (seed, e), and packs them into one global stream of rows that does not depend on the
number of ranks. Rank r of world_size takes rows r, r + world_size, ... of that stream, so at every
step W ranks with batch B hold exactly the rows one process with batch B x W would (the distributed
training test compares their losses), and no row goes to two ranks. Every rank walks the whole
stream but copies tokens only for its own rows: the skipped rows cost index arithmetic, not reads.
The loader is infinite: epochs follow each other, and a row may hold the end of one epoch and the
start of the next. The permutation comes from torch's CPU randperm, so it is fixed for a torch
version; a different torch may order documents differently (refusing such a resume is the caller's job).

Packing rules (rows of L = seq_len + 1 tokens, filled with documents in that order):
- every row starts at a document start (its BOS), except rows that continue a long document (below);
- a document that fits in the space left in the row is placed whole;
- a document of at most L tokens that does not fit is cut to fill the row; its remainder is DROPPED
  (counted in `stats["tokens_dropped"]`, `stats["docs_cut"]`), so no row starts in the middle of a
  short document. Expected loss is about half a document per row: ~6% of tokens for 250-token
  documents at L = 2049, ~50% when documents are as long as rows;
- a document longer than L is never cut short: it fills the rest of the current row, then continues
  in the next rows (which then start mid-document, without BOS) until its last token, after which
  the next document follows in the same row. Pieces do not overlap, so each of its tokens is in
  exactly one row; the (last token of a row, first token of the next) pair is not a training target
  (1 pair in 2048 at seq_len 2048). `stats["docs_split"]` counts these documents.

Key trade-off: sequential packing over best-fit packing. Best-fit (as in nanochat) wastes fewer tokens
but needs a buffer of pending documents in the resume state; here the position (epoch, index into the
rank's share of the permutation, token offset into a long document) is the whole state: resuming costs
one randperm of n_docs (~0.1 s for 10M documents), never a scan from the epoch start, and each step
costs O(batch_size * documents per row). Nothing is read ahead, so `load_state_dict` can come at any
time before the next batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from gemmakit.data.shards import Shards
from gemmakit.errors import UserError

STATE_VERSION = 1
# Fields of the state that must equal the loader's own: resuming under other values would change the
# data each rank sees. n_docs / n_tokens catch a different shard set behind the same path.
_FIXED = ("seed", "rank", "world_size", "seq_len", "batch_size", "n_docs", "n_tokens")
_POSITION = ("epoch", "pos", "offset", "step")
_STATS = ("rows", "docs", "docs_cut", "docs_split", "tokens_dropped")


class LoaderError(UserError):
    """Invalid loader arguments or a resume state that does not fit this loader; the message is one line."""


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed for (seed, epoch): hashed, so (0, 1) and (1, 0) do not collide."""
    digest = hashlib.sha256(f"gemmakit.data.loader:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class PackedLoader:
    """Infinite iterator of packed (batch_size, seq_len + 1) LongTensor batches for one rank.

    `epoch` is the epoch of the next document to be read; `step` counts batches produced. `stats`
    holds counters: rows, docs (finished or cut), docs_cut, docs_split, tokens_dropped.
    """

    def __init__(self, shards: Shards, seq_len: int, batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:  # fmt: skip
        if not isinstance(shards, Shards):
            raise LoaderError(f"shards: expected a Shards (use Shards.open), got {type(shards).__name__}")
        for name, v, low in (
            ("seq_len", seq_len, 1),
            ("batch_size", batch_size, 1),
            ("world_size", world_size, 1),
        ):
            if not _is_int(v) or v < low:
                raise LoaderError(f"{name}: expected an int >= {low}, got {v!r}")
        if not _is_int(rank) or not 0 <= rank < world_size:
            raise LoaderError(f"rank: expected an int in [0, world_size={world_size}), got {rank!r}")
        if not _is_int(seed):
            raise LoaderError(f"seed: expected an int, got {seed!r}")
        if shards.n_docs < world_size:
            raise LoaderError(
                f"{shards.path}: {shards.n_docs} documents cannot be split over {world_size} ranks"
            )
        self.shards, self.seq_len, self.batch_size = shards, seq_len, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = self.step = 0
        self._pos = 0  # index into the epoch's permutation
        self._offset = 0  # tokens of document `_pos` already placed (> 0 only for a long document)
        self.stats = dict.fromkeys(_STATS, 0)
        self._order: np.ndarray | None = None
        self._order_epoch = -1

    def _epoch_docs(self, epoch: int) -> np.ndarray:
        """The document ids of `epoch`, in order (cached for the current epoch)."""
        if self._order_epoch != epoch:
            g = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
            self._order = torch.randperm(self.shards.n_docs, generator=g).numpy()
            self._order_epoch = epoch
        assert self._order is not None
        return self._order

    def _fill_row(self, row: np.ndarray | None) -> None:
        """Fill `row` (L tokens) from the current position, following the packing rules; None only
        advances the position (another rank's row)."""
        width, filled = self.seq_len + 1, 0
        while filled < width:
            order = self._epoch_docs(self.epoch)
            shard, start, end = self.shards.doc_span(int(order[self._pos]))
            a = start + self._offset
            take = min(end - a, width - filled)
            if row is not None:
                row[filled : filled + take] = self.shards.tokens(shard, a, a + take)
            filled += take
            if a + take < end and end - start > width:  # long document: continue in the next row
                self._offset += take
                continue
            if a + take < end:  # short document cut at the row's end: drop its remainder
                self.stats["docs_cut"] += 1
                self.stats["tokens_dropped"] += end - a - take
            self.stats["docs"] += 1
            self.stats["docs_split"] += int(end - start > width)
            self._pos, self._offset = self._pos + 1, 0
            if self._pos == len(order):
                self.epoch, self._pos = self.epoch + 1, 0
        self.stats["rows"] += 1

    def next_batch(self) -> torch.Tensor:
        """The next (batch_size, seq_len + 1) int64 batch of this rank (stats count the global stream)."""
        rows = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)
        for row in rows:
            for r in range(self.world_size):
                self._fill_row(row if r == self.rank else None)
        self.step += 1
        return torch.from_numpy(rows)

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.next_batch()

    def _fixed(self) -> dict[str, int]:
        s = self.shards
        return {"seed": self.seed, "rank": self.rank, "world_size": self.world_size, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "n_docs": s.n_docs, "n_tokens": s.n_tokens}  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """The exact position, as plain JSON-serialisable ints (a few hundred bytes)."""
        position = {"epoch": self.epoch, "pos": self._pos, "offset": self._offset, "step": self.step}
        return {"version": STATE_VERSION, **self._fixed(), **position, "stats": dict(self.stats)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at `state`'s position; LoaderError (one line, naming the field) if it does not fit."""
        if not isinstance(state, dict):
            raise LoaderError(f"loader state: expected a dict, got {type(state).__name__}")
        keys = {"version", *_FIXED, *_POSITION, "stats"}
        if set(state) != keys:
            missing, unknown = sorted(keys - set(state)), sorted(set(state) - keys)
            raise LoaderError(f"loader state: missing keys {missing}, unknown keys {unknown}")
        if state["version"] != STATE_VERSION:
            raise LoaderError(f"loader state: version {state['version']!r}, expected {STATE_VERSION}")
        for key, mine in self._fixed().items():
            if state[key] != mine:
                raise LoaderError(f"loader state: {key} is {state[key]!r} in the saved state but {mine!r} in "
                                  "this loader; resuming would change the data order")  # fmt: skip
        stats = state["stats"]
        if not isinstance(stats, dict) or set(stats) != set(_STATS) or not all(map(_is_int, stats.values())):
            raise LoaderError(f"loader state: stats must map {list(_STATS)} to ints, got {stats!r}")
        for key in _POSITION:
            if not _is_int(state[key]) or state[key] < 0:
                raise LoaderError(f"loader state: {key} must be a non-negative int, got {state[key]!r}")
        order = self._epoch_docs(state["epoch"])
        if state["pos"] >= len(order):
            raise LoaderError(f"loader state: pos {state['pos']} is past the epoch's {len(order)} documents")
        _, start, end = self.shards.doc_span(int(order[state["pos"]]))
        if state["offset"] and not (end - start > self.seq_len + 1 and state["offset"] < end - start):
            raise LoaderError(f"loader state: offset {state['offset']} does not fall inside a long document")
        self.epoch, self._pos, self._offset, self.step = (state[k] for k in _POSITION)
        self.stats = dict(stats)
