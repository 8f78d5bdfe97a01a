"""Quantization schemes: float matrix <-> packed integer tensors, and the pure-PyTorch dequantizer.

Where it sits: the bottom of `quantize`; `modules` packs weights with `quantize_matrix` and
`kernels` must reproduce `dequantize_matrix` bit for bit. Both schemes are weight-only: activations
stay float32 (bit-faithful to the dequantized weights, unlike llama.cpp's q8_0/q4_0, which also
round the activations to int8).

- int8: symmetric, one fp32 scale per output row: w = q * scale, q in [-127, 127]. 8.0 bits/weight.
- int4: asymmetric, per row and per group of `group_size` columns: w = q * s + m, q in [0, 15];
  s and m are bfloat16 packed into one int32 (`scale_min`: high half s, low half m, so the fp32
  values are `v & 0xFFFF0000` and `v << 16`). Each row is cut into blocks of 128 columns (the last
  may hold 32, 64 or 96); a block of B columns is D = B/8 little-endian uint32 lanes and column
  D*i + L is nibble i (bits 4i..4i+3) of lane L. A 16-lane SIMD load then gives columns 16i..16i+15
  with one shift and one mask (no byte shuffles): the kernels' int4 speed comes from this layout.
  4.5 bits/weight at group 64 (4 + 32/64), 5.0 at group 32.
- bf16: not quantized at all, the weight as bfloat16 (`qweight`, exactly a bf16 checkpoint's
  values), 16 bits/weight; it exists for the native bf16 x fp32 GEMV (`kernels`), which streams
  bf16 faster than PyTorch's bf16 F.linear on CPUs.

Key trade-off: int4 keeps a min per group (asymmetric, like q4_1 / gpt-fast) instead of q4_0's
symmetric absmax. Relative RMS weight error on N(0, 0.02) rows: int4 g32 7.8%, g64 9.0%, g128
10.0%, llama.cpp q4_0 (symmetric, block 32) 8.6%; int8 per row 0.83% (q8_0 0.53%; per-row scales
suffer more from outlier weights: 3.7% vs 0.86% on Student-t(3) rows). Group 64 is the default:
q4_0's bits per weight and roughly its error; its GEMV is 11-15% faster than group 32's and Gemma 1
2B decodes 6% faster (8.05 vs 7.59 tok/s; benchmarks/bench_quant_decode.py). Pass 32 for accuracy.
bf16 s and m (not fp16) cover any weight range; their 8-bit mantissa moves w by < 2% of a step.
"""

from __future__ import annotations

import torch

from gemmakit.errors import UserError

SCHEMES = ("int8", "int4", "bf16")
CHUNK = 32  # int4 columns must come in multiples of this; so must group sizes
BLOCK = 128  # int4 columns per packed block (see the layout above)
DEFAULT_GROUP_SIZE = 64  # int4; the measurement behind it is in the module docstring
_ROWS_PER_STEP = 4096  # quantize in row chunks: fp32 temporaries stay ~3 x 4096 x K x 4 bytes


class QuantError(UserError):
    """A quantization request or quantized checkpoint is invalid; the message is one line."""


def check_scheme(scheme: str, group_size: int | None) -> int | None:
    """The group size to use for `scheme` (None for int8 and bf16); bad arguments raise QuantError."""
    if scheme not in SCHEMES:
        raise QuantError(f"scheme: expected one of {SCHEMES}, got {scheme!r}")
    if scheme in ("int8", "bf16"):
        if group_size is not None:
            what = "one scale per output row" if scheme == "int8" else "no groups (weights kept as bf16)"
            raise QuantError(f"group_size: {scheme} uses {what}; expected None, got {group_size!r}")
        return None
    if group_size is None:
        return DEFAULT_GROUP_SIZE
    if (
        isinstance(group_size, bool)
        or not isinstance(group_size, int)
        or group_size <= 0
        or group_size % CHUNK
    ):
        raise QuantError(f"group_size: expected a positive multiple of {CHUNK} for int4, got {group_size!r}")
    return group_size


def check_shape(name: str, shape: tuple[int, ...], scheme: str, group_size: int | None) -> None:
    """A (out_features, in_features) matrix that `scheme` can hold, else QuantError naming `name`."""
    if len(shape) != 2:
        raise QuantError(f"{name}: expected a 2-D weight matrix, got shape {list(shape)}")
    if scheme == "int4" and shape[1] % group_size:
        raise QuantError(
            f"group_size: {group_size} does not divide in_features {shape[1]} of {name}; "
            f"use a multiple of {CHUNK} that divides every layer's in_features (e.g. {CHUNK})"
        )


def packed_shapes(shape: tuple[int, int], scheme: str, group_size: int | None) -> dict[str, tuple]:
    """{buffer name: (shape, dtype)} of the packed form of an (N, K) matrix."""
    n, k = shape
    if scheme == "int8":
        return {"qweight": ((n, k), torch.int8), "scales": ((n,), torch.float32)}
    if scheme == "bf16":
        return {"qweight": ((n, k), torch.bfloat16)}
    return {"qweight": ((n, k // 2), torch.uint8), "scale_min": ((n, k // group_size), torch.int32)}


def quantize_matrix(w: torch.Tensor, scheme: str, group_size: int | None) -> dict[str, torch.Tensor]:
    """Pack a float (N, K) matrix; rows are done in chunks so a 256000-row embedding needs no 3x copy."""
    if scheme == "bf16":  # round-to-nearest-even from fp32; a bf16 source is copied bit for bit
        return {"qweight": w.detach().to(torch.bfloat16, copy=True).contiguous()}
    n = w.shape[0]
    parts = [
        _quantize_rows(w[i : i + _ROWS_PER_STEP].float(), scheme, group_size)
        for i in range(0, n, _ROWS_PER_STEP)
    ]
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def _quantize_rows(w: torch.Tensor, scheme: str, group_size: int | None) -> dict[str, torch.Tensor]:
    if scheme == "int8":
        amax = w.abs().amax(dim=1)
        scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))  # an all-zero row keeps q = 0
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        return {"qweight": q, "scales": scales}
    n, k = w.shape
    wg = w.view(n, k // group_size, group_size)  # (N, groups, G)
    m = wg.amin(dim=-1).to(torch.bfloat16)
    s = ((wg.amax(dim=-1) - m.float()) / 15.0).to(torch.bfloat16)  # range measured from the rounded min
    s = torch.where(s > 0, s, torch.ones_like(s))  # a constant group is all q = 0, w = m
    q = torch.round((wg - m.float()[..., None]) / s.float()[..., None]).clamp(0, 15).to(torch.uint8)
    packed = pack_nibbles(q.view(n, k))
    scale_min = (s.view(torch.int16).to(torch.int32) << 16) | (m.view(torch.int16).to(torch.int32) & 0xFFFF)
    return {"qweight": packed, "scale_min": scale_min}


def _blocks(k: int) -> list[tuple[int, int, int]]:
    """(first column, number of blocks, lanes D per block) for the full 128-column blocks, then the tail."""
    full, tail = k // BLOCK, k % BLOCK
    return ([(0, full, BLOCK // 8)] if full else []) + ([(full * BLOCK, 1, tail // 8)] if tail else [])


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values in [0, 16) -> (N, K/2) uint8 in the block-lane layout (column D*i + L -> lane L, nibble i)."""
    n = q.shape[0]
    parts = []
    for c, nb, d in _blocks(q.shape[1]):
        b = q[:, c : c + nb * 8 * d].reshape(n, nb, 4, 2, d)  # (N, block, byte j, nibble h, lane L)
        byte = b[:, :, :, 0] | (b[:, :, :, 1] << 4)  # column d * (2j + h) + L
        parts.append(byte.permute(0, 1, 3, 2).reshape(n, nb * 4 * d))  # stored as byte 4L + j
    return torch.cat(parts, dim=1)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_nibbles`: (N, K/2) uint8 -> (N, K) uint8 in [0, 16)."""
    n = packed.shape[0]
    parts = []
    for c, nb, d in _blocks(packed.shape[1] * 2):
        b = packed[:, c // 2 : c // 2 + nb * 4 * d].reshape(n, nb, d, 4)  # (N, block, lane L, byte j)
        nib = torch.stack((b & 15, b >> 4), dim=-1)  # (N, block, L, j, h)
        parts.append(nib.permute(0, 1, 3, 4, 2).reshape(n, nb * 8 * d))  # column d * (2j + h) + L
    return torch.cat(parts, dim=1)


def unpack_scale_min(scale_min: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, m) as float32 from the packed int32 bfloat16 pairs."""
    return (scale_min & -65536).view(torch.float32), (scale_min << 16).view(torch.float32)


def dequantize_matrix(packed: dict[str, torch.Tensor], scheme: str, group_size: int | None) -> torch.Tensor:
    """The float32 (N, K) matrix the packed tensors stand for: the reference every kernel is checked against.

    int8 is one multiply; int4 is a multiply then an add (two roundings, never a fused multiply-add).
    Row slices of `packed` dequantize the same rows (the embedding lookup relies on it).
    """
    if scheme == "bf16":
        return packed["qweight"].float()
    q = packed["qweight"]
    if scheme == "int8":
        return q.float() * packed["scales"][..., None]
    n, k = q.shape[0], q.shape[1] * 2
    q = unpack_nibbles(q).view(n, k // group_size, group_size)
    s, m = unpack_scale_min(packed["scale_min"])
    return (q.float() * s[..., None] + m[..., None]).view(n, k)
