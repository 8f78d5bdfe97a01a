"""Weight-only int8 / int4 quantization: state-dict transform, module swap, fast decode kernels, checkpoints.

Where it sits: after `checkpoint` (it loads float checkpoints through it), before `infer`/`cli`.
A quantized Gemma is the same `Gemma` module with `QLinear` / `QEmbedding` swapped in, so the
engine, KV cache and sampler do not know the difference. The package's modules, bottom to top:

- `schemes`: int8 per-output-row and int4 group-wise packing, bf16 (unquantized bf16 weights for
  the native bf16 x fp32 GEMV), the reference dequantizer.
- `kernels`: native GEMV (C++ built on first use, cached) or the PyTorch fallback; tiled bf16 or
  fp32 GEMM for prefill.
- `modules`: QLinear, QEmbedding, `quantize_state_dict` (pure), `swap_modules`, `quantize_model`,
  `with_bf16_kernels` (a bf16 model onto the bf16 GEMV, sharing its storage).
- `io`: `save_quantized`, `load_quantized`, `load_any` (quantized or float, by manifest.json).

Key trade-off: weights are stored as the decode kernels read them, and only weights are quantized;
activations stay float32 in decode. Decode then streams 1 (int8) or ~0.56 (int4, group 64) bytes
per weight instead of 4, while prefill dequantizes tiles back to a dense format for a GEMM: bf16
tiles into the AMX / AVX512-BF16 GEMM where the CPU has one (activations rounded to bf16; ~3x faster
than fp32), fp32 tiles into MKL's GEMM otherwise. Random-weight Gemma 1 2B, 2-core AVX-512 Xeon,
2 threads, prompt 128, 128 new tokens (benchmarks/decode.py; llama.cpp without its AMX repack,
which segfaults on this CPU): decode int8 7.6 tok/s vs llama.cpp q8_0 5.7, int4 g64 9.2 vs q4_0
5.7; prefill 110-111 vs 46-48 tok/s. Kernel-level numbers: benchmarks/bench_kernels.py.
"""

from gemmakit.quantize.io import FORMAT, load_any, load_quantized, read_quantization, save_quantized
from gemmakit.quantize.kernels import backend, use_native
from gemmakit.quantize.modules import (
    QEmbedding,
    QLinear,
    QMatrix,
    quantization_meta,
    quantize_model,
    quantize_state_dict,
    swap_modules,
    with_bf16_kernels,
)
from gemmakit.quantize.schemes import DEFAULT_GROUP_SIZE, SCHEMES, QuantError, dequantize_matrix

__all__ = [
    "DEFAULT_GROUP_SIZE",
    "FORMAT",
    "SCHEMES",
    "QEmbedding",
    "QLinear",
    "QMatrix",
    "QuantError",
    "backend",
    "dequantize_matrix",
    "load_any",
    "load_quantized",
    "quantization_meta",
    "quantize_model",
    "quantize_state_dict",
    "read_quantization",
    "save_quantized",
    "swap_modules",
    "use_native",
    "with_bf16_kernels",
]
