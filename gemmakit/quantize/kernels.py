"""Quantized matrix products: a JIT-built C++ kernel when a compiler exists, pure PyTorch otherwise.

Where it sits: between `schemes` (the packed layouts and the reference dequantizer) and `modules`
(QLinear / QEmbedding call `matmul`). Decode (few activation rows) streams the packed weights once
through the native GEMV; prefill (more rows than the GEMV is worth) dequantizes row tiles and runs
the CPU's GEMM, in bf16 where the CPU multiplies bf16 fast (AMX, AVX512-BF16), else in fp32. Which
path wins at how many rows depends on the ISA, so the choice is a table, `CROSSOVERS`, keyed by the
ISA level it was measured on (`benchmarks/bench_kernels.py --isa all` measures every level this CPU
can be capped to and prints the rows; `isa_level()` says which row applies here).

M=1 GEMV on 16384x2048 weights streamed from DRAM, 2-core AVX-512 Xeon (AMX), 2 threads: int8
1.78 ms = 18.9 GB/s, int4 g64 1.42 ms = 23.6 Gweights/s, against fp32 F.linear 5.16 ms, bf16 3.95 ms,
aten _weight_int8pack_mm 2.78 ms (bf16 activations; 15.0 ms with fp32), a torch.compile'd
dequantize-GEMV 3.7 ms (int8) / 4.8 ms (int4); the bf16 scheme's GEMV (bf16 weights widened by a
shift, fp32 FMA) 2.6 ms = 25.7 GB/s vs bf16 F.linear 3.4 ms. `bf16_prefill(False)` (or
`GEMMAKIT_BF16_PREFILL=0`) keeps every product in fp32, exact up to summation order, at 3-6x the
prefill time on bf16-capable CPUs.

Build: `qgemv.cpp` (package data beside this file) is compiled with the system C++ compiler (`$CXX`,
g++, c++ or clang++; ~1-3 s, no torch headers) into `$GEMMAKIT_CACHE_DIR` (default
`~/.cache/gemmakit/kernels`), named by a hash of the source, flags, compiler version and the CPU's
feature flags, so a cache shared between different CPUs never runs `-march=native` code on the wrong
one. `GEMMAKIT_KERNEL_ISA=avx2` (or `avx512`, `scalar`) builds for that ISA instead of
`-march=native` and caps `isa_level()` to it, which is how an AVX-512 machine tests what an AVX2
laptop runs (set `ONEDNN_MAX_CPU_ISA=AVX2` and `MKL_ENABLE_INSTRUCTIONS=AVX2` too, so torch's GEMMs
follow; `ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16` alone makes an AMX machine stand in for a Zen 4; with
`ATEN_CPU_CAPABILITY` changed, give torch.compile its own `TORCHINDUCTOR_CACHE_DIR`: torch 2.13 reuses
graphs compiled for the other capability and returns NaNs). The
library is written under a temp name and renamed, so concurrent first builds are safe. Any failure
(no compiler, build error, unwritable cache) logs ONE warning and falls back to PyTorch: the same
results up to float32 summation order, decode several times slower. `GEMMAKIT_KERNELS=torch` forces
the fallback, which always dequantizes fp32 tiles (exact, and the slow path anyway).

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
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from gemmakit.quantize.schemes import QuantError, dequantize_matrix, packed_shapes

log = logging.getLogger(__name__)

SOURCE_FILE = Path(__file__).with_name("qgemv.cpp")  # shipped as package data (pyproject.toml)
ABI = 4  # must equal gk_abi() in qgemv.cpp; bump with any change of the exported C signatures
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off"]
OPENMP = ["-fopenmp"]  # dropped (single-threaded kernels) if the compiler has no OpenMP, e.g. Apple clang
# Compiler flags per kernel ISA. "native" tries -march=native, then the compiler's default target.
ISA_FLAGS = {
    "native": [["-march=native"], []],
    "avx512": [["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx2", "-mfma", "-mf16c"]],
    "avx2": [["-mavx2", "-mfma", "-mf16c"]],
    "scalar": [["-march=x86-64"]],
}
# ISA levels, fastest first: what the CPU (capped by the env switches) does for the kernels and GEMMs.
LEVELS = ("amx", "avx512_bf16", "avx512", "avx2", "scalar")
# oneDNN's ONEDNN_MAX_CPU_ISA names (v3.x) -> the level they cap torch's bf16 GEMMs to.
_ONEDNN_CAP = {"SSE41": "scalar", "AVX": "scalar", "AVX2": "avx2", "AVX2_VNNI": "avx2", "AVX2_VNNI_2": "avx2",
               "AVX512_CORE": "avx512", "AVX512_CORE_VNNI": "avx512", "AVX512_CORE_BF16": "avx512_bf16",
               "AVX512_CORE_FP16": "avx512_bf16", "AVX10_1_512": "avx512_bf16", "AVX10_2_512": "avx512_bf16"}  # fmt: skip


@dataclass(frozen=True)
class Crossovers:
    """Which product each ISA level uses, measured by `benchmarks/bench_kernels.py --isa all`."""

    bf16_prefill: bool  # prefill GEMMs in bf16 (bf16 tiles for int8/int4): only where bf16 GEMMs are fast
    int8: int  # largest activation-row count M for which the native int8 GEMV beats the prefill path
    int4: int  # the same for int4 (groups of 64); int4 GEMV does more arithmetic per byte, so lower
    bf16: int  # the same for the bf16 weight scheme (its prefill multiplies the bf16 weights directly)


# Measured per level: the GEMV's time vs the prefill path's, ms for 16384x2048 + 2048x16384 weights
# streamed from DRAM, 2 threads; each run's JSON is benchmarks/results/bench_kernels_<level>.json.
# - "amx": the 2-core Intel Xeon (AMX), 16384x2048 / 2048x16384 separately: bf16 tiles at 128 rows
#   int8 10.0 ms / int4 11.2 vs 34.7 / 36.2 through fp32 tiles; GEMV vs bf16 tiles int8 M=24 6.5/7.4
#   vs 7.0/9.0, M=32 9.2/9.9 vs 7.2/9.6; int4 M=16 6.5/6.8 vs 8.4/9.3, M=24 9.7/10.2 vs 8.4/9.9; bf16
#   scheme GEMV vs bf16 GEMM M=4 2.7 vs 3.9, M=8 4.4 vs 3.6.
# - "avx512_bf16": the 2-core AMD EPYC (Zen 4 class: AVX512-BF16, no AMX), summed: bf16 tiles at 128
#   rows int8 28.2 / int4 32.1 vs 113.1 / 116.3 through fp32 tiles; GEMV vs bf16 tiles int8 M=16 7.7
#   vs 9.3, M=24 13.2 vs 10.2; int4 M=12 9.0 vs 10.4, M=16 12.5 vs 12.6, M=24 18.3 vs 13.6; bf16 scheme
#   M=4 4.0 vs 6.3, M=8 7.7 vs 5.7.
# - "avx2": that EPYC capped to AVX2 (kernels built -mavx2 -mfma, oneDNN, MKL and ATen capped):
#   GEMV vs fp32 tiles int8 M=64 63.7 vs 64.2, M=128 119.7 vs 105.6; int4 M=128 112.2 vs 134.6; bf16
#   M=128 132.1 vs 140.0. MKL's fp32 GEMM is AVX2-speed here (as on an AVX2 laptop), so the
#   bandwidth-bound GEMV wins far up.
# - "avx512" (Skylake-X..Ice Lake: AVX-512 without BF16; no AMD CPU is one) is the Xeon with bf16
#   prefill off, 16384x2048, GEMV vs fp32 tiles: int8 M=64 20.4 vs 27.6, M=128 the GEMM; int4 M=32
#   15.2 vs 20.6, M=64 29.0 vs 26.1. (The EPYC capped to AVX512_CORE measures the GEMV winning up to
#   M=128 for every scheme, because MKL runs its AVX2 path on AMD: not what such a CPU sees.)
# - "scalar": no vector kernels; the GEMV stays for a few rows only (not measured).
CROSSOVERS: dict[str, Crossovers] = {
    "amx": Crossovers(bf16_prefill=True, int8=24, int4=16, bf16=4),
    "avx512_bf16": Crossovers(bf16_prefill=True, int8=16, int4=16, bf16=4),
    "avx512": Crossovers(bf16_prefill=False, int8=64, int4=32, bf16=32),
    "avx2": Crossovers(bf16_prefill=False, int8=64, int4=128, bf16=128),
    "scalar": Crossovers(bf16_prefill=False, int8=4, int4=4, bf16=4),
}
TILE_BYTES = 16 << 20  # fp32 bytes dequantized per prefill tile: bounds the temporary, stays in cache
# bf16 tile: 2048 x 2048 measured fastest on AMX (10.0 ms; 1024 rows 13.4, 4096 11.4)
BF16_TILE_BYTES = 8 << 20


def _hardware_level() -> str:
    """The CPU's own level, from torch's CPU feature checks."""
    cpu = torch.cpu
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "amx"
    if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "avx512_bf16"
    capability = torch.backends.cpu.get_cpu_capability()
    return {"AVX512": "avx512", "AVX2": "avx2"}.get(capability, "scalar")


def isa_level() -> str:
    """The ISA level whose `CROSSOVERS` row applies: the CPU's, capped by GEMMAKIT_KERNEL_ISA (the
    kernels' build) and ONEDNN_MAX_CPU_ISA (torch's bf16 GEMMs), whichever is lowest."""
    level = LEVELS.index(_hardware_level())
    kernel_isa = os.environ.get("GEMMAKIT_KERNEL_ISA", "native")
    if kernel_isa in LEVELS:  # "native" caps nothing; a bad value is reported when the kernels build
        level = max(level, LEVELS.index(kernel_isa))
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if onednn in _ONEDNN_CAP:
        level = max(level, LEVELS.index(_ONEDNN_CAP[onednn]))
    return LEVELS[level]


def _kernel_isa(isa: str | None = None) -> str:
    """`isa`, or GEMMAKIT_KERNEL_ISA (default "native"), checked against ISA_FLAGS."""
    name = "kernel ISA" if isa else "GEMMAKIT_KERNEL_ISA"
    isa = isa or os.environ.get("GEMMAKIT_KERNEL_ISA", "native")
    if isa not in ISA_FLAGS:
        raise QuantError(f"{name}: expected one of {sorted(ISA_FLAGS)}, got {isa!r}")
    return isa


_LEVEL = isa_level()
_BF16_GEMM_HW = CROSSOVERS[_LEVEL].bf16_prefill  # this CPU multiplies bf16 fast enough to prefill in bf16
_BF16_GEMM = _BF16_GEMM_HW and os.environ.get("GEMMAKIT_BF16_PREFILL", "1") != "0"

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
    """One loaded build of qgemv.cpp; every call checks its tensors before passing pointers."""

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


def _compile(cxx: str, source: str, arch: list[list[str]], out: Path) -> None:
    """Compile `source` into `out` atomically, with the first `arch` flag set the compiler accepts."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    src = Path(tmp_name).with_suffix(".cpp")
    try:
        src.write_text(source)
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


def build(isa: str | None = None) -> Kernels:
    """Compile (or reuse from the cache) and load qgemv.cpp for `isa` (default: GEMMAKIT_KERNEL_ISA,
    else "native"); errors raise. "avx2", "avx512" and "scalar" exist to run every code path on one
    machine; "native" falls back to the compiler's default target if -march=native is refused."""
    isa = _kernel_isa(isa)
    cxx = os.environ.get("CXX") or next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    try:
        source = SOURCE_FILE.read_text(encoding="utf-8")
    except OSError as e:
        raise RuntimeError(f"{SOURCE_FILE}: kernel source missing from the installed package ({e})") from None
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    arch = [a + OPENMP for a in ISA_FLAGS[isa]] + ISA_FLAGS[isa]
    compiler = version.split("\n")[0]
    key = "\n".join([source, " ".join(FLAGS), repr(arch), cxx, compiler, _cpu_flags(), str(ABI)])
    path = cache_dir() / f"qgemv-{isa}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
    if not path.exists():
        log.info("building quantized kernels (%s) with %s into %s", isa, cxx, path)
        _compile(cxx, source, arch, path)
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
            except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError, QuantError) as e:
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


def gemv_max_rows(scheme: str) -> int:
    """Activation rows up to which `matmul` takes the native GEMV for `scheme` on this CPU: the
    measured crossover of this ISA level (`CROSSOVERS`), for the prefill path now in force."""
    return _gemv_rows(native(), scheme)


def _gemv_rows(kern: Kernels | None, scheme: str) -> int:
    if kern is None:
        return 0
    level = _LEVEL if kern.isa == "avx512" else kern.isa  # an AVX2 / scalar build on a faster CPU
    row = CROSSOVERS[level]
    if row.bf16_prefill and not _BF16_GEMM:  # bf16 prefill switched off: the fp32 GEMM's crossover
        row = CROSSOVERS["avx512"]  # (measured on Intel; on AMD the GEMV would win further still)
    return getattr(row, scheme)


def matmul(x: torch.Tensor, packed: dict[str, torch.Tensor], scheme: str, shape: tuple[int, int],
           group: int | None, max_gemv_rows: int | None = None) -> torch.Tensor:  # fmt: skip
    """x (M, K) float32 @ W^T -> (M, N) float32: native GEMV for M <= `gemv_max_rows(scheme)`, else a
    tiled GEMM (bf16 where `bf16_prefill()`, fp32 otherwise and in the PyTorch fallback)."""
    (n, k), kern = shape, native()
    if kern is not None and x.device.type != "cpu":
        kern = None
    bf16_gemm = scheme == "bf16" and kern is not None and _BF16_GEMM
    if max_gemv_rows is None and kern is not None:
        max_gemv_rows = _gemv_rows(kern, scheme)  # kern already looked up
    if kern is not None and x.shape[0] <= max_gemv_rows:
        return kern.gemv(x, packed, scheme, shape, group)
    if bf16_gemm:
        return F.linear(x.to(torch.bfloat16), packed["qweight"]).float()
    if kern is not None and _BF16_GEMM:  # int8 / int4 prefill: bf16 tiles into the bf16 GEMM
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
