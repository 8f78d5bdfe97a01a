"""The machine record every benchmark writes into its results: CPU, ISA, torch and the kernel choices.

Why: gemmakit picks its quantized kernels and prefill precision by ISA level (AMX, AVX512-BF16,
AVX-512, AVX2, scalar; `gemmakit.quantize.kernels.isa_level()`), and users run CPUs other than the
development machine's (Zen 4 with AVX512-BF16 but no AMX, AVX2-only laptops), so a number means
little without the ISA it was measured on and the env switches that capped it. Every benchmark calls
`machine()` here (adding its own extras, e.g. decode.py's read bandwidth) instead of detecting the
machine its own way; the Markdown renderers name `isa_level` and `kernel_backend` in their
"Machine:" line.

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
    from machine_info import machine
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

# /proc/cpuinfo flags that decide which kernels run (and which torch / oneDNN GEMMs are fast)
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
             "amx_int8", "avx_vnni")  # fmt: skip
# env switches that change which kernels or GEMMs run: recorded when set
KERNEL_ENV = ("GEMMAKIT_KERNELS", "GEMMAKIT_KERNEL_ISA", "GEMMAKIT_BF16_PREFILL", "ONEDNN_MAX_CPU_ISA",
              "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS")  # fmt: skip


def machine() -> dict[str, Any]:
    """This machine and the kernel choices in effect, as a JSON-ready dict.

    Keys: cpu (model name), cpus and cores (both the logical CPU count: earlier results and their
    renderers use one name or the other), platform, python, isa (the ISA_FLAGS present), isa_level,
    kernel_backend, bf16_prefill, torch, torch_threads, cpu_capability (torch's), env (the KERNEL_ENV
    switches that are set), loadavg. Builds (or loads from the cache) the native kernels, as
    `kernel_backend` is the backend they actually load as.
    """
    import torch

    from gemmakit.quantize import kernels

    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    cpus = os.cpu_count()
    return {
        "cpu": model or platform.processor() or platform.machine(),
        "cpus": cpus,
        "cores": cpus,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "isa": [f for f in ISA_FLAGS if f in flags],
        "isa_level": kernels.isa_level(),
        "kernel_backend": kernels.backend(),
        "bf16_prefill": kernels.bf16_prefill(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "env": {k: os.environ[k] for k in KERNEL_ENV if k in os.environ},
        "loadavg": os.getloadavg(),
    }
