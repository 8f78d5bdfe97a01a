"""Quantized layers and the two halves of quantizing a model: a state-dict transform and a module swap.

Where it sits: on top of `schemes` (packing) and `kernels` (products); `io` saves and loads what
this builds. As in gpt-fast, `quantize_state_dict` is a pure function (float state dict in, packed
state dict + metadata out) and `swap_modules` replaces `nn.Linear` / the embedding with `QLinear` /
`QEmbedding` shells, so loading a quantized checkpoint is `Gemma(cfg)` on meta -> swap -> load
with `assign=True`, never a re-quantization. The metadata (scheme, group size, shape of every
quantized matrix) lives in the checkpoint's manifest.json, never in tensor or file names.

What is quantized: the seven matrices of every block and the embedding, which is also the tied
output projection (`QEmbedding.attend`; 20.9% of Gemma 1 2B's weights). Norms stay float and so do
activations: the quantized model computes in `dtype` (float32 by default, whatever the source
dtype), because bf16 elementwise and GEMM are slow on CPUs without AVX512-BF16.

Key trade-off: activations are not quantized, so in decode the only error is the weights' rounding,
at the price of widening every weight to fp32 in registers (the kernels' cost, see `kernels`).
Prefill on CPUs with AMX / AVX512-BF16 rounds activations to bf16 for a ~3x faster GEMM
(`kernels.bf16_prefill(False)` turns that off).
"""

from __future__ import annotations

import torch
from torch import nn

from gemmakit.config import ModelConfig
from gemmakit.model import Gemma
from gemmakit.quantize import kernels
from gemmakit.quantize.schemes import (
    QuantError,
    check_scheme,
    check_shape,
    dequantize_matrix,
    packed_shapes,
    quantize_matrix,
)

LAYOUT = "gemmakit-q1"  # version of the packed layouts described in `schemes`; written to the manifest
BLOCK_MATRICES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


class QMatrix(nn.Module):
    """A packed (out_features, in_features) matrix held as buffers, with its matrix product."""

    def __init__(self, out_features: int, in_features: int, scheme: str, group_size: int | None = None,
                 device: torch.device | str | None = None) -> None:  # fmt: skip
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.scheme, self.group_size = scheme, check_scheme(scheme, group_size)
        check_shape(type(self).__name__, self.shape, scheme, self.group_size)
        self._names = tuple(packed_shapes(self.shape, scheme, self.group_size))
        for name, (shape, dtype) in packed_shapes(self.shape, scheme, self.group_size).items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype, device=device))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def packed(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self._names}

    def spec(self) -> dict:
        """The manifest entry for this matrix."""
        return {"scheme": self.scheme, "group_size": self.group_size, "shape": list(self.shape)}

    def dequantize(self) -> torch.Tensor:
        """The float32 matrix this stands for (the reference the kernels are checked against)."""
        return dequantize_matrix(self.packed, self.scheme, self.group_size)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features) in x's dtype, through `kernels.matmul`."""
        if x.requires_grad and torch.is_grad_enabled():  # backprop through a frozen matrix (QLoRA)
            return _FrozenMatmul.apply(x, self)
        lead = x.shape[:-1]
        y = kernels.matmul(x.reshape(-1, self.in_features).float(), self.packed, self.scheme, self.shape,
                           self.group_size)  # fmt: skip
        return y.view(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return (
            f"out_features={self.out_features}, in_features={self.in_features}, scheme={self.scheme}{group}"
        )


class _FrozenMatmul(torch.autograd.Function):
    """`QMatrix.matmul` with a gradient for x only: dx = dy @ W, W dequantized tile by tile.

    The kernels are ctypes calls writing into reused scratch tiles, invisible to autograd, so without
    this no gradient would reach anything upstream of a quantized matrix (LoRA adapters under a
    quantized base, or anything before the tied output projection). Tiles bound the temporary to
    `kernels.TILE_BYTES` (16 MiB) instead of a whole fp32 matrix (2 GB for Gemma 1's embedding).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: QMatrix) -> torch.Tensor:  # autograd runs this without grad
        ctx.module, ctx.dtype = module, x.dtype
        return module.matmul(x)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, None]:
        m = ctx.module
        (n, k), dy = m.shape, dy.float()
        rows = max(1, min(n, kernels.TILE_BYTES // (4 * k)))
        dx = None
        for r0 in range(0, n, rows):
            w = dequantize_matrix({name: t[r0 : r0 + rows] for name, t in m.packed.items()}, m.scheme,
                                  m.group_size)  # fmt: skip
            part = dy[..., r0 : r0 + rows] @ w  # (..., k)
            dx = part if dx is None else dx + part
        return dx.to(ctx.dtype), None


class QLinear(QMatrix):
    """Drop-in for a bias-free `nn.Linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x)


class QEmbedding(QMatrix):
    """Drop-in for `model.Embedding`: `forward` looks rows up, `attend` is the tied output projection."""

    def __init__(self, num_embeddings: int, embedding_dim: int, scheme: str, group_size: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:  # fmt: skip
        super().__init__(num_embeddings, embedding_dim, scheme, group_size, device)
        self.out_dtype = dtype  # lookups come out in the model's activation dtype

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        flat = tokens.reshape(-1)
        rows = {name: t[flat] for name, t in self.packed.items()}  # (T, ...) packed rows: only T rows widened
        out = dequantize_matrix(rows, self.scheme, self.group_size)
        return out.view(*tokens.shape, self.in_features).to(self.out_dtype)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x)


# ---- the transform and the swap ---------------------------------------------------------------------


def targets(cfg: ModelConfig) -> list[str]:
    """Module names that get quantized, in state-dict order."""
    names = ["embed"] + [f"blocks.{i}.{m}" for i in range(cfg.n_layers) for m in BLOCK_MATRICES]
    return names + ([] if cfg.tie_embeddings else ["lm_head"])


def _plan(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], scheme: str, group_size: int | None,
          embed_scheme: str | None) -> dict[str, dict]:  # fmt: skip
    """Module name -> manifest entry, every shape checked before any work is done."""
    group = check_scheme(scheme, group_size)
    embed_scheme = embed_scheme or scheme
    embed_group = group if embed_scheme == scheme else check_scheme(embed_scheme, None)
    plan = {}
    for name in targets(cfg):
        sch, grp = (embed_scheme, embed_group) if name in ("embed", "lm_head") else (scheme, group)
        check_shape(f"{name}.weight", shapes[f"{name}.weight"], sch, grp)
        plan[name] = {"scheme": sch, "group_size": grp, "shape": list(shapes[f"{name}.weight"])}
    return plan


def quantize_state_dict(model_or_sd: nn.Module | dict[str, torch.Tensor], cfg: ModelConfig, scheme: str = "int8",
                        group_size: int | None = None, *, embed_scheme: str | None = None,
                        dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], dict]:  # fmt: skip
    """(packed state dict, metadata) from a float gemmakit state dict; nothing is modified.

    `group_size` applies to int4 (default `schemes.DEFAULT_GROUP_SIZE`; int8 takes None).
    `embed_scheme` quantizes the embedding / output projection differently (e.g. "int8" under
    int4, as llama.cpp keeps it at 6 bits for q4_0). Unquantized tensors (norms) are cast to `dtype`.
    """
    if isinstance(model_or_sd, nn.Module) and any(isinstance(m, QMatrix) for m in model_or_sd.modules()):
        raise QuantError(
            "the model is already quantized; quantize a float model (re-quantizing compounds error)"
        )
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, nn.Module) else dict(model_or_sd)
    with torch.device("meta"):
        want = Gemma(cfg).state_dict()
    missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    if missing or unexpected:
        raise QuantError(
            f"state dict does not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    bad = [
        f"{n} {list(sd[n].shape)} (expected {list(t.shape)})"
        for n, t in want.items()
        if sd[n].shape != t.shape
    ]
    if bad:
        raise QuantError(f"state dict shapes do not match the config: {', '.join(bad[:5])}")
    plan = _plan(cfg, {n: tuple(t.shape) for n, t in sd.items()}, scheme, group_size, embed_scheme)
    qsd = {}
    for name, t in sd.items():
        module = name.removesuffix(".weight")
        if module not in plan:
            qsd[name] = t.detach().to(dtype=dtype, copy=True)
            continue
        packed = quantize_matrix(t.detach(), plan[module]["scheme"], plan[module]["group_size"])
        qsd.update({f"{module}.{key}": value for key, value in packed.items()})
    meta = {"layout": LAYOUT, "scheme": scheme, "group_size": check_scheme(scheme, group_size),
            "dtype": str(dtype).removeprefix("torch."), "tensors": plan}  # fmt: skip
    return qsd, meta


def swap_modules(model: Gemma, meta: dict, device: torch.device | str = "meta") -> Gemma:
    """Replace every module named in `meta["tensors"]` by an empty QLinear / QEmbedding shell (in place)."""
    dtype = getattr(torch, meta.get("dtype", "float32"))
    for name, spec in meta["tensors"].items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        n, k = spec["shape"]
        if name == "embed":
            new: QMatrix = QEmbedding(n, k, spec["scheme"], spec["group_size"], device=device, dtype=dtype)
        else:
            new = QLinear(n, k, spec["scheme"], spec["group_size"], device=device)
        setattr(parent, attr, new)
    return model


def quantize_model(model: Gemma, scheme: str = "int8", group_size: int | None = None, *,
                   embed_scheme: str | None = None, dtype: torch.dtype = torch.float32) -> Gemma:  # fmt: skip
    """Quantize `model` in place (transform + swap, exactly what loading a saved one does); returns it."""
    qsd, meta = quantize_state_dict(
        model, model.config, scheme, group_size, embed_scheme=embed_scheme, dtype=dtype
    )
    swap_modules(model, meta)
    model.load_state_dict(qsd, assign=True, strict=True)
    return model.eval()


def quantization_meta(model: nn.Module) -> dict | None:
    """The metadata `quantize_state_dict` returned, rebuilt from a model's modules; None if unquantized."""
    tensors = {name: m.spec() for name, m in model.named_modules() if isinstance(m, QMatrix)}
    if not tensors:
        return None
    blocks = [s for n, s in tensors.items() if n not in ("embed", "lm_head")] or list(tensors.values())
    norm = next(p for n, p in model.named_parameters() if n.endswith("norm.weight"))
    return {"layout": LAYOUT, "scheme": blocks[0]["scheme"], "group_size": blocks[0]["group_size"],
            "dtype": str(norm.dtype).removeprefix("torch."), "tensors": tensors}  # fmt: skip


def with_bf16_kernels(model: Gemma) -> Gemma:
    """A bf16 float model rewired onto the "bf16" scheme's native kernels, sharing its weight storage.

    The "bf16" scheme stores a matrix exactly as a bf16 `nn.Linear` does, so no weight is copied:
    a memory-mapped checkpoint stays mapped. Norms become float32 and activations run in float32,
    as in a model quantized with `quantize_model(m, "bf16")`. Decode then uses the native bf16 GEMV
    (Gemma 1 2B shape, 2-core Xeon: 5.4 tok/s vs 3.3 through PyTorch's bf16 GEMV). The model is
    returned unchanged when it is not an all-bf16 CPU model or no native kernels could be built.
    """
    cfg = model.config
    sd = model.state_dict()
    plan_names = targets(cfg)
    weights = [sd.get(f"{name}.weight") for name in plan_names]
    if (
        kernels.native() is None
        or any(isinstance(m, QMatrix) for m in model.modules())
        or any(w is None or w.dtype != torch.bfloat16 or w.device.type != "cpu" for w in weights)
    ):
        return model
    plan = _plan(cfg, {n: tuple(t.shape) for n, t in sd.items()}, "bf16", None, None)
    new_sd = {}
    for name, t in sd.items():
        module = name.removesuffix(".weight")
        new_sd[f"{module}.qweight" if module in plan else name] = (
            t.contiguous() if module in plan else t.detach().float()
        )
    meta = {"layout": LAYOUT, "scheme": "bf16", "group_size": None, "dtype": "float32", "tensors": plan}
    swap_modules(model, meta)
    model.load_state_dict(new_sd, assign=True, strict=True)
    return model.eval()
