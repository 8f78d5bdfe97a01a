"""Data: sources, filters, dedup and decontamination (the pipeline), token shards and the training loader.

Where it sits: corpus -> `pipeline` (sources -> filters -> dedup -> decontam -> kept JSONL + token shards)
-> `Shards.open` -> `PackedLoader` -> train.loop. `tokenize_to_shards` / `ShardWriter` write shards
directly; the shard format is documented in `shards`.

Names resolve lazily: pipeline workers import only what they use, so a spawned worker does not pay
for torch (about 1.2 s) unless it needs the loader.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

_LAZY = {
    "LoaderError": "gemmakit.data.loader",
    "PackedLoader": "gemmakit.data.loader",
    "ShardError": "gemmakit.data.shards",
    "ShardWriter": "gemmakit.data.shards",
    "Shards": "gemmakit.data.shards",
    "dtype_for_vocab": "gemmakit.data.shards",
    "tokenize_to_shards": "gemmakit.data.shards",
}
__all__ = ["LoaderError", "PackedLoader", "ShardError", "ShardWriter", "Shards", "dtype_for_vocab",
           "tokenize_to_shards"]  # fmt: skip

if TYPE_CHECKING:
    from gemmakit.data.loader import LoaderError, PackedLoader
    from gemmakit.data.shards import ShardError, Shards, ShardWriter, dtype_for_vocab, tokenize_to_shards


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'gemmakit.data' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
