"""Training checkpoints: atomic step directories with a checksummed manifest, discovery and retention.

Where it sits: `train.loop` calls `save` every `save_every` steps and `latest` on `--resume`. A
checkpoint is `<run>/checkpoints/step-000120/` holding

  trainable.safetensors   every trainable parameter, internal names, float32 (LoRA: adapters only)
  optimizer.pt            the optimizer state dict (torch.save; read back with weights_only=True)
  rank-<r>.json / .pt     per-rank loop state: loader position, step, Python/NumPy/torch RNG states
  hf/                     full-training runs: the model as HF safetensors (gemmakit.load, transformers)
  adapter/                LoRA runs: the adapters in PEFT's format
  manifest.json           written LAST: step, sha256 of every other file, the fingerprint of the run

Commit protocol (reliability-tests.md T2): everything goes into `step-N.tmp-*/`; each file is fsynced;
the manifest is written and fsynced; the directory is renamed to `step-N/` and its parent fsynced.
A directory without a manifest is never a checkpoint, so a kill at any point leaves at worst a
stale temp directory, which the next save removes. With several ranks, every rank writes its own
`rank-<r>` files into the shared temp directory, then rank 0 commits after a barrier.

Key trade-off: resume verifies the sha256 of every file before trusting it (a flipped byte makes
that checkpoint rejected and the previous one used, T3). Hashing costs ~1 s per GB, paid once per
resume, never per save beyond the hashing of what was just written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from gemmakit.checkpoint import fsync_path

log = logging.getLogger(__name__)

FORMAT = "gemmakit-train-checkpoint"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


class CheckpointError(RuntimeError):
    """A training checkpoint cannot be written or used; the message names the directory and why."""


@dataclass(frozen=True)
class Found:
    """A complete, verified checkpoint."""

    path: Path  # the step directory
    step: int  # optimizer steps completed when it was written
    manifest: dict  # its manifest.json


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    fsync_path(path)


def write_torch(path: Path, obj: Any) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def read_torch(path: Path) -> Any:
    """A torch.save payload read with weights_only=True: tensors and plain containers, never code."""
    return torch.load(path, map_location="cpu", weights_only=True)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def begin(run_dir: str | Path, step: int) -> Path:
    """A fresh temp directory for the checkpoint of `step` (rank 0 creates it; see `shared_tmp`)."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"step-{step:06d}.tmp-", dir=root))


def commit(tmp: Path, step: int, fingerprint: dict, keep_last: int) -> Path:
    """Write the manifest into `tmp`, rename it to `step-N`, fsync, then apply retention."""
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {
        "format": FORMAT,
        "version": 1,
        "step": step,
        "fingerprint": fingerprint,
        "files": {str(p.relative_to(tmp)): sha256_file(p) for p in files},
    }
    for d in sorted({p.parent for p in files} | {tmp}, key=lambda p: -len(p.parts)):
        fsync_path(d)
    write_json(tmp / MANIFEST, manifest)
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
    fsync_path(tmp)
    final = tmp.parent / f"step-{step:06d}"
    if final.exists():  # a re-run of the same step (resumed without progress): replace it whole
        old = tmp.parent / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_path(tmp.parent)
    _retain(tmp.parent, keep_last, keep=final)
    return final


def abort(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


def _complete(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of directories that have a manifest, newest first (not yet verified)."""
    out = []
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir() and (p / MANIFEST).is_file():
                out.append((int(m.group(1)), p))
    return sorted(out, reverse=True)


def _retain(root: Path, keep_last: int, keep: Path) -> None:
    """Delete complete checkpoints beyond the newest `keep_last`, and stale temp directories."""
    for _, path in _complete(root)[keep_last:]:
        if path != keep:
            shutil.rmtree(path, ignore_errors=True)
    for p in root.iterdir():
        if ".tmp-" in p.name or p.name.endswith(".old"):
            shutil.rmtree(p, ignore_errors=True)


def verify(path: Path) -> dict:
    """The manifest of checkpoint `path` after checking every listed file's sha256; CheckpointError if not."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / MANIFEST}: unreadable ({e})") from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or not isinstance(manifest.get("files"), dict)
    ):
        raise CheckpointError(f"{path / MANIFEST}: not a {FORMAT} manifest")
    for name, digest in manifest["files"].items():
        file = path / name
        if ".." in Path(name).parts or not file.is_file():
            raise CheckpointError(f"{path}: file {name} listed in the manifest is missing")
        if sha256_file(file) != digest:
            raise CheckpointError(f"{file}: checksum mismatch (sha256 differs from the manifest)")
    return manifest


def latest(run_dir: str | Path) -> Found | None:
    """The newest checkpoint whose files all verify; corrupt newer ones are skipped with a warning."""
    for step, path in _complete(checkpoints_dir(run_dir)):
        try:
            manifest = verify(path)
        except CheckpointError as e:
            log.warning("skipping checkpoint: %s", e)
            continue
        return Found(path, step, manifest)
    return None


def fingerprint_diff(saved: dict, current: dict) -> list[str]:
    """Fields that differ between a checkpoint's fingerprint and the current run's, as 'key: a -> b'."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]
