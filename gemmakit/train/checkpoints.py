"""Training checkpoints: atomic step directories with a checksummed manifest, discovery and retention.

Where it sits: `train.loop` calls `save` every `save_every` steps and `latest` on `--resume`. A
checkpoint is `<run>/checkpoints/step-000120/` holding

  trainable.safetensors   every trainable parameter, internal names, float32 (LoRA: adapters only)
  optimizer.pt            the optimizer state dict (torch.save; read back with weights_only=True)
  rank-<r>.json / .pt     per-rank loop state: loader position, step, Python/NumPy/torch RNG states
  hf/                     full-training runs: the model as HF safetensors (gemmakit.load, transformers)
  adapter/                LoRA runs: the adapters in PEFT's format
  manifest.json           written LAST: step, sha256 and size of every other file, the run's fingerprint

Commit protocol (reliability-tests.md T2), that of every `gemmakit.artifact`: everything goes into
`.step-N.tmp-*/`; each file is fsynced; the manifest is written and fsynced; the directory is renamed
to `step-N/` (swapped with an existing one) and its parent fsynced. A directory without a manifest is
never a checkpoint, so a kill at any point leaves at worst a stale temp directory, which the next
save removes. With several ranks, every rank writes its own `rank-<r>` files into the shared temp
directory, then rank 0 commits after a barrier.

Key trade-off: resume verifies the sha256 of every file before trusting it (a flipped byte makes
that checkpoint rejected and the previous one used, T3). Hashing costs ~1 s per GB, paid once per
resume, never per save beyond the hashing of what was just written.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from gemmakit import artifact
from gemmakit.artifact import MANIFEST
from gemmakit.checkpoint import write_safetensors
from gemmakit.checkpoint import write_torch as write_torch  # the writer of rank-*.pt and optimizer.pt
from gemmakit.errors import UserError

log = logging.getLogger(__name__)

FORMAT = "gemmakit-train-checkpoint"
VERSION = 2  # 2: manifest "files" entries are {"sha256", "size"} (artifact manifests); 1 had digests only
_STEP_DIR = re.compile(r"^step-(\d{6,})$")
_ASIDE = re.compile(r"^\.(step-\d{6,})\.old-")  # a step renamed aside while being replaced


class CheckpointError(UserError, RuntimeError):
    """A training checkpoint cannot be written or used; the message names the directory and why."""


@dataclass(frozen=True)
class Found:
    """A complete, verified checkpoint."""

    path: Path  # the step directory
    step: int  # optimizer steps completed when it was written
    manifest: dict  # its manifest.json


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file through the checkpoint writer, whose failed writes stay OSErrors (the
    safetensors library reports a full disk as an opaque SafetensorError)."""
    write_safetensors(path, {k: v.detach().cpu() for k, v in tensors.items()})


def read_torch(path: Path) -> Any:
    """A torch.save payload read with weights_only=True: tensors and plain containers, never code.

    A file the restricted unpickler refuses (a pickle that would run code, or one that is not a torch
    file at all) is a CheckpointError naming the file: its manifest hash may match (it was rehashed,
    or written by a hostile party), so the hash check alone cannot catch it, and torch's own
    UnpicklingError is a multi-line traceback."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (not a zip), EOFError, ...: all mean unusable
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path}: refused by torch.load(weights_only=True) "
                              f"({type(e).__name__}: {reason})") from None  # fmt: skip


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a file safetensors cannot parse is a CheckpointError naming it."""
    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorsError, OSError: the file is unusable either way
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _step_dir(run_dir: str | Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step-{step:06d}"


def begin(run_dir: str | Path, step: int) -> Path:
    """A fresh temp directory for the checkpoint of `step` (rank 0 creates it and broadcasts it)."""
    return artifact.stage(_step_dir(run_dir, step), overwrite=True)


def commit(tmp: Path, step: int, fingerprint: dict, keep_last: int) -> Path:
    """Write the manifest into `tmp`, move it into place as `step-N` (a re-run of the same step, resumed
    without progress, replaces it whole), then apply retention."""
    final = tmp.parent / f"step-{step:06d}"
    artifact.commit(tmp, final, producer="gemmakit.train.checkpoints", overwrite=True,
                    extra={"format": FORMAT, "version": VERSION, "step": step, "fingerprint": fingerprint})  # fmt: skip
    _retain(tmp.parent, keep_last, keep=final)
    return final


def abort(tmp: Path) -> None:
    """Discard a temp directory from `begin` that will not be committed."""
    artifact.abort(tmp)


def _complete(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of directories that have a manifest, newest first (not yet verified)."""
    out = []
    if root.is_dir():
        for p in root.iterdir():
            if a := _ASIDE.match(p.name):  # a kill mid-replace (no renameat2) left that step aside
                artifact.recover(root / a.group(1))
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
    """The manifest of checkpoint `path` after checking every listed file's size and sha256
    (`artifact.verify`); CheckpointError if not."""
    try:
        manifest = artifact.verify(path)
    except artifact.ArtifactError as e:
        raise CheckpointError(str(e)) from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(f"{path / MANIFEST}: not a {FORMAT} version {VERSION} manifest")
    return manifest


def candidates(run_dir: str | Path) -> Iterator[Found]:
    """Checkpoints whose files all verify, newest first (lazily: each is hashed only when reached);
    corrupt ones are skipped with a warning. Resume takes the first whose contents also restore."""
    for step, path in _complete(checkpoints_dir(run_dir)):
        try:
            manifest = verify(path)
        except CheckpointError as e:
            log.warning("skipping checkpoint: %s", e)
            continue
        yield Found(path, step, manifest)


def latest(run_dir: str | Path) -> Found | None:
    """The newest checkpoint whose files all verify; corrupt newer ones are skipped with a warning."""
    return next(candidates(run_dir), None)


def any_complete(run_dir: str | Path) -> bool:
    """Whether `run_dir` holds any checkpoint with a manifest, usable or not."""
    return bool(_complete(checkpoints_dir(run_dir)))


def fingerprint_diff(saved: dict, current: dict) -> list[str]:
    """Fields that differ between a checkpoint's fingerprint and the current run's, as 'key: a -> b'."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]
