"""Loading: resolve a directory or file, pick the config, check everything, build a ready `Gemma`.

Where it sits: on top of `names` and `formats`; `load_model` is what `infer`, `cli` and
`gemmakit.load` call, `describe` / `estimate_memory` back `gemmakit info`. Config comes from the
`config` argument, else `manifest.json`, else `config.json`, else the one preset whose tensor shapes
match. Every problem found (shape, dtype, missing or unexpected tensor, config vs weights, manifest
size or sha256) is collected into ONE `CheckpointError` line; a half-loaded model is never returned.

Key trade-off: the model is built on the `meta` device and given memory-mapped tensors with
`load_state_dict(assign=True)`, so peak RSS grows by ~1.1x the weight bytes (measured on a 62 MB
file; a naive random init + read copy + copy into the parameters measures ~3x). The first meta
model of a process also costs a one-time ~75 MB while torch imports its meta kernels. The price:
weights stay backed by the file (copy-on-write), so overwriting a checkpoint in place while a model
loaded from it is alive changes or faults it. Our writers never do that: they write a temp
directory and rename it into place (see `save`).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gemmakit.artifact import MANIFEST, recover, sha256_file
from gemmakit.checkpoint.formats import (
    _USABLE,
    CheckpointError,
    _err,
    _Info,
    _Store,
    open_store,
)
from gemmakit.checkpoint.names import (
    _GP_BUFFERS,
    _GP_QKV,
    _HF_IGNORED,
    _HF_TEXT_PREFIXES,
    file_names,
    file_shapes,
)
from gemmakit.config import LOCAL, PRESETS, ConfigError, ModelConfig, from_hf_dict, to_hf_dict
from gemmakit.model import ATTN_IMPLS, Gemma, param_count

log = logging.getLogger(__package__)  # "gemmakit.checkpoint", the logger name before the split


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
    if not path.exists() and not recover(path):  # a writer killed mid-replace may have left it aside
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
    hf_cfg = None
    if src.config_json is not None:  # read and checked even beside a manifest: users edit this file
        try:
            hf_cfg = from_hf_dict(_read_json(src.config_json))
        except ConfigError as e:
            raise _err(src.config_json, str(e)) from None
    if src.manifest is not None:
        d = _read_json(src.manifest).get("config")
        try:
            if not isinstance(d, dict):
                raise ConfigError("expected a 'config' object")
            cfg = ModelConfig.from_dict(d)
        except (ConfigError, TypeError) as e:
            raise _err(src.manifest, f"config: {e}") from None
        # compared as config.json fields: the fields a config.json cannot carry are not a disagreement
        ours, theirs = to_hf_dict(cfg), to_hf_dict(hf_cfg) if hf_cfg is not None else None
        if theirs is not None and ours != theirs:
            diff = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
            raise _err(
                src.config_json, f"disagrees with {MANIFEST} on {diff}; edit both or remove {MANIFEST}"
            )
        return cfg, MANIFEST
    if hf_cfg is not None:
        return hf_cfg, "config.json"
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
        elif verify and rec.get("sha256") != sha256_file(path):
            problems.append(f"{path.name}: sha256 differs from manifest.json")
    return problems


def _check(
    infos: dict[str, _Info],
    cfg: ModelConfig,
    cfg_src: str,
    layout: str,
    extra_rows: bool,
    heads: tuple[str, ...] = (),
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
    problems += [f"missing tensor {n}" for n in heads if n not in infos]
    for n, info in infos.items():
        if n in heads:
            continue
        if n not in want and not (n == "lm_head.weight" and cfg.tie_embeddings) and not beyond(n):
            why = (
                " (a reward / sequence-classification head: `gemmakit reward score` reads it)"
                if n == "score.weight"
                else ""
            )
            problems.append(f"unexpected tensor {info.stored_name}{why}")
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
        copied = t.dtype != dtype or t.device != torch.device(device)
        sd[ours] = t.to(device=device, dtype=dtype)
        if copied:
            del t
            store.release(infos[f].stored_name)
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
    model, _ = load_model_with_heads(path, (), dtype, device, attn_impl, config=config, verify=verify)
    return model


def load_model_with_heads(path: str | Path, heads: tuple[str, ...], dtype: torch.dtype | None = None,
                          device: str = "cpu", attn_impl: str = "eager", *, config: ModelConfig | None = None,
                          verify: bool = False) -> tuple[Gemma, dict[str, torch.Tensor]]:  # fmt: skip
    """`load_model` of a checkpoint that also stores the tensors named `heads` (HF names, e.g. a reward
    model's "score.weight"): each must be present (checked with everything else); returned beside the
    model in the same dtype, their shapes for the caller to check."""
    if dtype is not None and dtype not in _USABLE:
        raise CheckpointError(f"dtype: expected one of {[str(d) for d in _USABLE]}, got {dtype}")
    if attn_impl not in ATTN_IMPLS:
        raise CheckpointError(f"attn_impl: expected one of {ATTN_IMPLS}, got {attn_impl!r}")
    try:
        model, extra = _load(Path(path), dtype, device, config, verify, tuple(heads))
    except OSError as e:  # unreadable file, permissions, a directory where a file should be
        raise _err(e.filename or path, e.strerror or str(e)) from None
    return model.set_attn_impl(attn_impl).eval(), extra


def _load(
    path: Path,
    dtype: torch.dtype | None,
    device: str,
    config: ModelConfig | None,
    verify: bool,
    heads: tuple[str, ...] = (),
) -> tuple[Gemma, dict[str, torch.Tensor]]:
    src = _resolve(path)
    if src.manifest is not None and _read_json(src.manifest).get("format") == "quantized":
        raise _err(src.manifest.parent, "a quantized checkpoint (see manifest.json); load it with "
                                        "gemmakit.load() or gemmakit.quantize.load_quantized()")  # fmt: skip
    store = open_store(src.files, src.safetensors_only, src.where)
    infos = _normalize(store)
    layout = _layout(list(infos))
    cfg, cfg_src = _config_for(src, infos, layout, config)
    # Gemma 3 multimodal repos hold image-token embedding rows past the text vocab; they are dropped.
    extra_rows = src.config_json is not None and _read_json(src.config_json).get("model_type") == "gemma3"
    problems = _check_manifest(src, verify) + _check(infos, cfg, cfg_src, layout, extra_rows, heads)
    if problems:
        raise _err(src.where, problems)
    sd = _materialize(store, infos, cfg, layout, dtype, device)
    out_dtype = sd["embed.weight"].dtype
    extra = {n: store.fetch(infos[n].stored_name).to(device=device, dtype=out_dtype).clone() for n in heads}
    with torch.device("meta"):
        model = Gemma(cfg)
    model.load_state_dict(sd, assign=True, strict=True)
    log.info("loaded %s (%s layout, %d file(s), config from %s)", src.where, layout, len(src.files), cfg_src)
    return model, extra


def describe(path: str | Path, config: ModelConfig | None = None) -> dict[str, Any]:
    """What `load_model` would load, from headers and JSON only (no tensor data is read from safetensors).

    Returns {"config", "config_source", "format" ("hf" or "gemma_pytorch" layout), "dtype" (the most
    common floating dtype stored), "files"}. Raises `CheckpointError` like `load_model`.
    """
    src = _resolve(Path(path))
    infos = _normalize(open_store(src.files, src.safetensors_only, src.where))
    layout = _layout(list(infos))
    cfg, cfg_src = _config_for(src, infos, layout, config)
    counts: dict[torch.dtype, int] = {}
    for info in infos.values():
        if info.dtype.is_floating_point:
            counts[info.dtype] = counts.get(info.dtype, 0) + math.prod(info.shape)
    dtype = max(counts, key=counts.__getitem__) if counts else torch.float32
    return {"config": cfg, "config_source": cfg_src, "format": layout, "dtype": dtype, "files": src.files}


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
