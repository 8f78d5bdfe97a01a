"""Crash-safe file writes: fsync of files and directories, and atomic replace-on-success files.

Where it sits: at the bottom with `config` (no torch, no gemmakit imports), shared by checkpoints and the
data pipeline so that every writer follows the same rule: write a temp file next to the target, fsync it,
rename it onto the target, fsync the directory. A reader then sees the old file or the whole new one.

Key trade-off: fsyncing every file and directory costs a few milliseconds per file on SSDs, which is
nothing next to the size of what we write, and it is what makes "killed at any point" recoverable.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (for a directory: its entries, so a rename survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_open(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """A temp file `.name.tmp-PID` next to `path`, fsynced and renamed onto it on success, removed on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: Path, obj: Any) -> None:
    """`obj` as indented, key-sorted JSON, atomically (the same object gives the same bytes)."""
    with atomic_open(path) as f:
        f.write(json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
