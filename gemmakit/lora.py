"""LoRA adapters: low-rank updates on a frozen Gemma, saved and loaded in PEFT's on-disk format.

Where it sits: after `model` and `checkpoint`, beside `quantize` (same rank, so a quantized linear is
recognised by its interface, not imported), before `infer` and `train`. `apply_lora`
swaps the block linears named in a `LoraConfig` for `LoraLinear` wrappers and freezes everything
else; `train` optimises `lora_parameters(model)`; `merge_lora` folds the updates back into plain
`nn.Linear` weights for export, or `save_adapter` writes a directory that
`peft.PeftModel.from_pretrained` loads onto the HF transformers model (and `load_adapter` reads
adapters PEFT wrote). Facts follow PEFT 0.18 (`peft/tuners/lora/layer.py`): A is kaiming-uniform
(a=sqrt(5), nn.Linear's own init), B is zero so a fresh adapter is exactly the base model,
scaling = alpha / r, dropout applies to the adapter's input only, and the update is computed as
`B(A(dropout(x))) * scaling` added to the base output, in that op order.

QLoRA: a `quantize.QLinear` base (int8 / int4, frozen) works the same way; its backward passes a
gradient to x through the dequantized matrix (`quantize.modules._FrozenMatmul`). Merging into a
quantized base is refused: re-quantizing W + BA would round away most of a small update.

Key trade-off: the wrapper keeps the base module as `<name>.base`, so a LoRA model's state dict
names base weights `blocks.{i}.wq.base.weight`, which `checkpoint.save_hf` does not know: merge
first (or save the adapter alone). In exchange any base (float or quantized) is wrapped without copying its weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gemmakit.artifact import ArtifactError, atomic_dir, recover, write_json
from gemmakit.checkpoint import CheckpointError, internal_name_to_hf, open_store, write_safetensors
from gemmakit.errors import UserError
from gemmakit.model import Gemma

log = logging.getLogger(__name__)

TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")  # every linear of a block
FORMAT = "peft-lora"  # manifest.json "format" of an adapter directory
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # PEFT's names; .bin: weights-only load
_PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM.base_model (LoraModel).model (the HF model)
# PEFT LoraConfig options whose non-default values change the maths; load_adapter refuses them.
_PEFT_DEFAULTS = {"bias": "none", "fan_in_fan_out": False, "use_dora": False, "use_rslora": False,
                  "lora_bias": False}  # fmt: skip
_PEFT_EMPTY = ("rank_pattern", "alpha_pattern", "layers_to_transform", "modules_to_save",
               "trainable_token_indices", "target_parameters")  # fmt: skip


def _is_quantized(m: nn.Module) -> bool:
    """A frozen quantized linear (`quantize.QLinear`), known by its interface: lora may not import quantize."""
    return not isinstance(m, nn.Linear) and all(
        hasattr(m, a) for a in ("in_features", "out_features", "dequantize")
    )


class LoraError(UserError):
    """A LoRA config, model or adapter file is invalid; the message is one line naming what and why."""


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class LoraConfig:
    """Which linears get a rank-r update and how it is scaled (defaults: PEFT's r, alpha = 2r, all linears)."""

    # Rank of the update B @ A (PEFT's default 8): trainable params per linear = r * (in + out).
    r: int = 8
    # Scale numerator: the update is multiplied by alpha / r (2.0 at the defaults); with alpha held
    # fixed, changing r needs less learning-rate retuning (LoRA paper, Hu et al. 2021, section 4.1).
    alpha: float = 16
    # Dropout probability on the adapter's input only (the base path sees clean x); 0 = deterministic.
    dropout: float = 0.0
    # gemmakit module names adapted in every block; all seven by default: QLoRA (Dettmers et al. 2023)
    # found adapting every linear layer necessary to match full fine-tuning.
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self) -> None:
        if isinstance(self.targets, list):  # e.g. from JSON / TOML
            object.__setattr__(self, "targets", tuple(self.targets))
        r, alpha, p, targets = self.r, self.alpha, self.dropout, self.targets
        if not _number(r) or not isinstance(r, int) or r <= 0:
            raise LoraError(f"r: expected a positive integer, got {r!r}")
        if not _number(alpha) or not (math.isfinite(alpha) and alpha > 0):
            raise LoraError(f"alpha: expected a finite number > 0, got {alpha!r}")
        if not _number(p) or not 0.0 <= p < 1.0:
            raise LoraError(f"dropout: expected a probability in [0, 1), got {p!r}")
        if not isinstance(targets, tuple) or not targets:
            raise LoraError(
                f"targets: expected a non-empty tuple of module names from {TARGETS}, got {targets!r}"
            )
        unknown = [t for t in targets if t not in TARGETS]
        if unknown:
            raise LoraError(f"targets: unknown module name(s) {unknown}; expected some of {TARGETS}")
        if len(set(targets)) != len(targets):
            raise LoraError(f"targets: duplicate module names in {targets}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class LoraLinear(nn.Module):
    """`base(x) + B(A(dropout(x))) * alpha / r` around a frozen bias-free nn.Linear or QLinear."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None) -> None:  # fmt: skip
        super().__init__()
        if isinstance(base, nn.Linear):
            if base.bias is not None:
                raise LoraError("LoraLinear: base nn.Linear has a bias; Gemma's linears are bias-free")
            device, dtype = base.weight.device, base.weight.dtype
            base.weight.requires_grad_(False)
        elif _is_quantized(base):
            device, dtype = next(base.buffers()).device, torch.float32  # QLinear computes in fp32
        else:
            raise LoraError(f"LoraLinear: expected an nn.Linear or QLinear base, got {type(base).__name__}")
        self.base = base
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        # Initialised on the CPU in fp32, then moved: the same seed gives the same A on any device/dtype.
        a = torch.empty(r, base.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(a.to(device, dtype))  # (r, in_features)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device, dtype=dtype))  # (out, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        h = self.dropout(x.to(self.lora_A.dtype))
        return (y + F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling).to(y.dtype)

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) update B @ A * scaling, computed in `dtype`, that merging adds to the base weight."""
        return (self.lora_B.detach().to(dtype) @ self.lora_A.detach().to(dtype)) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling}"


# ---- applying, inspecting and merging --------------------------------------------------------------


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    """Module name (e.g. "blocks.0.wq") -> LoraLinear, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def apply_lora(model: Gemma, cfg: LoraConfig, *, seed: int | None = None) -> Gemma:
    """Wrap `cfg.targets` of every block in LoraLinear (in place), freeze all other params; returns model.

    `seed` makes the A matrices reproducible (drawn in block order, then `cfg.targets` order).
    """
    if lora_modules(model):
        raise LoraError(
            "apply_lora: the model already has LoRA adapters; merge_lora first or use a fresh model"
        )
    for i, block in enumerate(model.blocks):  # check everything before changing anything
        for t in cfg.targets:
            m = getattr(block, t)
            if not (isinstance(m, nn.Linear) or _is_quantized(m)) or getattr(m, "bias", None) is not None:
                raise LoraError(f"blocks.{i}.{t}: expected a bias-free nn.Linear or QLinear, got {m!r}")
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    for block in model.blocks:
        for t in cfg.targets:
            setattr(block, t, LoraLinear(getattr(block, t), cfg.r, cfg.alpha, cfg.dropout, gen))
    n = sum(p.numel() for p in lora_parameters(model))
    log.info("LoRA r=%d alpha=%s on %s: %d trainable parameters", cfg.r, cfg.alpha, ",".join(cfg.targets), n)
    return model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, every adapter's scaling is 0, so the model computes its frozen base exactly (y + 0): the
    reference policy of DPO / RL at no second copy of the weights. Restored on exit, also on error."""
    mods = list(lora_modules(model).values())
    saved = [m.scaling for m in mods]
    for m in mods:
        m.scaling = 0.0
    try:
        yield model
    finally:
        for m, s in zip(mods, saved, strict=True):
            m.scaling = s


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every lora_A / lora_B parameter, in module order (what the optimizer should train)."""
    return [p for m in lora_modules(model).values() for p in (m.lora_A, m.lora_B)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """gemmakit-named adapter tensors ("blocks.0.wq.lora_A" (r, in), "... .lora_B" (out, r)), detached."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A"], out[f"{name}.lora_B"] = m.lora_A.detach(), m.lora_B.detach()
    return out


@torch.no_grad()
def merge_lora(model: Gemma) -> Gemma:
    """Fold B @ A * scaling into every float base weight and put the plain nn.Linear back; returns model.

    The sum is formed in fp32 (fp64 for an fp64 model) and rounded once to the weight's dtype. Parameters stay frozen, as
    `apply_lora` left them. A model without adapters is returned unchanged.
    """
    mods = lora_modules(model)
    quantized = [name for name, m in mods.items() if not isinstance(m.base, nn.Linear)]
    if quantized:
        raise LoraError(
            f"merge_lora: {quantized[0]} has a quantized ({getattr(mods[quantized[0]].base, 'scheme', '?')}) base; merging "
            "would re-quantize W + BA and round the update away; keep the adapter separate (save_adapter)"
        )
    for name, m in mods.items():
        w = m.base.weight
        acc = torch.promote_types(w.dtype, torch.float32)  # bf16 weights: add in fp32, round once
        w.copy_((w.to(acc) + m.delta_weight(acc).to(w.device)).to(w.dtype))
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, m.base)
    return model


# ---- PEFT's on-disk format -------------------------------------------------------------------------


def _hf_module(name: str, model: Gemma) -> str:
    """gemmakit module name -> HF module name, e.g. "blocks.3.wq" -> "model.layers.3.self_attn.q_proj"."""
    return internal_name_to_hf(f"{name}.weight", model.config).removesuffix(".weight")


def _peft_names(model: Gemma, cfg: LoraConfig) -> dict[str, tuple[str, str, tuple[int, int]]]:
    """PEFT tensor key -> (gemmakit module, "lora_A"/"lora_B", shape) for `cfg` applied to `model`."""
    out = {}
    for i, block in enumerate(model.blocks):
        for t in cfg.targets:
            m = getattr(block, t)
            base = m.base if isinstance(m, LoraLinear) else m
            name = f"blocks.{i}.{t}"
            key = _PEFT_PREFIX + _hf_module(name, model)
            out[f"{key}.lora_A.weight"] = (name, "lora_A", (cfg.r, base.in_features))
            out[f"{key}.lora_B.weight"] = (name, "lora_B", (base.out_features, cfg.r))
    return out


def _hf_target(target: str, model: Gemma) -> str:
    return _hf_module(f"blocks.0.{target}", model).rsplit(".", 1)[1]  # "q_proj", "gate_proj", ...


def adapter_config(model: Gemma, cfg: LoraConfig, base_model_name_or_path: str = "") -> dict:
    """The adapter_config.json PEFT writes for this LoRA (fields as in PEFT 0.18's LoraConfig)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "target_modules": sorted(_hf_target(t, model) for t in cfg.targets),
        **_PEFT_DEFAULTS, **{k: None for k in _PEFT_EMPTY}, "rank_pattern": {}, "alpha_pattern": {},
        "init_lora_weights": True, "inference_mode": True, "layers_pattern": None, "revision": None,
    }  # fmt: skip


def save_adapter(model: Gemma, out_dir: str | Path, cfg: LoraConfig, *, base_model_name_or_path: str = "",
                 overwrite: bool = False) -> Path:  # fmt: skip
    """Write adapter_config.json + adapter_model.safetensors (PEFT's names) + manifest.json, atomically."""
    mods = lora_modules(model)
    have = {name.rsplit(".", 1)[1] for name in mods}
    if have != set(cfg.targets):
        raise LoraError(
            f"save_adapter: cfg.targets {sorted(cfg.targets)} but the model adapts {sorted(have)}"
        )
    bad = [n for n, m in mods.items() if m.r != cfg.r or not math.isclose(m.scaling, cfg.scaling)]
    if bad:
        m = mods[bad[0]]
        raise LoraError(
            f"save_adapter: {bad[0]} has r={m.r}, alpha={m.alpha}; cfg says r={cfg.r}, alpha={cfg.alpha}"
        )
    tensors = {}
    for key, (name, which, _) in _peft_names(model, cfg).items():
        tensors[key] = getattr(mods[name], which).detach().to("cpu").contiguous()
    conf = adapter_config(model, cfg, base_model_name_or_path)
    # manifest.json: what wrote the adapter, for which base config, and every file's hash
    fields = {"format": FORMAT, "config": model.config.to_dict(),
              "lora": {**dataclasses.asdict(cfg), "targets": list(cfg.targets)}}  # fmt: skip
    try:
        with atomic_dir(
            out_dir, overwrite=overwrite, producer="gemmakit.lora.save_adapter", extra=fields
        ) as tmp:
            write_safetensors(tmp / ADAPTER_WEIGHTS[0], tensors)
            write_json(tmp / ADAPTER_CONFIG, conf)
    except (ArtifactError, CheckpointError) as e:
        raise LoraError(str(e)) from None
    return Path(out_dir)


def _read_config(path: Path) -> dict:
    """adapter_config.json, checked for what gemmakit's LoRA can represent."""
    try:
        conf = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LoraError(f"{path}: not found; expected a PEFT adapter directory") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoraError(f"{path}: unreadable ({' '.join(str(e).split())})") from None
    if not isinstance(conf, dict):
        raise LoraError(f"{path}: expected a JSON object, got a {type(conf).__name__}")
    if conf.get("peft_type") != "LORA":
        raise LoraError(f"{path}: peft_type: expected 'LORA', got {conf.get('peft_type')!r}")
    for key, default in _PEFT_DEFAULTS.items():
        if conf.get(key, default) != default:
            raise LoraError(f"{path}: {key}={conf[key]!r} is not supported (expected {default!r})")
    for key in _PEFT_EMPTY:
        if conf.get(key):
            raise LoraError(f"{path}: {key}={conf[key]!r} is not supported (expected it empty)")
    return conf


def _config_from(conf: dict, conf_path: Path, file: Path, keys: set[str], model: Gemma) -> LoraConfig:
    """The LoraConfig an adapter describes; targets come from its tensors (target_modules may be a regex)."""
    hf_names = {_hf_target(t, model): t for t in TARGETS}
    listed = conf.get("target_modules")
    unknown = [t for t in listed if t not in hf_names] if isinstance(listed, list) else []
    if unknown:
        raise LoraError(
            f"{conf_path}: target_modules {unknown} not supported; expected some of {sorted(hf_names)}"
        )
    found = {
        k.removesuffix(".lora_A.weight").rsplit(".", 1)[-1] for k in keys if k.endswith(".lora_A.weight")
    }
    targets = tuple(t for hf, t in hf_names.items() if hf in found)
    if not targets:
        raise LoraError(f"{file}: no lora_A tensor for any of {sorted(hf_names)}")
    try:
        r, alpha, dropout = conf.get("r"), conf.get("lora_alpha"), conf.get("lora_dropout", 0.0)
        return LoraConfig(r=r, alpha=alpha, dropout=dropout, targets=targets)
    except LoraError as e:
        raise LoraError(f"{conf_path}: {e}") from None


def load_adapter(model: Gemma, path: str | Path) -> Gemma:
    """Apply the adapter in PEFT directory `path` to a model without adapters (in place); returns model.

    Every tensor name, shape and dtype is checked before the model is touched; a mismatch is a
    LoraError naming the file and the tensor.
    """
    path = Path(path)
    if not path.is_dir() and not recover(path):  # a writer killed mid-replace may have left it aside
        raise LoraError(
            f"{path}: expected a PEFT adapter directory ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS[0]})"
        )
    if lora_modules(model):
        raise LoraError(f"{path}: the model already has LoRA adapters; load into a model without them")
    conf = _read_config(path / ADAPTER_CONFIG)
    file = next((path / f for f in ADAPTER_WEIGHTS if (path / f).is_file()), None)
    if file is None:
        raise LoraError(f"{path}: no {' or '.join(ADAPTER_WEIGHTS)} found")
    try:
        store = open_store([file], safetensors_only=False, where=file)
    except CheckpointError as e:
        raise LoraError(str(e)) from None
    cfg = _config_from(conf, path / ADAPTER_CONFIG, file, set(store.infos), model)
    want = _peft_names(model, cfg)
    unexpected = sorted(set(store.infos) - set(want))
    if unexpected:
        raise LoraError(f"{file}: unexpected tensor {unexpected[0]} ({len(unexpected)} in all)")
    missing = sorted(set(want) - set(store.infos))
    if missing:
        raise LoraError(f"{file}: missing tensor {missing[0]} ({len(missing)} in all)")
    for key, (_, _, shape) in want.items():
        info = store.infos[key]
        if info.shape != shape:
            raise LoraError(
                f"{file}: tensor {key} has shape {list(info.shape)}, expected {list(shape)} (r={cfg.r})"
            )
        if not info.dtype.is_floating_point:
            raise LoraError(f"{file}: tensor {key} has dtype {info.dtype}, expected a float dtype")
    _warn_other_base(path, model)
    apply_lora(model, cfg)
    mods = lora_modules(model)
    with torch.no_grad():
        for key, (name, which, _) in want.items():
            getattr(mods[name], which).copy_(store.fetch(key))
    return model


def _warn_other_base(path: Path, model: Gemma) -> None:
    """Log when a gemmakit-written adapter came from a base with another config (shapes may still agree)."""
    try:
        saved = json.loads((path / "manifest.json").read_text(encoding="utf-8")).get("config")
    except (OSError, ValueError, AttributeError):
        return  # PEFT-written adapters have no manifest
    ours = json.loads(json.dumps(model.config.to_dict()))  # as read back: tuples become lists
    if isinstance(saved, dict) and saved != ours:
        diff = sorted(k for k in set(saved) | set(ours) if saved.get(k) != ours.get(k))
        log.warning("%s: adapter was saved from a base model whose config differs in %s", path, diff)
