"""Kernel choices per ISA: the level capping rules, and the quantized tests run again under the AVX2 build.

The development machines have AVX-512 (one with AMX, one with AVX512-BF16 only); users also run AVX2
laptops. `GEMMAKIT_KERNEL_ISA=avx2` builds the native kernels with -mavx2 -mfma instead of
-march=native, and the oneDNN / MKL / ATen caps make torch's own GEMMs and vector kernels AVX2 too, so
one run of tests/test_quantize.py in that environment is what an AVX2-only CPU computes.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from gemmakit.quantize import kernels

ROOT = Path(__file__).resolve().parents[1]
AVX2_ENV = {"GEMMAKIT_KERNEL_ISA": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
            "ATEN_CPU_CAPABILITY": "avx2"}  # fmt: skip
X86 = platform.machine() in ("x86_64", "AMD64")


def test_isa_level_is_capped_by_the_env_switches(monkeypatch) -> None:
    for var in ("GEMMAKIT_KERNEL_ISA", "ONEDNN_MAX_CPU_ISA"):
        monkeypatch.delenv(var, raising=False)
    hw = kernels._hardware_level()
    assert kernels.isa_level() == hw and hw in kernels.CROSSOVERS
    rank = kernels.LEVELS.index
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # an AMX machine standing in for a Zen 4
    assert kernels.isa_level() == kernels.LEVELS[max(rank(hw), rank("avx512_bf16"))]
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")
    assert kernels.isa_level() == kernels.LEVELS[max(rank(hw), rank("avx512"))]
    monkeypatch.setenv("GEMMAKIT_KERNEL_ISA", "avx2")  # the lowest cap wins
    assert kernels.isa_level() == kernels.LEVELS[max(rank(hw), rank("avx2"))]
    assert not kernels.CROSSOVERS["avx2"].bf16_prefill and not kernels.CROSSOVERS["avx512"].bf16_prefill
    monkeypatch.setenv("GEMMAKIT_KERNEL_ISA", "avx1024")
    with pytest.raises(kernels.QuantError, match="GEMMAKIT_KERNEL_ISA: expected one of"):
        kernels._kernel_isa()


def test_gemv_rows_follow_the_table() -> None:
    kern = kernels.native()
    if kern is None:
        pytest.skip(f"no native kernels: {kernels._state.get('why')}")
    level = kernels._LEVEL if kern.isa == "avx512" else kern.isa
    row = kernels.CROSSOVERS[level]
    before = kernels.bf16_prefill()
    try:
        kernels.bf16_prefill(True)
        assert [kernels.gemv_max_rows(s) for s in ("int8", "int4", "bf16")] == [row.int8, row.int4, row.bf16]
        kernels.bf16_prefill(False)  # fp32 prefill is slower than bf16: the GEMV's crossover moves up
        fp32 = kernels.CROSSOVERS["avx512" if level in ("amx", "avx512_bf16") else level]  # fp32 GEMM
        assert kernels.gemv_max_rows("int8") == fp32.int8
    finally:
        kernels.bf16_prefill(before)


@pytest.mark.skipif(not X86 or "GEMMAKIT_KERNEL_ISA" in os.environ, reason="x86 only; not inside itself")
def test_quantized_tests_pass_under_the_avx2_build(tmp_path: Path) -> None:
    # a fresh Inductor cache: torch 2.13 reuses FX graphs compiled for another ATEN_CPU_CAPABILITY (NaNs)
    env = {k: v for k, v in os.environ.items() if k != "GEMMAKIT_KERNELS"}  # this run is of the AVX2 build
    env.update(AVX2_ENV, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    probe = "from gemmakit.quantize import kernels; print(kernels.backend(), kernels.isa_level())"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["native-avx2", "avx2"], out.stderr
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_quantize.py"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:]
