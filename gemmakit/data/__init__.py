"""Data: token shards on disk (`shards`) and the packing training loader (`loader`).

Where it sits: text -> tokenizer -> `tokenize_to_shards` / `ShardWriter` -> shard directory ->
`Shards.open` -> `PackedLoader` -> train.loop. The shard format is documented in `shards`.
"""

from __future__ import annotations

from gemmakit.data.loader import LoaderError, PackedLoader
from gemmakit.data.shards import ShardError, Shards, ShardWriter, dtype_for_vocab, tokenize_to_shards

__all__ = [
    "LoaderError",
    "PackedLoader",
    "ShardError",
    "ShardWriter",
    "Shards",
    "dtype_for_vocab",
    "tokenize_to_shards",
]
