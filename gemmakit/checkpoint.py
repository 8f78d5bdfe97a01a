"""Checkpoints: read and write model weights in the HF safetensors and gemma_pytorch layouts.

Where it sits: after `config` and `model`, before `quantize`/`infer`/`cli`. `load_model` turns a
directory or a single file into a ready `Gemma`; `save_hf` / `save_gemma_pytorch` write one back,
each with a `manifest.json` (format, gemmakit version, dtype, the exact ModelConfig, sha256 and
size of every weight file), so a saved directory describes itself.

Formats are told apart by content, never by file name (`detect_format`): safetensors is an 8-byte
little-endian header length followed by a JSON object; a PyTorch zip pickle starts `PK\\x03\\x04`;
a legacy pickle starts with the protocol byte `\\x80`. Pickles are only opened with
`torch.load(weights_only=True)` and never from a slot that must hold safetensors. The safetensors
header is validated here before the library sees it, so a header length of 2**40 is refused before
anything is allocated. Every problem found (shape, dtype, missing or unexpected tensor, config vs
weights) is collected into ONE `CheckpointError` line; a half-loaded model is never returned.

Key trade-off: the model is built on the `meta` device and given memory-mapped tensors with
`load_state_dict(assign=True)`, so peak RSS grows by ~1.1x the weight bytes (measured on a 62 MB
file; a naive random init + read copy + copy into the parameters measures ~3x). The first meta
model of a process also costs a one-time ~75 MB while torch imports its meta kernels. The price: weights stay backed by the file (copy-on-write), so overwriting a
checkpoint in place while a model loaded from it is alive changes or faults it. Our writers never
do that: they write a temp directory and rename it into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from gemmakit.config import LOCAL, PRESETS, ConfigError, ModelConfig, from_hf_dict, to_hf_dict
from gemmakit.model import ATTN_IMPLS, Gemma, param_count

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMATS = ("hf", "gemma_pytorch")
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit on header bytes
_USABLE = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class CheckpointError(ValueError):
    """A checkpoint cannot be read or written; the message is one line naming the file and problems."""


def _err(where: Path | str, problems: str | list[str]) -> CheckpointError:
    items = [problems] if isinstance(problems, str) else problems
    items = [" ".join(p.split()) for p in items]  # one line, always
    body = items[0] if len(items) == 1 else f"{len(items)} problems: " + "; ".join(items)
    return CheckpointError(f"{where}: {body}")


# ---- name mapping: HF transformers <-> gemmakit ------------------------------------------------
# Reference checkpoint names appear only in tables like these (STYLE.md).

_HF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "wq.weight",
    "self_attn.k_proj.weight": "wk.weight",
    "self_attn.v_proj.weight": "wv.weight",
    "self_attn.o_proj.weight": "wo.weight",
    "self_attn.q_norm.weight": "q_norm.weight",
    "self_attn.k_norm.weight": "k_norm.weight",
    "pre_feedforward_layernorm.weight": "mlp_norm.weight",
    "post_feedforward_layernorm.weight": "post_mlp_norm.weight",
    "mlp.gate_proj.weight": "w_gate.weight",
    "mlp.up_proj.weight": "w_up.weight",
    "mlp.down_proj.weight": "w_down.weight",
}
_HF_TOP = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "final_norm.weight"}
# Gemma 3 multimodal repos: text tensors under one of these prefixes (older Hub / transformers 5.x).
_HF_TEXT_PREFIXES = ("language_model.model.", "model.language_model.")
_HF_IGNORED = (
    "vision_tower.",
    "multi_modal_projector.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
)


def hf_layer_table(cfg: ModelConfig) -> dict[str, str]:
    """Per-layer HF suffix -> gemmakit suffix. Gemma 1's `post_attention_layernorm` is its PRE-MLP norm."""
    table = dict(_HF_LAYER)
    table["post_attention_layernorm.weight"] = (
        "post_attn_norm.weight" if cfg.sandwich_norm else "mlp_norm.weight"
    )
    return table


def hf_name_to_internal(name: str, cfg: ModelConfig) -> str | None:
    """Map one HF tensor name to ours; None for names we do not know (callers report them)."""
    if name in _HF_TOP:
        return _HF_TOP[name]
    if name == "lm_head.weight" and not cfg.tie_embeddings:
        return "lm_head.weight"
    parts = name.split(".", 3)  # model . layers . {i} . suffix
    if len(parts) == 4 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        suffix = hf_layer_table(cfg).get(parts[3])
        if suffix is not None:
            return f"blocks.{int(parts[2])}.{suffix}"
    return None


def internal_name_to_hf(name: str, cfg: ModelConfig) -> str:
    """Inverse of `hf_name_to_internal` for every parameter name of `Gemma(cfg)`."""
    for hf, ours in _HF_TOP.items():
        if name == ours:
            return hf
    if name == "lm_head.weight":
        return name
    _, i, suffix = name.split(".", 2)
    inverse = {v: k for k, v in hf_layer_table(cfg).items()}
    return f"model.layers.{i}.{inverse[suffix]}"


def hf_state_dict_to_internal(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename an HF Gemma state dict (tied `lm_head.weight` dropped); unknown names raise KeyError."""
    out = {}
    for name, t in sd.items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        ours = hf_name_to_internal(name, cfg)
        if ours is None:
            raise KeyError(name)
        out[ours] = t
    return out


# ---- name mapping: google/gemma_pytorch <-> gemmakit (reference §3.2) ----------------------------
# Same per-layer names as HF except a FUSED qkv_proj (rows q, then k, then v) and query/key_norm.

_GP_TOP = {"embedder.weight": "embed.weight", "model.norm.weight": "final_norm.weight"}
_GP_QKV = "self_attn.qkv_proj.weight"
_GP_RENAMED = {
    "self_attn.q_norm.weight": "self_attn.query_norm.weight",
    "self_attn.k_norm.weight": "self_attn.key_norm.weight",
}
_GP_BUFFERS = ("freqs_cis", "local_freqs_cis", "global_freqs_cis")  # RoPE tables, recomputed by us


def file_names(cfg: ModelConfig, layout: str) -> dict[str, str]:
    """gemmakit parameter name -> tensor name in `layout` ("hf" or "gemma_pytorch"); wq/wk/wv share qkv."""
    with torch.device("meta"):
        names = [n for n, _ in Gemma(cfg).named_parameters()]
    if layout == "hf":
        return {n: internal_name_to_hf(n, cfg) for n in names}
    out = {}
    for n in names:
        hf = internal_name_to_hf(n, cfg)
        if n.split(".")[-2] in ("wq", "wk", "wv"):
            out[n] = hf.rsplit(".", 3)[0] + "." + _GP_QKV
        else:
            out[n] = {"model.embed_tokens.weight": "embedder.weight"}.get(hf, hf)
            for old, new in _GP_RENAMED.items():
                out[n] = out[n].replace(old, new)
    return out


def file_shapes(cfg: ModelConfig, layout: str) -> dict[str, tuple[int, ...]]:
    """Every tensor a complete `layout` checkpoint of `cfg` holds, with its shape (qkv fused)."""
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in Gemma(cfg).named_parameters()}
    out: dict[str, tuple[int, ...]] = {}
    for n, f in file_names(cfg, layout).items():
        fused = f.endswith(_GP_QKV)
        out[f] = ((cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, cfg.dim) if fused else shapes[n]
    return out


# ---- format detection and safetensors header validation ------------------------------------------


def detect_format(path: str | Path) -> str:
    """'safetensors', 'torch_zip' or 'pickle' from the first bytes; anything else is a CheckpointError."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise _err(path, e.strerror or str(e)) from None
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        return "torch_zip"
    if head.startswith(b"\x80"):
        return "pickle"
    what = "empty file" if not head else f"first bytes {head.hex()} ({path.stat().st_size} bytes in all)"
    raise _err(path, f"unknown format: not safetensors, a PyTorch zip or a pickle ({what})")


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


@dataclass
class _Info:
    """One stored tensor, known from its header before any data is read."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    stored_name: str  # the name in the file (multimodal prefixes included), used in messages


def _header_entry(name: str, e: Any) -> tuple[torch.dtype | None, list[int], int, str | None]:
    """(dtype, shape, end offset, problem) for one safetensors header entry."""
    if not (
        isinstance(e, dict) and isinstance(e.get("shape"), list) and isinstance(e.get("data_offsets"), list)
    ):
        return None, [], 0, f"{name}: malformed header entry {json.dumps(e)[:80]}"
    shape, offs, dt = e["shape"], e["data_offsets"], _ST_DTYPES.get(e.get("dtype"))
    if not all(isinstance(x, int) and x >= 0 for x in shape + offs) or len(offs) != 2 or offs[0] > offs[1]:
        return None, [], 0, f"{name}: malformed shape {shape} or data_offsets {offs}"
    if dt is None:
        return None, [], 0, f"{name}: unknown dtype {e.get('dtype')!r}"
    need = math.prod(shape) * dt.itemsize
    if offs[1] - offs[0] != need:
        return (
            None,
            [],
            0,
            f"{name}: data_offsets {offs} hold {offs[1] - offs[0]} bytes, {e['dtype']} x {shape} needs {need}",
        )
    return dt, shape, offs[1], None


def read_safetensors_header(path: str | Path) -> dict[str, _Info]:
    """Validate a safetensors header against the file size and return its tensors, reading no data."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _err(path, f"truncated: expected at least 8 bytes, got {size}")
        (n,) = struct.unpack("<Q", head)
        if n >= _MAX_HEADER:
            raise _err(path, f"safetensors header length {n} exceeds the {_MAX_HEADER} byte limit")
        if n > size - 8:
            raise _err(path, f"truncated: header length {n} needs {n + 8} bytes, got {size}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _err(path, f"safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise _err(path, f"safetensors header is a JSON {type(header).__name__}, expected an object")
    problems, infos, ends, data_len = [], {}, {}, size - 8 - n
    for name, e in header.items():
        if name == "__metadata__":
            continue
        dt, shape, end, problem = _header_entry(name, e)
        if problem:
            problems.append(problem)
        else:
            infos[name], ends[name] = _Info(dt, tuple(shape), path, name), end
    past = [k for k, end in ends.items() if end > data_len]
    if past:
        expected = 8 + n + max(ends.values())
        problems.insert(
            0,
            f"truncated: expected {expected} bytes, got {size} (data of {', '.join(past)} lies past the end)",
        )
    if problems:
        raise _err(path, problems)
    return infos


# ---- opening weight files --------------------------------------------------------------------


@dataclass
class _Store:
    """The tensors of one checkpoint (one or more files), by stored name; data is read lazily."""

    infos: dict[str, _Info] = field(default_factory=dict)
    loaded: dict[str, torch.Tensor] = field(default_factory=dict)  # torch files: mmap-backed already
    handles: dict[Path, Any] = field(default_factory=dict)  # open safetensors files (tensors outlive them)

    def fetch(self, name: str) -> torch.Tensor:
        if name in self.loaded:
            return self.loaded[name]
        from safetensors import SafetensorError, safe_open

        info = self.infos[name]
        try:
            if info.file not in self.handles:
                self.handles[info.file] = safe_open(str(info.file), framework="pt")
            return self.handles[info.file].get_tensor(name)
        except SafetensorError as e:
            raise _err(info.file, f"corrupt safetensors file ({e})") from None


def _torch_load(path: Path, fmt: str) -> dict[str, torch.Tensor]:
    """A state dict from a zip or legacy pickle, through the weights-only unpickler only."""
    try:  # mmap needs the zip layout; legacy pickles are read into memory
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=fmt == "torch_zip")
    except Exception as e:  # the unpickler raises many types; all mean "not a weights file we accept"
        lines = [ln.strip() for ln in str(e).splitlines() if "WeightsUnpickler error" in ln]
        why = lines[0] if lines else (str(e).splitlines() or [type(e).__name__])[0]
        raise _err(path, f"refused or failed to load as weights-only {fmt} ({why})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model_state_dict"), dict):
        obj = obj["model_state_dict"]
    if not isinstance(obj, dict):
        raise _err(path, f"expected a state dict, found a {type(obj).__name__}")
    bad = [str(k) for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise _err(path, f"expected name -> tensor entries, found non-tensor entries {bad}")
    return obj


def _open_store(files: list[Path], safetensors_only: bool, where: Path) -> _Store:
    store, problems = _Store(), []
    for path in files:
        fmt = detect_format(path)
        if safetensors_only and fmt != "safetensors":
            raise _err(path, f"not a safetensors file (its content is a {fmt}); refusing to unpickle it")
        if fmt == "safetensors":
            infos = read_safetensors_header(path)
        else:
            tensors = _torch_load(path, fmt)
            infos = {k: _Info(t.dtype, tuple(t.shape), path, k) for k, t in tensors.items()}
            store.loaded.update(tensors)
        for k, info in infos.items():
            if k in store.infos:
                problems.append(f"tensor {k} is stored twice ({store.infos[k].file.name}, {path.name})")
            store.infos[k] = info
    if problems:
        raise _err(where, problems)
    return store


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _err(path, f"cannot read JSON ({e})") from None
    if not isinstance(data, dict):
        raise _err(path, "expected a JSON object")
    return data


def _index_files(index: Path) -> list[Path]:
    """Shard files named by an HF-style index.json; names must be plain files in the same directory."""
    wmap = _read_json(index).get("weight_map")
    if not isinstance(wmap, dict) or not wmap:
        raise _err(index, "expected a non-empty 'weight_map' object")
    names = sorted({str(v) for v in wmap.values()})
    bad = [v for v in names if Path(v).name != v or v in (".", "..")]
    if bad:
        raise _err(index, f"weight_map names files outside its directory: {bad}")
    missing = [v for v in names if not (index.parent / v).is_file()]
    if missing:
        raise _err(index, f"shard file(s) not found: {missing}")
    return [index.parent / v for v in names]


@dataclass
class _Source:
    where: Path  # the path error messages name first
    files: list[Path]
    safetensors_only: bool  # files in a safetensors slot: a pickle there is refused, never unpickled
    manifest: Path | None = None
    config_json: Path | None = None


def _resolve(path: Path) -> _Source:
    if not path.exists():
        raise _err(path, "no such file or directory")
    if path.is_file():
        sibling = path.parent / MANIFEST
        listed = sibling.is_file() and path.name in (_read_json(sibling).get("files") or {})
        return _Source(path, [path], False, manifest=sibling if listed else None)
    man, cfgj = path / MANIFEST, path / "config.json"
    src = _Source(path, [], True, man if man.is_file() else None, cfgj if cfgj.is_file() else None)
    if (path / "model.safetensors.index.json").is_file():
        src.files = _index_files(path / "model.safetensors.index.json")
    elif (path / "model.safetensors").is_file():
        src.files, src.where = [path / "model.safetensors"], path / "model.safetensors"
    elif (path / "pytorch_model.bin.index.json").is_file():
        src.files, src.safetensors_only = _index_files(path / "pytorch_model.bin.index.json"), False
    else:
        ckpts = sorted(path.glob("*.ckpt")) or sorted(path.glob("pytorch_model.bin"))
        if len(ckpts) != 1:
            raise _err(path, "no weights found: expected model.safetensors, model.safetensors.index.json, "
                             f"pytorch_model.bin.index.json or exactly one *.ckpt file (found {len(ckpts)})")  # fmt: skip
        src.files, src.where, src.safetensors_only = ckpts, ckpts[0], False
    return src


# ---- config and checks --------------------------------------------------------------------------


def _layout(names: list[str]) -> str:
    gp = any(n == "embedder.weight" or n.endswith(_GP_QKV) for n in names)
    return "gemma_pytorch" if gp else "hf"


def _normalize(store: _Store) -> dict[str, _Info]:
    """Stored name -> canonical name: multimodal prefixes stripped; vision, projector and buffers dropped."""
    out = {}
    for name, info in store.infos.items():
        if name.startswith(_HF_IGNORED) or name in _GP_BUFFERS:
            continue
        if name == "language_model.lm_head.weight":
            name = "lm_head.weight"
        for prefix in _HF_TEXT_PREFIXES:
            if name.startswith(prefix):
                name = "model." + name[len(prefix) :]
        out[name] = info
    return out


def _infer_config(infos: dict[str, _Info], layout: str, where: Path) -> tuple[ModelConfig, str]:
    """The one preset whose every tensor shape matches the file; ambiguity and no match are errors."""
    found = {n: i.shape for n, i in infos.items() if n != "lm_head.weight"}
    matches: dict[ModelConfig, list[str]] = {}
    for name, cfg in PRESETS.items():
        if file_shapes(cfg, layout) == found:
            matches.setdefault(cfg, []).append(name)
    if len(matches) == 1:
        ((cfg, names),) = matches.items()
        return cfg, f"preset {'/'.join(names)} (inferred from tensor shapes)"
    if matches:
        raise _err(where, f"ambiguous: tensor shapes match presets {list(matches.values())}; pass config=")
    embed = found.get("embedder.weight", found.get("model.embed_tokens.weight"))
    raise _err(where, f"no config.json or manifest.json, and no preset matches the tensor shapes "
                      f"(embedding {embed}, {len(found)} tensors); pass config=")  # fmt: skip


def _config_for(src: _Source, infos: dict[str, _Info], layout: str, config: ModelConfig | None) -> tuple[ModelConfig, str]:  # fmt: skip
    """(config, where it came from): the argument, else manifest.json, else config.json, else a preset."""
    if config is not None:
        return config, "config argument"
    if src.manifest is not None:
        d = _read_json(src.manifest).get("config")
        try:
            if not isinstance(d, dict):
                raise ConfigError("expected a 'config' object")
            return ModelConfig.from_dict(d), MANIFEST
        except (ConfigError, TypeError) as e:
            raise _err(src.manifest, f"config: {e}") from None
    if src.config_json is not None:
        try:
            return from_hf_dict(_read_json(src.config_json)), "config.json"
        except ConfigError as e:
            raise _err(src.config_json, str(e)) from None
    return _infer_config(infos, layout, src.where)


def _check_manifest(src: _Source, verify: bool) -> list[str]:
    files = (_read_json(src.manifest).get("files") or {}) if src.manifest else {}
    problems = []
    for path in src.files:
        rec = files.get(path.name)
        if not isinstance(rec, dict):
            continue
        if rec.get("size") != path.stat().st_size:
            problems.append(
                f"{path.name}: size expected {rec.get('size')} (manifest.json), found {path.stat().st_size}"
            )
        elif verify and rec.get("sha256") != _sha256(path):
            problems.append(f"{path.name}: sha256 differs from manifest.json")
    return problems


def _check(
    infos: dict[str, _Info], cfg: ModelConfig, cfg_src: str, layout: str, extra_rows: bool
) -> list[str]:
    """Every disagreement between the stored tensors and `cfg`, as message fragments."""
    want, problems = file_shapes(cfg, layout), []
    layers = {
        int(n.split(".")[2]) for n in infos if n.startswith("model.layers.") and n.split(".")[2].isdigit()
    }
    n_file = max(layers) + 1 if layers else 0
    if n_file != cfg.n_layers:
        problems.append(f"n_layers: {cfg_src} says {cfg.n_layers}, the weights hold {n_file} layers")

    def beyond(n: str) -> bool:  # already covered by the layer-count message
        i = n.split(".")[2] if n.startswith("model.layers.") else ""
        return i.isdigit() and int(i) >= min(n_file, cfg.n_layers)

    multi = len({i.file for i in infos.values()}) > 1  # sharded: say which shard holds a bad tensor

    embed = "embedder.weight" if layout == "gemma_pytorch" else "model.embed_tokens.weight"
    for n, shape in want.items():
        info = infos.get(n)
        if info is None:
            problems += [] if beyond(n) else [f"missing tensor {n}"]
            continue
        label = info.stored_name + (f" ({info.file.name})" if multi else "")
        if info.dtype not in _USABLE:
            problems.append(
                f"{label}: dtype expected float32/bfloat16/float16/float64, found {str(info.dtype).removeprefix('torch.')}"
            )
        if n == embed and info.shape[1:] == shape[1:] and info.shape[0] != shape[0]:
            if not (extra_rows and info.shape[0] > shape[0]):
                problems.append(
                    f"vocab_size: {cfg_src} says {cfg.vocab_size}, {label} has {info.shape[0]} rows"
                )
        elif info.shape != shape:
            problems.append(f"{label}: shape expected {list(shape)}, found {list(info.shape)}")
    lm = infos.get("lm_head.weight")
    if lm is not None and cfg.tie_embeddings and embed in infos and lm.shape != infos[embed].shape:
        problems.append(
            f"{lm.stored_name}: tied model, shape expected {list(infos[embed].shape)}, found {list(lm.shape)}"
        )
    for n, info in infos.items():
        if n not in want and not (n == "lm_head.weight" and cfg.tie_embeddings) and not beyond(n):
            problems.append(f"unexpected tensor {info.stored_name}")
    return problems


# ---- loading ------------------------------------------------------------------------------------


def _materialize(store: _Store, infos: dict[str, _Info], cfg: ModelConfig, layout: str,
                 dtype: torch.dtype | None, device: str) -> dict[str, torch.Tensor]:  # fmt: skip
    """gemmakit state dict of views into the mapped files; copies only where dtype or device change."""
    names = file_names(cfg, layout)
    if dtype is None:
        dtype = infos[names["embed.weight"]].dtype
        mixed = sorted({str(infos[f].dtype) for f in names.values()})
        if len(mixed) > 1:
            log.warning("checkpoint mixes dtypes %s; casting all to the embedding's %s", mixed, dtype)
    q_rows, kv_rows = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    split = {"wq": (0, q_rows), "wk": (q_rows, kv_rows), "wv": (q_rows + kv_rows, kv_rows)}
    sd = {}
    for ours, f in names.items():
        t = store.fetch(infos[f].stored_name)
        if ours == "embed.weight":
            t = t[: cfg.vocab_size]  # multimodal repos: rows past the text vocab are image tokens
        if f.endswith(_GP_QKV):
            t = t.narrow(0, *split[ours.split(".")[-2]])  # fused rows: q, then k, then v
        sd[ours] = t.to(device=device, dtype=dtype)
    return sd


def load_model(path: str | Path, dtype: torch.dtype | None = None, device: str = "cpu", attn_impl: str = "eager",
               *, config: ModelConfig | None = None, verify: bool = False) -> Gemma:  # fmt: skip
    """Load a Gemma from an HF or gemma_pytorch directory, or from one weights file.

    Config comes from `config`, else `manifest.json`, else `config.json`, else the one preset whose
    tensor shapes match. `dtype=None` keeps the stored dtype. `verify=True` also checks the sha256
    of every weight file listed in manifest.json (sizes are always checked). Raises
    `CheckpointError` listing every problem at once; returns the model in eval mode.
    """
    if dtype is not None and dtype not in _USABLE:
        raise CheckpointError(f"dtype: expected one of {[str(d) for d in _USABLE]}, got {dtype}")
    if attn_impl not in ATTN_IMPLS:
        raise CheckpointError(f"attn_impl: expected one of {ATTN_IMPLS}, got {attn_impl!r}")
    try:
        model = _load(Path(path), dtype, device, config, verify)
    except OSError as e:  # unreadable file, permissions, a directory where a file should be
        raise _err(e.filename or path, e.strerror or str(e)) from None
    return model.set_attn_impl(attn_impl).eval()


def _load(
    path: Path, dtype: torch.dtype | None, device: str, config: ModelConfig | None, verify: bool
) -> Gemma:
    src = _resolve(path)
    store = _open_store(src.files, src.safetensors_only, src.where)
    infos = _normalize(store)
    layout = _layout(list(infos))
    cfg, cfg_src = _config_for(src, infos, layout, config)
    # Gemma 3 multimodal repos hold image-token embedding rows past the text vocab; they are dropped.
    extra_rows = src.config_json is not None and _read_json(src.config_json).get("model_type") == "gemma3"
    problems = _check_manifest(src, verify) + _check(infos, cfg, cfg_src, layout, extra_rows)
    if problems:
        raise _err(src.where, problems)
    sd = _materialize(store, infos, cfg, layout, dtype, device)
    with torch.device("meta"):
        model = Gemma(cfg)
    model.load_state_dict(sd, assign=True, strict=True)
    log.info("loaded %s (%s layout, %d file(s), config from %s)", src.where, layout, len(src.files), cfg_src)
    return model


def describe(path: str | Path, config: ModelConfig | None = None) -> dict[str, Any]:
    """What `load_model` would load, from headers and JSON only (no tensor data is read from safetensors).

    Returns {"config", "config_source", "format" ("hf" or "gemma_pytorch" layout), "dtype" (the most
    common floating dtype stored), "files"}. Raises `CheckpointError` like `load_model`.
    """
    src = _resolve(Path(path))
    infos = _normalize(_open_store(src.files, src.safetensors_only, src.where))
    layout = _layout(list(infos))
    cfg, cfg_src = _config_for(src, infos, layout, config)
    counts: dict[torch.dtype, int] = {}
    for info in infos.values():
        if info.dtype.is_floating_point:
            counts[info.dtype] = counts.get(info.dtype, 0) + math.prod(info.shape)
    dtype = max(counts, key=counts.__getitem__) if counts else torch.float32
    return {"config": cfg, "config_source": cfg_src, "format": layout, "dtype": dtype, "files": src.files}


# ---- writing ------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes | None = None, tensors: dict[str, torch.Tensor] | None = None,
                pickle_obj: object = None) -> None:  # fmt: skip
    """Write bytes, raw tensor data (in order) or a torch.save payload, then fsync."""
    with open(path, "wb") as f:
        if data is not None:
            f.write(data)
        for t in (tensors or {}).values():
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)  # little-endian, as the spec
        if pickle_obj is not None:
            torch.save(pickle_obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file written tensor by tensor (no whole-file copy in memory)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}  # transformers requires format=pt
    offset = 0
    for name, t in tensors.items():
        header[name] = {
            "dtype": _ST_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the safetensors library writes it
    _write_file(path, struct.pack("<Q", len(raw)) + raw, tensors=tensors)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _version() -> str:
    try:
        return metadata.version("gemmakit")
    except metadata.PackageNotFoundError:
        return "unknown"


def _write_manifest(out: Path, fmt: str, cfg: ModelConfig, dtype: torch.dtype, files: list[str]) -> None:
    manifest = {
        "format": fmt, "gemmakit_version": _version(), "dtype": str(dtype).removeprefix("torch."),
        "config": cfg.to_dict(),
        "files": {f: {"sha256": _sha256(out / f), "size": (out / f).stat().st_size} for f in files},
    }  # fmt: skip
    _write_file(out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())


@contextlib.contextmanager
def _atomic_dir(out_dir: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temp dir next to `out_dir`; on success rename it into place, on failure remove it."""
    out_dir = Path(os.path.abspath(out_dir))
    if out_dir.exists() and not out_dir.is_dir():
        raise _err(out_dir, "exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise _err(out_dir, "exists and is not empty; pass overwrite=True to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    old = tmp.with_name(tmp.name.replace(".tmp-", ".old-"))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        _fsync_dir(tmp)
        if out_dir.exists():
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        _fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out_dir.exists():
            os.rename(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _owned(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A CPU tensor in `dtype`; views are cloned so torch.save does not write their whole storage."""
    t = t.detach().to("cpu", dtype or t.dtype)
    return t.clone() if t.untyped_storage().nbytes() != t.nbytes else t


def _out_dtype(model: Gemma, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None and dtype not in _USABLE:
        raise CheckpointError(f"dtype: expected one of {[str(d) for d in _USABLE]}, got {dtype}")
    return dtype or model.embed.weight.dtype


def save_hf(model: Gemma, out_dir: str | Path, dtype: torch.dtype | None = None,
            max_shard_bytes: int | None = None, *, overwrite: bool = False) -> Path:  # fmt: skip
    """Write config.json + model.safetensors (or HF-named shards + index) + manifest.json, atomically.

    Sharding follows transformers: with one shard there is no index file. Tensors go to disk one
    at a time, so writing costs one tensor of extra memory, not a copy of the model.
    """
    cfg, dtype = model.config, _out_dtype(model, dtype)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu", dtype)
        if max_shard_bytes and shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][internal_name_to_hf(name, cfg)] = t
        size += t.nbytes
    n = len(shards)
    names = (
        ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    hf = {**to_hf_dict(cfg), "torch_dtype": str(dtype).removeprefix("torch.")}
    with _atomic_dir(Path(out_dir), overwrite) as tmp:
        for fname, shard in zip(names, shards, strict=True):
            _write_safetensors(tmp / fname, shard)
        if n > 1:
            index = {
                "metadata": {"total_size": sum(t.nbytes for s in shards for t in s.values())},
                "weight_map": {k: fname for fname, s in zip(names, shards, strict=True) for k in s},
            }
            _write_file(tmp / "model.safetensors.index.json", json.dumps(index, indent=2).encode())
        _write_file(tmp / "config.json", (json.dumps(hf, indent=2) + "\n").encode())
        _write_manifest(tmp, "hf", cfg, dtype, names)
    return Path(out_dir)


def save_gemma_pytorch(model: Gemma, path: str | Path, dtype: torch.dtype | None = None,
                       *, overwrite: bool = False) -> Path:  # fmt: skip
    """Write directory `path` holding model.ckpt ({"model_state_dict": ...}, qkv fused) + manifest.json.

    gemma_pytorch's own `load_weights` reads the ckpt unchanged; its RoPE buffers are not stored
    (it loads with strict=False and recomputes them).
    """
    cfg, dtype = model.config, _out_dtype(model, dtype)
    if not cfg.tie_embeddings:
        raise _err(path, "the gemma_pytorch layout has no separate output matrix; this model is untied")
    sd, out = model.state_dict(), {}
    for ours, f in file_names(cfg, "gemma_pytorch").items():
        if not f.endswith(_GP_QKV):
            out[f] = _owned(sd[ours], dtype)
        elif ours.endswith("wq.weight"):
            prefix = ours.removesuffix("wq.weight")
            qkv = [sd[prefix + w] for w in ("wq.weight", "wk.weight", "wv.weight")]
            out[f] = torch.cat(qkv, dim=0).detach().to("cpu", dtype)  # (n_h + 2 n_kv) * d rows
    with _atomic_dir(Path(path), overwrite) as tmp:
        _write_file(tmp / "model.ckpt", pickle_obj={"model_state_dict": out})
        _write_manifest(tmp, "gemma_pytorch", cfg, dtype, ["model.ckpt"])
    return Path(path)


def convert_checkpoint(src: str | Path, out: str | Path, to: str, *, dtype: torch.dtype | None = None,
                       config: ModelConfig | None = None, max_shard_bytes: int | None = None,
                       overwrite: bool = False) -> Path:  # fmt: skip
    """Load any supported checkpoint and write it as `to` ("hf" or "gemma_pytorch") into directory `out`."""
    if to not in FORMATS:
        raise CheckpointError(f"to: expected one of {FORMATS}, got {to!r}")
    model = load_model(src, config=config)
    if to == "hf":
        return save_hf(model, out, dtype=dtype, max_shard_bytes=max_shard_bytes, overwrite=overwrite)
    return save_gemma_pytorch(model, out, dtype=dtype, overwrite=overwrite)


def estimate_memory(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """Bytes for the weights and for the KV cache per 1024 tokens of context at batch 1.

    `kv_bytes_per_1k` stores every layer's 1024 keys and values; `kv_bytes_per_1k_windowed` caps
    local layers at `sliding_window` keys (Gemma 3 1B: 22 of 26 layers keep only 512).
    """
    item = dtype.itemsize
    n = param_count(cfg)
    per_token_layer = 2 * cfg.n_kv_heads * cfg.head_dim * item  # one key and one value vector
    window = cfg.sliding_window or 1024
    windowed = sum(min(1024, window) if t == LOCAL else 1024 for t in cfg.layer_types)
    return {
        "params": n,
        "weight_bytes": n * item,
        "kv_bytes_per_1k": per_token_layer * 1024 * cfg.n_layers,
        "kv_bytes_per_1k_windowed": per_token_layer * windowed,
    }
