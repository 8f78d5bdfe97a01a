"""Quantized matrix products: a JIT-built C++ kernel when a compiler exists, pure PyTorch otherwise.

Where it sits: between `schemes` (the packed layouts and the reference dequantizer) and `modules`
(QLinear / QEmbedding call `matmul`). Decode (few activation rows) streams the packed weights once
through the native GEMV; prefill (M > `GEMV_MAX_ROWS` rows) dequantizes row tiles to fp32 and runs
MKL's fp32 GEMM. Measured (bench_kernels.py, 2-core AVX-512 Xeon, 2 threads, 16384x2048 weights
streamed from DRAM): int8 1.78 ms = 18.9 GB/s, int4 g64 1.42 ms = 23.6 Gweights/s, against fp32
F.linear 5.16 ms, bf16 3.95 ms, aten _weight_int8pack_mm 2.78 ms (bf16 activations; 15.0 ms with
fp32), a torch.compile'd dequantize-GEMV 3.7 ms (int8) / 4.8 ms (int4). The bf16 scheme's GEMV
(bf16 weights widened by a shift, fp32 FMA): 2.6 ms = 25.7 GB/s vs bf16 F.linear 3.4 ms = 19.7 GB/s
and fp32 F.linear 4.8 ms = 28.3 GB/s (same bytes per weight as bf16 F.linear, half of fp32's);
its prefill uses the bf16 GEMM where AMX / AVX512-BF16 make it fast (`_BF16_GEMM`), and so does
int8 / int4 prefill, on tiles dequantized straight to bf16; `bf16_prefill(False)` (or
`GEMMAKIT_BF16_PREFILL=0`) keeps every product in fp32 at about 3x the prefill time.

Build: `qgemv_src.SOURCE` is compiled with the system C++ compiler (`$CXX`, g++, c++ or clang++;
~1-3 s, no torch headers) into `$GEMMAKIT_CACHE_DIR` (default `~/.cache/gemmakit/kernels`), named
by a hash of the source, flags, compiler version and the CPU's feature flags, so a cache shared
between different CPUs never runs `-march=native` code on the wrong one. The library is written
under a temp name and renamed, so concurrent first builds are safe. Any failure (no compiler,
build error, unwritable cache) logs ONE warning and falls back to PyTorch: the same results up to
float32 summation order, decode several times slower. `GEMMAKIT_KERNELS=torch` forces the fallback.

Key trade-off: ctypes + a plain shared library instead of a torch C++ extension: a ~1-3 s build
instead of ~30 s (torch/extension.h), paid for by checking shapes, dtypes and contiguity in Python
before raw pointers are handed over (`check`; a wrong pointer is a crash, not an error).
Threads: OpenMP, which resolves to the libgomp torch already loaded (same soname), so
`torch.set_num_threads` governs the kernels too.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

from gemmakit.quantize.qgemv_src import SOURCE
from gemmakit.quantize.schemes import dequantize_matrix, packed_shapes

log = logging.getLogger(__name__)

ABI = 4  # must equal gk_abi() in SOURCE; bump with any change of the exported C signatures
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off"]
OPENMP = ["-fopenmp"]  # dropped (single-threaded kernels) if the compiler has no OpenMP, e.g. Apple clang
# Activation rows up to which the native GEMV beats dequantizing tiles + MKL fp32 GEMM. Measured on
# the 2-core AVX-512 Xeon, weights from DRAM (bench_kernels, 16384x2048, ms): M=32 int8 10.6 vs 20.8,
# int4 g64 15.2 vs 20.6; M=64 int8 20.4 vs 27.6 but int4 29.0 vs 26.1; M=128 the GEMM wins both.
# AVX2 halves the GEMV's arithmetic rate, hence a lower bound there; scalar wins at a few rows only.
GEMV_MAX_ROWS = {"avx512": 32, "avx2": 16, "scalar": 4}
# bf16 prefill: MKL-DNN's bf16 GEMM (AMX / AVX512-BF16) on bf16-rounded activations instead of fp32
# tiles. 128x2048 @ 16384x2048 on the 2-core Xeon (AMX): 6.1-6.6 ms vs 35-39 ms for bf16 -> fp32 tiles
# + fp32 GEMM (60 ms upcasting the whole matrix); the price is activations rounded to bf16 (relative
# error 2.3e-3 vs 3.4e-7). Without AMX / AVX512-BF16, bf16 GEMM is emulated and slow: fp32 tiles then.
_BF16_GEMM_HW = any(
    getattr(torch.cpu, f, lambda: False)() for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
)
# int8 / int4 prefill takes the same GEMM on tiles dequantized straight to bf16 (2048 rows x K=2048,
# 8 MB): 128x2048 @ 16384x2048 int8 10.0 ms, int4 11.2 ms, vs 34.7 / 36.2 ms through fp32 tiles, at
# the same 2.9e-3 relative error from rounding the activations. Its GEMV crossover is lower (ms, M
# rows, 16384x2048 / 2048x16384): int8 M=24 6.5/7.4 vs 7.0/9.0, M=32 9.2/9.9 vs 7.2/9.6; int4 M=16
# 6.5/6.8 vs 8.4/9.3, M=24 9.7/10.2 vs 8.4/9.9.
GEMV_MAX_ROWS_BF16_TILES = {"int8": 24, "int4": 16}
_BF16_GEMM = _BF16_GEMM_HW and os.environ.get("GEMMAKIT_BF16_PREFILL", "1") != "0"
# Rows up to which the bf16 GEMV beats that bf16 GEMM (16384x2048, ms): M=4 2.7 vs 3.9, M=8 4.4 vs 3.6.
BF16_GEMV_MAX_ROWS = 4
TILE_BYTES = 16 << 20  # fp32 bytes dequantized per prefill tile: bounds the temporary, stays in cache
BF16_TILE_BYTES = 8 << 20  # bf16 tile: 2048 x 2048 measured fastest (10.0 ms; 1024 rows 13.4, 4096 11.4)

_vp, _i64, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {
    "gk_q8_gemv": [_vp, _i64, _i64, _vp, _vp, _i64, _vp, _int],
    "gk_q4_gemv": [_vp, _i64, _i64, _vp, _vp, _i64, _i64, _vp, _int],
    "gk_q8_dequant": [_vp, _vp, _i64, _i64, _i64, _vp, _int],
    "gk_q4_dequant": [_vp, _vp, _i64, _i64, _i64, _i64, _vp, _int],
    "gk_bf16_gemv": [_vp, _i64, _i64, _vp, _i64, _vp, _int],
    "gk_q8_dequant_bf16": [_vp, _vp, _i64, _i64, _i64, _vp, _int],
    "gk_q4_dequant_bf16": [_vp, _vp, _i64, _i64, _i64, _i64, _vp, _int],
}
_state: dict[str, object] = {}  # "native": Kernels or None once tried; "why": reason for the fallback
_scratch = threading.local()  # per-thread prefill tile buffer: a fresh 16 MB tensor per call page-faults


def check(packed: dict[str, torch.Tensor], scheme: str, shape: tuple[int, int], group: int | None) -> None:
    """ValueError unless `packed` holds contiguous CPU tensors of exactly the scheme's shapes and dtypes."""
    for name, (want, dtype) in packed_shapes(shape, scheme, group).items():
        t = packed[name]
        if t.device.type != "cpu" or t.dtype != dtype or tuple(t.shape) != want or not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous CPU {dtype} tensor of shape {want}, "
                             f"got {t.dtype} {tuple(t.shape)} on {t.device}")  # fmt: skip


class Kernels:
    """One loaded build of SOURCE; every call checks its tensors before passing pointers."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        if lib.gk_abi() != ABI:
            raise RuntimeError(f"{path}: kernel ABI {lib.gk_abi()}, expected {ABI}")
        for name, args in _SIGNATURES.items():
            getattr(lib, name).argtypes, getattr(lib, name).restype = args, None
        lib.gk_isa.restype = ctypes.c_char_p
        self.lib, self.path, self.isa = lib, path, lib.gk_isa().decode()

    def gemv(self, x: torch.Tensor, packed: dict[str, torch.Tensor], scheme: str, shape: tuple[int, int],
             group: int | None) -> torch.Tensor:  # fmt: skip
        """(M, K) float32 @ W^T -> (M, N) float32, streaming the packed weights once."""
        check(packed, scheme, shape, group)
        (n, k), m = shape, x.shape[0]
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2 or x.shape[1] != k:
            raise ValueError(f"x: expected a CPU float32 (M, {k}) tensor, got {x.dtype} {tuple(x.shape)}")
        x, y, threads = x.contiguous(), torch.empty(m, n), torch.get_num_threads()
        if scheme == "bf16":
            self.lib.gk_bf16_gemv(x.data_ptr(), m, k, packed["qweight"].data_ptr(), n, y.data_ptr(), threads)
        elif scheme == "int8":
            self.lib.gk_q8_gemv(x.data_ptr(), m, k, packed["qweight"].data_ptr(), packed["scales"].data_ptr(), n, y.data_ptr(), threads)  # fmt: skip
        else:
            self.lib.gk_q4_gemv(x.data_ptr(), m, k, packed["qweight"].data_ptr(), packed["scale_min"].data_ptr(), group, n, y.data_ptr(), threads)  # fmt: skip
        return y

    def dequantize(self, packed: dict[str, torch.Tensor], scheme: str, shape: tuple[int, int], group: int | None,
                   r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Rows r0:r1 of the matrix into `out` (float32, bit-equal to `schemes.dequantize_matrix`, or
        bfloat16, those values rounded to nearest-even); a new float32 tensor when `out` is None."""
        check(packed, scheme, shape, group)
        (n, k), threads = shape, torch.get_num_threads()
        out = torch.empty(r1 - r0, k) if out is None else out
        if not (0 <= r0 <= r1 <= n and out.shape == (r1 - r0, k) and out.is_contiguous()
                and out.dtype in (torch.float32, torch.bfloat16)):  # fmt: skip
            raise ValueError(f"dequantize: rows {r0}:{r1} of {n} into out {out.dtype} {tuple(out.shape)}")
        bf16 = "_bf16" if out.dtype == torch.bfloat16 else ""
        if scheme == "bf16":  # widening bf16 is exact; torch's copy kernel is vectorized already
            out.copy_(packed["qweight"][r0:r1])
        elif scheme == "int8":
            getattr(self.lib, f"gk_q8_dequant{bf16}")(packed["qweight"].data_ptr(), packed["scales"].data_ptr(), r0, r1, k, out.data_ptr(), threads)  # fmt: skip
        else:
            getattr(self.lib, f"gk_q4_dequant{bf16}")(packed["qweight"].data_ptr(), packed["scale_min"].data_ptr(), r0, r1, k, group, out.data_ptr(), threads)  # fmt: skip
        return out


# ---- building ------------------------------------------------------------------------------------


def cache_dir() -> Path:
    if os.environ.get("GEMMAKIT_CACHE_DIR"):
        return Path(os.environ["GEMMAKIT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gemmakit" / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compile(cxx: str, arch: list[list[str]], out: Path) -> None:
    """Compile SOURCE into `out` atomically, with the first `arch` flag set the compiler accepts."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    src = Path(tmp_name).with_suffix(".cpp")
    try:
        src.write_text(SOURCE)
        errors = []
        for extra in arch:
            cmd = [cxx, *FLAGS, *extra, str(src), "-o", tmp_name]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if proc.returncode == 0:
                os.replace(tmp_name, out)
                return
            errors.append((proc.stderr.strip().splitlines() or ["?"])[-1])
        raise RuntimeError(f"{cxx} failed: {errors[0]}")
    finally:
        for p in (Path(tmp_name), src):
            p.unlink(missing_ok=True)


def build(march: str = "native") -> Kernels:
    """Compile (or reuse from the cache) and load SOURCE for `-march=<march>`; errors raise.

    "native" falls back to the compiler's default target if -march=native is refused. Other
    values ("haswell" for AVX2, "x86-64" for the scalar path) exist to test every code path.
    """
    cxx = os.environ.get("CXX") or next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    arch = [[f"-march={march}"], []] if march == "native" else [[f"-march={march}"]]
    arch = [a + OPENMP for a in arch] + arch
    key = "\n".join([SOURCE, " ".join(FLAGS), march, cxx, version.split("\n")[0], _cpu_flags(), str(ABI)])
    path = cache_dir() / f"qgemv-{march}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
    if not path.exists():
        log.info("building quantized kernels with %s into %s", cxx, path)
        _compile(cxx, arch, path)
    return Kernels(ctypes.CDLL(str(path)), path)


def native() -> Kernels | None:
    """The native kernels, built on first call; None means the PyTorch fallback is in use."""
    if "native" not in _state:
        _state["native"] = None
        if os.environ.get("GEMMAKIT_KERNELS", "native") == "torch":
            _state["why"] = "GEMMAKIT_KERNELS=torch"
        else:
            try:
                _state["native"] = build()
            except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
                _state["why"] = " ".join(str(e).split())
                log.warning("native quantized kernels unavailable (%s); using the pure-PyTorch path, "
                            "decode will be several times slower", _state["why"])  # fmt: skip
    return _state["native"]  # type: ignore[return-value]


def backend() -> str:
    """'native-avx512', 'native-avx2', 'native-scalar' or 'torch' (the fallback)."""
    k = native()
    return "torch" if k is None else f"native-{k.isa}"


def bf16_prefill(enabled: bool | None = None) -> bool:
    """Whether prefill GEMMs run in bf16 (AMX / AVX512-BF16 CPUs only); `enabled` switches it."""
    global _BF16_GEMM
    if enabled is not None:
        _BF16_GEMM = bool(enabled) and _BF16_GEMM_HW
    return _BF16_GEMM


def use_native(enabled: bool) -> None:
    """Switch between the native kernels (built or reloaded on next use) and the PyTorch fallback."""
    _state.clear()
    if not enabled:
        _state.update(native=None, why="use_native(False)")


# ---- the operation the modules call ------------------------------------------------------------------


def matmul(x: torch.Tensor, packed: dict[str, torch.Tensor], scheme: str, shape: tuple[int, int],
           group: int | None, max_gemv_rows: int | None = None) -> torch.Tensor:  # fmt: skip
    """x (M, K) float32 @ W^T -> (M, N) float32: native GEMV for M <= GEMV_MAX_ROWS[isa], else tiled GEMM."""
    (n, k), kern = shape, native()
    if kern is not None and x.device.type != "cpu":
        kern = None
    bf16_gemm = scheme == "bf16" and kern is not None and _BF16_GEMM
    if max_gemv_rows is None and kern is not None:
        if bf16_gemm:
            max_gemv_rows = BF16_GEMV_MAX_ROWS
        elif _BF16_GEMM:
            max_gemv_rows = GEMV_MAX_ROWS_BF16_TILES[scheme]
        else:
            max_gemv_rows = GEMV_MAX_ROWS.get(kern.isa, 4)
    if kern is not None and x.shape[0] <= max_gemv_rows:
        return kern.gemv(x, packed, scheme, shape, group)
    if bf16_gemm:
        return F.linear(x.to(torch.bfloat16), packed["qweight"]).float()
    if kern is not None and _BF16_GEMM:  # int8 / int4 prefill: bf16 tiles into the AMX GEMM
        rows, dtype = max(1, min(n, BF16_TILE_BYTES // (2 * k))), torch.bfloat16
        x = x.to(torch.bfloat16)
    else:
        rows, dtype = max(1, min(n, TILE_BYTES // (4 * k))), torch.float32
    buf = None
    if kern is not None:
        flat = getattr(_scratch, str(dtype), None)
        if flat is None or flat.numel() < rows * k:
            flat = torch.empty(rows * k, dtype=dtype)
            setattr(_scratch, str(dtype), flat)
        buf = flat[: rows * k].view(rows, k)
    parts = []
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        if kern is None:
            w = dequantize_matrix({name: t[r0:r1] for name, t in packed.items()}, scheme, group)
        else:
            w = kern.dequantize(packed, scheme, shape, group, r0, r1, buf[: r1 - r0])
        parts.append(F.linear(x, w).float())
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
