"""Saving: write HF or gemma_pytorch checkpoint directories atomically, each with a `manifest.json`.

Where it sits: on top of `names`, `formats` and `load` (`convert_checkpoint` loads, then saves).
`save_hf` / `save_gemma_pytorch` write a directory holding a `manifest.json` (format, gemmakit
version, dtype, the exact ModelConfig, sha256 and size of every file), so a saved directory
describes itself and `load_model` can check it. `checkpoint_dir` is that writer for every model
directory (quantized checkpoints and LoRA adapters too), on top of `gemmakit.artifact`.

Key trade-off: no partial writes. Everything goes to a temp directory next to the target, every
file and the directory are fsynced, and only then is it swapped into place (`artifact.commit`).
This costs a second copy of the checkpoint on disk while writing, and it is what keeps
memory-mapped models loaded from the old files valid.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from gemmakit.artifact import MANIFEST, ArtifactError, atomic_dir, write_json
from gemmakit.checkpoint.formats import _ST_NAMES, _USABLE, CheckpointError, _err
from gemmakit.checkpoint.load import load_model
from gemmakit.checkpoint.names import _GP_QKV, FORMATS, file_names, internal_name_to_hf
from gemmakit.config import ModelConfig, to_hf_dict
from gemmakit.model import Gemma


def _write_file(path: Path, data: bytes | None = None, tensors: dict[str, torch.Tensor] | None = None,
                pickle_obj: object = None) -> None:  # fmt: skip
    """Write bytes, raw tensor data (in order) or a torch.save payload, then fsync."""
    with open(path, "wb") as f:
        if data is not None:
            f.write(data)
        for t in (tensors or {}).values():
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)  # little-endian, as the spec
        if pickle_obj is not None:
            sink = _WriteRecorder(f)
            try:
                torch.save(pickle_obj, sink)
            except RuntimeError:
                # torch's zip writer turns a failed write (disk full...) into an opaque RuntimeError;
                # raise the OSError it swallowed, which says what the user can fix
                if sink.error is not None:
                    raise sink.error from None
                raise
        f.flush()
        os.fsync(f.fileno())


class _WriteRecorder:
    """A write-only file wrapper that keeps the OSError of a failed write (see `_write_file`)."""

    def __init__(self, f: Any) -> None:
        self.f, self.error = f, None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
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


def write_torch(path: Path, obj: Any) -> None:
    """A torch.save payload, fsynced; a failed write (disk full, ...) raises its own OSError."""
    _write_file(path, pickle_obj=obj)


@contextlib.contextmanager
def checkpoint_dir(out_dir: str | Path, *, overwrite: bool, producer: str, fmt: str, config: ModelConfig,
                   dtype: torch.dtype | str, **fields: Any) -> Iterator[Path]:  # fmt: skip
    """`artifact.atomic_dir` for a model directory: yields the temp directory to write into.

    Its manifest.json gets "format" `fmt`, "dtype", "config" (the exact ModelConfig, what `load_model`
    reads), `fields` and the sha256 and size of every file. A target in the way is a CheckpointError.
    """
    extra = {"format": fmt, "dtype": str(dtype).removeprefix("torch."), "config": config.to_dict(), **fields}
    try:
        with atomic_dir(out_dir, overwrite=overwrite, producer=producer, extra=extra) as tmp:
            yield tmp
    except ArtifactError as e:
        raise CheckpointError(str(e)) from None


def _owned(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A CPU tensor in `dtype`; views are cloned so torch.save does not write their whole storage."""
    t = t.detach().to("cpu", dtype or t.dtype)
    return t.clone() if t.untyped_storage().nbytes() != t.nbytes else t


def _out_dtype(model: Gemma, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None and dtype not in _USABLE:
        raise CheckpointError(f"dtype: expected one of {[str(d) for d in _USABLE]}, got {dtype}")
    return dtype or model.embed.weight.dtype


def save_hf(model: Gemma, out_dir: str | Path, dtype: torch.dtype | None = None,
            max_shard_bytes: int | None = None, *, overwrite: bool = False,
            copy_files: Sequence[Path] = (), heads: Mapping[str, torch.Tensor] | None = None,
            hf_config: Mapping[str, Any] | None = None) -> Path:  # fmt: skip
    """Write config.json + model.safetensors (or HF-named shards + index) + manifest.json, atomically.

    Sharding follows transformers: with one shard there is no index file. Tensors go to disk one
    at a time, so writing costs one tensor of extra memory, not a copy of the model. `copy_files`
    (say the source's tokenizer.model) are copied in under their own names, inside the same commit.
    `heads` are extra tensors under their HF names (a reward model's "score.weight") and `hf_config`
    keys replace config.json's (its "architectures"), for HF classes built on the same decoder.
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
    for name, t in (heads or {}).items():
        shards[-1][name] = t.detach().to("cpu", dtype).contiguous()
    n = len(shards)
    names = (
        ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    hf = {**to_hf_dict(cfg), "torch_dtype": str(dtype).removeprefix("torch."), **(hf_config or {})}
    with checkpoint_dir(out_dir, overwrite=overwrite, producer="gemmakit.checkpoint.save_hf", fmt="hf",
                        config=cfg, dtype=dtype) as tmp:  # fmt: skip
        for fname, shard in zip(names, shards, strict=True):
            write_safetensors(tmp / fname, shard)
        if n > 1:
            index = {
                "metadata": {"total_size": sum(t.nbytes for s in shards for t in s.values())},
                "weight_map": {k: fname for fname, s in zip(names, shards, strict=True) for k in s},
            }
            write_json(tmp / "model.safetensors.index.json", index)
        write_json(tmp / "config.json", hf)
        _copy_into(tmp, copy_files)
    return Path(out_dir)


def _copy_into(tmp: Path, files: Sequence[Path]) -> None:
    """Copy `files` into staged directory `tmp`; a name the writer already wrote keeps its new content."""
    for f in files:
        if not (tmp / f.name).exists():
            shutil.copyfile(f, tmp / f.name)


def save_gemma_pytorch(model: Gemma, path: str | Path, dtype: torch.dtype | None = None,
                       *, overwrite: bool = False, copy_files: Sequence[Path] = ()) -> Path:  # fmt: skip
    """Write directory `path` holding model.ckpt ({"model_state_dict": ...}, qkv fused) + manifest.json
    (+ `copy_files`, as `save_hf`).

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
    with checkpoint_dir(path, overwrite=overwrite, producer="gemmakit.checkpoint.save_gemma_pytorch",
                        fmt="gemma_pytorch", config=cfg, dtype=dtype) as tmp:  # fmt: skip
        _write_file(tmp / "model.ckpt", pickle_obj={"model_state_dict": out})
        _copy_into(tmp, copy_files)
    return Path(path)


# What convert rewrites or replaces, so never copies from the source: weights, their indexes, the
# config (hf writes its own; gemma_pytorch keeps it in the manifest) and the manifest itself.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".index.json")
_REWRITTEN = {"config.json", MANIFEST}


def source_extras(src: str | Path) -> list[Path]:
    """The files a converted checkpoint carries over from source `src`: every regular top-level file of a
    source directory that is not a weight file, an index, config.json, manifest.json or hidden (a
    writer's temp file); for a single weights file only the tokenizer.model beside it (its directory
    may hold anything)."""
    src = Path(src)
    if not src.is_dir():
        tok = src.parent / "tokenizer.model"
        return [tok] if tok.is_file() else []
    return [
        f
        for f in sorted(src.iterdir())
        if f.is_file()
        and not f.name.startswith(".")
        and f.name not in _REWRITTEN
        and not f.name.endswith(_WEIGHT_SUFFIXES)
    ]


def convert_checkpoint(src: str | Path, out: str | Path, to: str, *, dtype: torch.dtype | None = None,
                       config: ModelConfig | None = None, max_shard_bytes: int | None = None,
                       overwrite: bool = False) -> Path:  # fmt: skip
    """Load any supported checkpoint and write it as `to` ("hf" or "gemma_pytorch") into directory `out`.

    The tokenizer and the source's other non-weight files (`source_extras`) are copied along, so
    converting in place (`out` = `src`, overwrite) keeps them; the replaced weights are not copied.
    """
    if to not in FORMATS:
        raise CheckpointError(f"to: expected one of {FORMATS}, got {to!r}")
    model = load_model(src, config=config)
    extras = source_extras(src)  # listed now: the commit of an in-place convert swaps src away
    if to == "hf":
        return save_hf(model, out, dtype=dtype, max_shard_bytes=max_shard_bytes, overwrite=overwrite,
                       copy_files=extras)  # fmt: skip
    return save_gemma_pytorch(model, out, dtype=dtype, overwrite=overwrite, copy_files=extras)
