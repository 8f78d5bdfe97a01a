"""Inference: KV cache, sampler and the prefill/decode engine (token ids in, token ids out).

Where it sits: after `model`/`checkpoint`/`quantize`, before `cli`/`server`. Nothing here knows
about tokenization; see `engine` for the trade-offs of batched, left-padded decoding.
"""

from gemmakit.infer.engine import Engine, GenerationError
from gemmakit.infer.kv_cache import CacheError, KVCache, StaticKVCache, kv_cache_bytes
from gemmakit.infer.sampler import SamplingError, sample

__all__ = [
    "CacheError",
    "Engine",
    "GenerationError",
    "KVCache",
    "SamplingError",
    "StaticKVCache",
    "kv_cache_bytes",
    "sample",
]
