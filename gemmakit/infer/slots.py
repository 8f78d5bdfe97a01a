"""Per-request KV cache rows for continuous batching: `SlotCache`, what `infer.batching` decodes into.

Where it sits: the same `update(layer, k, v, positions)` contract as `kv_cache.KVCache` (the model
cannot tell them apart), built once by the batcher for the server's lifetime. Unlike `KVCache`,
whose rows advance in lockstep from one shared prompt batch, each of the `n_slots` rows here has its
own length: a request joins by prefilling its own row while the others wait between two decode steps,
and leaves at any token. Every row starts at position 0 with no padding, so token number n of a row
sits at global slot n and at ring slot n % window of the sliding layers.

A forward first `bind(start, stop)`s a contiguous range of rows; the batcher keeps the rows that are
decoding packed at the front (`swap`), so a decode step binds rows [0, A) and every buffer it reads
is a view, never a gather. Rows past A keep the keys of finished requests: a later request whose
tokens start with the same ids (the next turn of a conversation) reuses that row and prefills only
the rest (`keepable` says how much of it can be kept).

Key trade-off: memory is reserved up front for n_slots x max_len tokens (the server's `--parallel`
and `--ctx-size`), so a request never fails for want of cache once admitted and nothing is allocated
per token; the price is that idle slots hold memory, and a decode step attends over the longest bound
row's length for every row (masked slots cost compute: rows of 100 and 1000 tokens both read 1000).
"""

from __future__ import annotations

import torch

from gemmakit.config import LOCAL, ModelConfig
from gemmakit.infer.kv_cache import CacheError, kv_cache_bytes, ring_update
from gemmakit.memory import check_fits


def _pad_keys(part: tuple[torch.Tensor, ...], width: int) -> tuple[torch.Tensor, ...]:
    """(1, n_kv, S, d) keys, values and (1, S) positions padded to S = width with zeros at position -1."""
    k, v, pos = part
    extra = width - k.shape[2]
    if extra == 0:
        return k, v, pos
    zk = k.new_zeros(*k.shape[:2], extra, k.shape[3])
    return torch.cat((k, zk), 2), torch.cat((v, zk), 2), torch.cat((pos, pos.new_full((1, extra), -1)), 1)


class SlotCache:
    """`n_slots` independent rows of up to `max_len` tokens each, for a `Gemma` model's forward."""

    def __init__(
        self,
        config: ModelConfig,
        n_slots: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        for name, value in (("n_slots", n_slots), ("max_len", max_len)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise CacheError(f"SlotCache {name}: expected a positive integer, got {value!r}")
        check_fits(f"a KV cache of {n_slots} x {max_len} tokens", kv_cache_bytes(config, n_slots, max_len, dtype),
                   str(device or "cpu"))  # fmt: skip
        self.config, self.n_slots, self.max_len, self.dtype = config, n_slots, max_len, dtype
        local = [t == LOCAL for t in config.layer_types]
        self._local = local
        self._index = [sum(local[:i]) if local[i] else i - sum(local[:i]) for i in range(config.n_layers)]
        n_local, n_global = sum(local), config.n_layers - sum(local)
        self.ring_len = min(config.sliding_window or max_len, max_len)
        zeros = dict(dtype=dtype, device=device)
        kv = (n_slots, config.n_kv_heads)
        self.k_global = torch.zeros(n_global, *kv, max_len if n_global else 0, config.head_dim, **zeros)
        self.v_global = torch.zeros_like(self.k_global)
        self.pos_global = torch.full(
            (n_slots, max_len if n_global else 0), -1, dtype=torch.long, device=device
        )
        self.k_local = torch.zeros(n_local, *kv, self.ring_len, config.head_dim, **zeros)
        self.v_local = torch.zeros_like(self.k_local)
        self.pos_local = torch.full((n_local, n_slots, self.ring_len), -1, dtype=torch.long, device=device)
        self.lengths = [0] * n_slots  # tokens held per row
        self._bound = (0, 0)
        self._valid: list[int] | None = None
        self._new = 0  # tokens the bound forward adds per row (set by the first layer)

    # ---- the forward's side ----------------------------------------------------------------------
    def bind(self, start: int, stop: int, valid: list[int] | None = None) -> None:
        """The next forward feeds rows [start, stop), in that order, as its batch. For a multi-token
        forward, `valid[j]` is how many of row j's tokens are real: they are LEFT-padded (position -1,
        never stored), so every row's last column is a real token (None: all are real)."""
        if not 0 <= start < stop <= self.n_slots:
            raise CacheError(f"SlotCache.bind: rows [{start}, {stop}) outside [0, {self.n_slots})")
        if valid is not None and len(valid) != stop - start:
            raise CacheError(f"SlotCache.bind: valid has {len(valid)} counts for {stop - start} rows")
        self._bound, self._valid = (start, stop), valid

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store new (B, n_kv, T, d) keys/values of the bound rows; return this layer's visible keys."""
        start, stop = self._bound
        b, _, t, _ = k.shape
        if b != stop - start or positions.shape != (b, t):
            raise CacheError(f"SlotCache.update layer {layer}: bound rows [{start}, {stop}) take B = "
                             f"{stop - start}, got k {tuple(k.shape)} and positions {tuple(positions.shape)}")  # fmt: skip
        valid = self._valid if t > 1 and self._valid is not None else [t] * b
        if any(not 1 <= n <= t for n in valid):
            raise CacheError(f"SlotCache.update layer {layer}: valid counts {valid} must be in [1, {t}]")
        if k.dtype != self.dtype:
            raise CacheError(
                f"SlotCache.update layer {layer}: cache dtype is {self.dtype}, got keys in {k.dtype}"
            )
        lengths = self.lengths[start:stop]
        if max(n + m for n, m in zip(lengths, valid, strict=True)) > self.max_len:
            raise CacheError(f"SlotCache full: a row holds {max(lengths)} tokens + {max(valid)} new > "
                             f"max_len {self.max_len}")  # fmt: skip
        positions = positions.to(torch.long)
        i = self._index[layer]
        if self._local[layer]:
            out = self._update_ring(i, start, stop, lengths, valid, k, v, positions)
        else:
            out = self._update_global(i, start, stop, lengths, valid, k, v, positions)
        if layer == self.config.n_layers - 1:  # the forward is complete: the rows grow
            for j, r in enumerate(range(start, stop)):
                self.lengths[r] += valid[j]
        return out

    def _update_global(self, i: int, start: int, stop: int, lengths: list[int], valid: list[int], k: torch.Tensor,
                       v: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:  # fmt: skip
        t = k.shape[2]
        if t == 1:  # one token per row, each at its own slot: advanced indexing over (row, slot)
            rows = torch.arange(start, stop, device=k.device)
            slots = torch.tensor(lengths, device=k.device)
            self.k_global[i][rows, :, slots] = k[:, :, 0]
            self.v_global[i][rows, :, slots] = v[:, :, 0]
            self.pos_global[rows, slots] = positions[:, 0]
        else:  # each row's real (last valid[j]) tokens go to its own slots; padding is not stored
            for j, (at, n) in enumerate(zip(lengths, valid, strict=True)):
                self.k_global[i, start + j, :, at : at + n] = k[j, :, t - n :]
                self.v_global[i, start + j, :, at : at + n] = v[j, :, t - n :]
                self.pos_global[start + j, at : at + n] = positions[j, t - n :]
        end = max(n + m for n, m in zip(lengths, valid, strict=True))
        return (
            self.k_global[i, start:stop, :, :end],
            self.v_global[i, start:stop, :, :end],
            self.pos_global[start:stop, :end],
        )

    def _update_ring(self, i: int, start: int, stop: int, lengths: list[int], valid: list[int], k: torch.Tensor,
                     v: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:  # fmt: skip
        t = k.shape[2]
        if t > 1:  # prefill chunks: per row, exact for any chunk length (see kv_cache.ring_update)
            parts = []
            for j, (at, n) in enumerate(zip(lengths, valid, strict=True)):
                sl = slice(start + j, start + j + 1)
                parts.append(ring_update(self.k_local[i, sl], self.v_local[i, sl], self.pos_local[i, sl], at,
                                         k[j : j + 1, :, t - n :], v[j : j + 1, :, t - n :],
                                         positions[j : j + 1, t - n :]))  # fmt: skip
            if len(parts) == 1:
                return parts[0]
            width = max(p[0].shape[2] for p in parts)  # rows see different key counts: pad, masked by -1
            ks, vs, ps = zip(*(_pad_keys(p, width) for p in parts), strict=True)
            return torch.cat(ks), torch.cat(vs), torch.cat(ps)
        # One token per row: write first, then return the whole ring. The key it overwrites is token
        # n - ring_len, out of a query at n's window (ring_len == window) or never written (ring_len ==
        # max_len), so no copy is needed.
        rows = torch.arange(start, stop, device=k.device)
        slots = torch.tensor([n % self.ring_len for n in lengths], device=k.device)
        self.k_local[i][rows, :, slots] = k[:, :, 0]
        self.v_local[i][rows, :, slots] = v[:, :, 0]
        self.pos_local[i][rows, slots] = positions[:, 0]
        return self.k_local[i, start:stop], self.v_local[i, start:stop], self.pos_local[i, start:stop]

    # ---- the scheduler's side --------------------------------------------------------------------
    def keepable(self, row: int, keep: int) -> bool:
        """Whether `row` can be cut back to its first `keep` tokens and decode on exactly.

        Global layers always can. A sliding layer's ring holds only the row's last ring_len tokens, and
        the next query (position keep) needs tokens keep - window + 1 .. keep - 1: they are still there
        if the ring never wrapped, or if at most one token is cut.
        """
        n = self.lengths[row]
        if not 0 <= keep <= n:
            return False
        return keep == 0 or not any(self._local) or n <= self.ring_len or n - keep <= 1

    def truncate(self, row: int, keep: int) -> None:
        """Forget every token of `row` after its first `keep` (0: empty the row)."""
        if not self.keepable(row, keep):
            raise CacheError(
                f"SlotCache.truncate: row {row} of {self.lengths[row]} tokens cannot keep {keep}"
            )
        self.pos_global[row, keep:] = -1
        ring = self.pos_local[:, row]
        ring.masked_fill_(ring >= keep, -1)
        self.lengths[row] = keep

    def swap(self, a: int, b: int) -> None:
        """Exchange rows a and b in every buffer (the scheduler keeps decoding rows at the front)."""
        if a == b:
            return
        for buf, dim in ((self.k_global, 1), (self.v_global, 1), (self.pos_global, 0), (self.k_local, 1),
                         (self.v_local, 1), (self.pos_local, 1)):  # fmt: skip
            ia, ib = buf.select(dim, a), buf.select(dim, b)
            tmp = ia.clone()
            ia.copy_(ib)
            ib.copy_(tmp)
        self.lengths[a], self.lengths[b] = self.lengths[b], self.lengths[a]

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers (equals `kv_cache_bytes(config, n_slots, max_len, dtype)`)."""
        bufs = (self.k_global, self.v_global, self.pos_global, self.k_local, self.v_local, self.pos_local)
        return sum(x.numel() * x.element_size() for x in bufs)
