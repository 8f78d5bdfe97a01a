"""Quantized checkpoints: save a quantized model, load it back without re-quantizing, load anything.

Where it sits: on top of `modules` and `gemmakit.checkpoint` (whose model-directory writer
`checkpoint_dir`, safetensors header validation and error type it reuses). A quantized checkpoint is a directory:

    model.safetensors   packed buffers (`blocks.0.wq.qweight`, `.scales` / `.scale_min`; bf16: `.qweight` as bf16)
                        + float norms
    manifest.json       format "quantized", the ModelConfig, "quantization": {layout, scheme,
                        group_size, dtype, tensors: {module: {scheme, group_size, shape}}}, file sizes
                        and sha256
    tokenizer.model     optional copy, so `gemmakit generate --model DIR` finds it

`gemmakit.checkpoint.load_model` refuses such a directory (checkpoint may not import quantize);
`load_any` is the entry point that handles both, and `gemmakit.load` / the CLI call it.

Key trade-off: the file stores the kernels' exact layout, so loading is a memory map plus
`load_state_dict(assign=True)` (no repacking, RSS grows only as pages are touched), but a layout
change needs a new `LAYOUT` version; loaders refuse versions they do not know.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from gemmakit.artifact import sha256_file
from gemmakit.checkpoint import (
    MANIFEST,
    CheckpointError,
    checkpoint_dir,
    detect_format,
    load_model,
    read_safetensors_header,
    write_safetensors,
)
from gemmakit.checkpoint import checkpoint_error as _err
from gemmakit.config import ConfigError, ModelConfig
from gemmakit.model import ATTN_IMPLS, Gemma
from gemmakit.quantize.modules import LAYOUT, QMatrix, quantization_meta, swap_modules
from gemmakit.quantize.schemes import QuantError, check_scheme, check_shape

FORMAT = "quantized"
WEIGHTS = "model.safetensors"


def save_quantized(model: Gemma, out_dir: str | Path, *, tokenizer: str | Path | None = None,
                   overwrite: bool = False) -> Path:  # fmt: skip
    """Write model.safetensors + manifest.json (+ a copy of `tokenizer`) into `out_dir`, atomically."""
    meta = quantization_meta(model)
    if meta is None:
        raise QuantError("save_quantized: the model is not quantized; call quantize_model first")
    sd = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    # widest dtypes first: every tensor then starts at a multiple of its item size inside the file
    order = sorted(sd, key=lambda n: -sd[n].element_size())
    with checkpoint_dir(out_dir, overwrite=overwrite, producer="gemmakit.quantize.save_quantized", fmt=FORMAT,
                        config=model.config, dtype=meta["dtype"], quantization=meta) as tmp:  # fmt: skip
        write_safetensors(tmp / WEIGHTS, {name: sd[name] for name in order})
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / "tokenizer.model")
    return Path(out_dir)


def read_quantization(path: str | Path) -> dict[str, Any] | None:
    """The manifest of a quantized checkpoint directory (or of the directory holding file `path`), else None."""
    path = Path(path)
    man = (path if path.is_dir() else path.parent) / MANIFEST
    if not man.is_file():
        return None
    try:
        data = json.loads(man.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _err(man, f"cannot read JSON ({e})") from None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def _check_meta(meta: Any, cfg: ModelConfig, man: Path) -> dict:
    """The manifest's quantization section, checked against the config; problems raise CheckpointError."""
    if not isinstance(meta, dict) or not isinstance(meta.get("tensors"), dict):
        raise _err(man, "quantization: expected an object with a 'tensors' object")
    if meta.get("layout") != LAYOUT:
        raise _err(man, f"quantization.layout: expected {LAYOUT!r}, got {meta.get('layout')!r} "
                        "(written by another gemmakit version?)")  # fmt: skip
    if meta.get("dtype") not in ("float32", "bfloat16", "float16"):
        raise _err(
            man, f"quantization.dtype: expected float32, bfloat16 or float16, got {meta.get('dtype')!r}"
        )
    with torch.device("meta"):
        shapes = {n.removesuffix(".weight"): tuple(t.shape) for n, t in Gemma(cfg).state_dict().items()}
    problems = []
    for name, spec in meta["tensors"].items():
        try:
            if name not in shapes or not isinstance(spec, dict) or list(shapes[name]) != spec.get("shape"):
                raise QuantError(f"expected a matrix of this config {list(shapes.get(name, ()))}, got {spec}")
            check_shape(
                name, shapes[name], spec["scheme"], check_scheme(spec["scheme"], spec.get("group_size"))
            )
        except (QuantError, KeyError, TypeError) as e:
            problems.append(f"quantization.tensors.{name}: {e}")
    if problems:
        raise _err(man, problems)
    return meta


def load_quantized(path: str | Path, dtype: torch.dtype | None = None, device: str = "cpu",
                   attn_impl: str = "eager", *, verify: bool = False) -> Gemma:  # fmt: skip
    """Load a `save_quantized` directory as a ready quantized Gemma (eval mode), memory-mapped.

    `dtype` changes the activation / norm dtype (default: as saved); the packed weights are used
    as stored. `verify=True` also checks sha256s (sizes are always checked). Every problem found
    is reported in one CheckpointError line.
    """
    if attn_impl not in ATTN_IMPLS:
        raise CheckpointError(f"attn_impl: expected one of {ATTN_IMPLS}, got {attn_impl!r}")
    if dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
        raise CheckpointError(f"dtype: expected None, float32, bfloat16 or float16, got {dtype}")
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    manifest, man = read_quantization(directory), directory / MANIFEST
    if manifest is None:
        raise _err(directory, f"not a quantized checkpoint (no {MANIFEST} with format {FORMAT!r})")
    try:
        cfg = ModelConfig.from_dict(manifest.get("config"))
    except (ConfigError, TypeError, AttributeError) as e:
        raise _err(man, f"config: {e}") from None
    meta = _check_meta(manifest.get("quantization"), cfg, man)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise _err(directory, f"{WEIGHTS} not found")
    if detect_format(weights) != "safetensors":
        raise _err(weights, "not a safetensors file; refusing to unpickle it")
    infos = read_safetensors_header(weights)
    record = (manifest.get("files") or {}).get(WEIGHTS) or {}
    size = weights.stat().st_size
    if record.get("size") != size:
        raise _err(weights, f"size expected {record.get('size')} ({MANIFEST}), found {size}")
    if verify and record.get("sha256") != sha256_file(weights):
        raise _err(weights, f"sha256 differs from {MANIFEST}")
    with torch.device("meta"):
        model = swap_modules(Gemma(cfg), meta)
    want = model.state_dict()
    problems = [f"missing tensor {n}" for n in want if n not in infos]
    problems += [f"unexpected tensor {n}" for n in infos if n not in want]
    problems += [
        f"{n}: expected {str(t.dtype).removeprefix('torch.')} {list(t.shape)}, "
        f"found {str(infos[n].dtype).removeprefix('torch.')} {list(infos[n].shape)}"
        for n, t in want.items()
        if n in infos and (infos[n].dtype != t.dtype or tuple(infos[n].shape) != tuple(t.shape))
    ]
    if problems:
        raise _err(weights, problems)
    return _materialize(model, weights, want, dtype, device).set_attn_impl(attn_impl).eval()


def _materialize(model: Gemma, weights: Path, want: dict[str, torch.Tensor], dtype: torch.dtype | None,
                 device: str) -> Gemma:  # fmt: skip
    from safetensors import SafetensorError, safe_open

    packed = {f"{n}.{b}" for n, m in model.named_modules() if isinstance(m, QMatrix) for b in m.packed}
    sd = {}
    try:
        with safe_open(str(weights), framework="pt") as f:
            for name, t in want.items():
                value = f.get_tensor(name)
                # packed buffers stay as stored (the bf16 scheme's weights are floating point too)
                floating = t.dtype.is_floating_point and name not in packed
                cast = dtype if (dtype is not None and floating) else value.dtype
                sd[name] = value.to(device=device, dtype=cast)
    except SafetensorError as e:
        raise _err(weights, f"corrupt safetensors file ({e})") from None
    if dtype is not None:
        model.embed.out_dtype = dtype
    model.load_state_dict(sd, assign=True, strict=True)
    return model


def load_any(path: str | Path, dtype: torch.dtype | None = None, device: str = "cpu", attn_impl: str = "eager",
             *, config: ModelConfig | None = None, verify: bool = False) -> Gemma:  # fmt: skip
    """`load_quantized` for a quantized checkpoint, else `gemmakit.checkpoint.load_model` (same arguments)."""
    if read_quantization(path) is None:
        return load_model(path, dtype=dtype, device=device, attn_impl=attn_impl, config=config, verify=verify)
    if config is not None:
        raise _err(path, f"config: a quantized checkpoint takes its config from {MANIFEST}; pass config=None")
    return load_quantized(path, dtype=dtype, device=device, attn_impl=attn_impl, verify=verify)
