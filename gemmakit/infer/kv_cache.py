"""Preallocated key/value cache for incremental decoding: what `Gemma.forward(cache=...)` writes into.

Where it sits: built by `infer.engine` for one batch of prompts, handed to `model(..., cache=cache)`.
The model calls `cache.update(layer, k, v, positions)` once per layer per forward with the new
keys/values (B, n_kv_heads, T, head_dim) (after RoPE) and their positions (B, T), -1 marking left
padding; it gets back every key the new queries may need plus each key's position, and builds the
causal / sliding-window mask from positions alone, so slot order inside the cache does not matter.

Layout:
- GLOBAL layers: (B, n_kv_heads, max_len, head_dim) buffers; slot = tokens fed so far (every row
  advances together, so left padding takes slots too). One (B, max_len) position buffer, initialised
  to -1 ("never visible"), is shared by all global layers: they all write the same positions.
- LOCAL (sliding) layers: a ring of min(window, max_len) slots per layer with its own positions.
  `update` returns the ring as it was BEFORE this call concatenated with the new keys, then writes the
  last `window` new keys into the ring. That is exact for any chunk length T: a new query at position p
  needs keys in (p - window, p]; those older than this chunk are among the last `window` fed tokens.

Key trade-off: memory vs. copies. Global layers return views (no copy) but hold max_len slots each;
local layers hold only `window` slots (Gemma 3 4B at 32k context, window 1024: local layers use 3% of a
global layer's memory) but pay a (window + T)-key concatenation per step. Unused slots are zeros, not
`torch.empty` garbage: a masked key still goes through `p @ v`, and 0 * NaN would poison the row.
"""

from __future__ import annotations

import torch

from gemmakit.config import LOCAL, ModelConfig
from gemmakit.errors import UserError
from gemmakit.memory import check_fits


class CacheError(UserError):
    """A cache was given tensors that do not fit it (batch, shape, dtype, or capacity)."""


def _slot_bytes(cfg: ModelConfig, batch_size: int, dtype: torch.dtype) -> int:
    """Bytes of one token's keys + values in one layer, for the whole batch."""
    return 2 * batch_size * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize


def kv_cache_bytes(cfg: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype) -> int:
    """Bytes a `KVCache(cfg, batch_size, max_len, dtype)` allocates (k/v plus int64 positions)."""
    n_local = sum(t == LOCAL for t in cfg.layer_types)
    n_global = cfg.n_layers - n_local
    ring = min(cfg.sliding_window or max_len, max_len)
    kv = _slot_bytes(cfg, batch_size, dtype) * (n_global * max_len + n_local * ring)
    pos = 8 * batch_size * ((max_len if n_global else 0) + n_local * ring)
    return kv + pos


class KVCache:
    """Keys/values of `batch_size` rows, up to `max_len` tokens (padding included) per row."""

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        for name, value in (("batch_size", batch_size), ("max_len", max_len)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise CacheError(f"KVCache {name}: expected a positive integer, got {value!r}")
        if str(device or "cpu") != "meta":  # a cache larger than memory would be OOM-killed mid-zeroing
            need = kv_cache_bytes(config, batch_size, max_len, dtype)
            check_fits(f"a KV cache of {batch_size} x {max_len} tokens", need, str(device or "cpu"))
        self.config, self.batch_size, self.max_len, self.dtype = config, batch_size, max_len, dtype
        local = [t == LOCAL for t in config.layer_types]
        # layer -> index into the global stack or the local stack
        self._index = [sum(local[:i]) if local[i] else i - sum(local[:i]) for i in range(config.n_layers)]
        self._local = local
        n_local, n_global = sum(local), config.n_layers - sum(local)
        self.ring_len = min(config.sliding_window or max_len, max_len)
        kv_shape = (batch_size, config.n_kv_heads)
        d = config.head_dim
        zeros = dict(dtype=dtype, device=device)
        self.k_global = torch.zeros(n_global, *kv_shape, max_len if n_global else 0, d, **zeros)
        self.v_global = torch.zeros_like(self.k_global)
        self.pos_global = torch.full(
            (batch_size, max_len if n_global else 0), -1, dtype=torch.long, device=device
        )
        self.k_local = torch.zeros(n_local, *kv_shape, self.ring_len, d, **zeros)
        self.v_local = torch.zeros_like(self.k_local)
        self.pos_local = torch.full((n_local, batch_size, self.ring_len), -1, dtype=torch.long, device=device)
        self._fed = [0] * config.n_layers  # tokens written per layer; equal after every full forward

    @property
    def length(self) -> int:
        """Tokens fed so far (padding included), i.e. the next free global slot."""
        return min(self._fed)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache's buffers (equals `kv_cache_bytes` for the same arguments)."""
        bufs = (self.k_global, self.v_global, self.pos_global, self.k_local, self.v_local, self.pos_local)
        return sum(b.numel() * b.element_size() for b in bufs)

    def reset(self) -> None:
        """Forget every token; buffers are kept (stale k/v stay finite and are masked by position -1)."""
        self.pos_global.fill_(-1)
        self.pos_local.fill_(-1)
        self._fed = [0] * self.config.n_layers

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store new (B, n_kv, T, d) keys/values; return (k_all, v_all, key_positions) for this layer."""
        b, _, t, _ = k.shape
        start = self._fed[layer]
        if b != self.batch_size or positions.shape != (b, t):
            raise CacheError(
                f"KVCache.update layer {layer}: expected batch {self.batch_size} and positions (B, T)="
                f"{(b, t)}, got k {tuple(k.shape)} and positions {tuple(positions.shape)}"
            )
        if k.dtype != self.dtype:
            raise CacheError(
                f"KVCache.update layer {layer}: cache dtype is {self.dtype}, got keys in {k.dtype}"
            )
        if start + t > self.max_len:
            raise CacheError(f"KVCache full: {start} tokens fed + {t} new > max_len {self.max_len}")
        positions = positions.to(torch.long)
        self._fed[layer] = start + t
        if self._local[layer]:
            return self._update_ring(self._index[layer], start, k, v, positions)
        i, end = self._index[layer], start + t
        self.k_global[i, :, :, start:end] = k
        self.v_global[i, :, :, start:end] = v
        self.pos_global[:, start:end] = positions  # same values from every global layer
        return self.k_global[i, :, :, :end], self.v_global[i, :, :, :end], self.pos_global[:, :end]

    def _update_ring(
        self, i: int, start: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return ring_update(self.k_local[i], self.v_local[i], self.pos_local[i], start, k, v, positions)


def ring_update(
    ring_k: torch.Tensor,
    ring_v: torch.Tensor,
    ring_pos: torch.Tensor,
    start: int,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Write T new keys (token numbers start..start+T-1) into a sliding layer's ring of (B, n_kv, w, d)
    slots, token n at slot n % w; return the ring as it was before this call concatenated with the new
    keys (every key a new query may need), as (k_all, v_all, key_positions)."""
    if start == 0:  # empty ring: nothing older is visible, skip concatenating `window` dead keys
        k_all, v_all, pos_all = k, v, positions
    else:  # cat copies, so the writes below cannot change what we return
        k_all = torch.cat((ring_k, k), dim=2)  # (B, n_kv, ring + T, d)
        v_all = torch.cat((ring_v, v), dim=2)
        pos_all = torch.cat((ring_pos, positions), dim=1)  # (B, ring + T)
    t, w = k.shape[2], ring_k.shape[2]
    n = min(t, w)  # only the last `window` new keys can be seen by later queries
    first = (start + t - n) % w  # ring slot of token number (start + t - n)
    head = min(n, w - first)  # slots before the ring wraps around
    src = slice(t - n, t - n + head)
    ring_k[:, :, first : first + head] = k[:, :, src]
    ring_v[:, :, first : first + head] = v[:, :, src]
    ring_pos[:, first : first + head] = positions[:, src]
    if head < n:  # the wrapped remainder goes to the front of the ring
        ring_k[:, :, : n - head] = k[:, :, t - n + head :]
        ring_v[:, :, : n - head] = v[:, :, t - n + head :]
        ring_pos[:, : n - head] = positions[:, t - n + head :]
    return k_all, v_all, pos_all


class StaticKVCache(KVCache):
    """A KVCache whose one-token updates have fixed shapes and no Python-side state: `torch.compile`-able.

    Prefill (T > 1) works exactly as in `KVCache`. A one-token update writes at slot `self.slot` (a
    0-dim tensor; ring slot `slot % window`) with `index_copy_` and returns the WHOLE buffers: every
    global layer attends over max_len slots (unfilled ones carry position -1 and are masked), every
    local layer over its full ring, written first (the key it overwrites is `window` tokens old, out
    of reach already). Shapes never change between steps, so a compiled decode step compiles once.
    The caller (the engine) calls `advance()` after each one-token forward; the cache does not count
    one-token updates itself, because a Python counter read inside a compiled graph would be guarded
    and recompile every step. Cost: global layers read max_len keys per step instead of `length`
    (at 256 tokens of context this is noise next to the weights; at 8k it is 2x the attention work).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.slot = torch.zeros((), dtype=torch.long, device=self.k_global.device)

    def reset(self) -> None:
        super().reset()
        self.slot.zero_()

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if k.shape[2] != 1:
            out = super().update(layer, k, v, positions)
            if layer == self.config.n_layers - 1:
                self.slot.fill_(self.length)
            return out
        i, slot = self._index[layer], self.slot.view(1)
        positions = positions.to(torch.long)
        if self._local[layer]:
            ring = torch.remainder(slot, self.ring_len)
            self.k_local[i].index_copy_(2, ring, k)
            self.v_local[i].index_copy_(2, ring, v)
            self.pos_local[i].index_copy_(1, ring, positions)
            return self.k_local[i], self.v_local[i], self.pos_local[i]
        self.k_global[i].index_copy_(2, slot, k)
        self.v_global[i].index_copy_(2, slot, v)
        self.pos_global.index_copy_(1, slot, positions)
        return self.k_global[i], self.v_global[i], self.pos_global

    def advance(self, n: int = 1) -> None:
        """Account for `n` one-token steps fed through the static path."""
        if self.length + n > self.max_len:
            raise CacheError(f"KVCache full: {self.length} tokens fed + {n} new > max_len {self.max_len}")
        self._fed = [f + n for f in self._fed]
        self.slot += n
