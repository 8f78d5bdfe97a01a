"""Artifacts: the one way gemmakit writes, replaces, recovers and verifies an output file or directory.

An artifact directory is one output of a stage: a checkpoint, a quantized checkpoint, a LoRA adapter,
a training checkpoint, a run's `final/`, the nano package, a token shard set, eval results. Every
writer stages it in a temp directory `.NAME.tmp-PID-*` next to the target and calls `commit`, which
fsyncs every file, writes `manifest.json` LAST (sha256 and size of every file, the producer, the
gemmakit version and the caller's fields), swaps the directory into place and fsyncs the parent.
Single files (`atomic_open`, `write_json`) follow the same rule: temp file, fsync, rename, fsync dir.

Where it sits: at the very bottom (rank 0; stdlib and `errors` only, never torch, since data-pipeline
workers import it), under every stage that writes. Readers call `verify` (or share `sha256_file`).

A replaced target is never missing: on Linux an existing target is swapped with the new directory
by one `renameat2(RENAME_EXCHANGE)`; elsewhere it is renamed aside to `.NAME.old-PID-*` first, and
`recover` (run by `verify` and by the next write) puts an aside copy back if a kill left no target.
So after a kill at any point a reader finds the whole old artifact or the whole new one. Without
`overwrite` the new directory is placed by an exclusive rename (`RENAME_NOREPLACE`), so of two
writers racing to the same new target the later one is refused instead of replacing the first.

A write that fails for a reason the user can fix (read-only filesystem, permission denied, no space
left, a file where a directory should be) is an `ArtifactError` naming the target and the reason, the
temp files are removed, and cleanup never raises a second error that would hide the first.

Key trade-off: the old copy stays on disk until the new one is in place (twice the space while
writing), and every file is fsynced and hashed (about 1 s per GB), which is small next to writing it
and is what makes "killed at any point" recoverable and a flipped byte detectable.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import IO, Any

from gemmakit.errors import UserError

MANIFEST = "manifest.json"
STEPS = ("synced", "manifest", "swapped", "aside", "placed", "parent_synced", "cleaned")
"""The steps of `commit`, in order; an existing target takes "swapped" (Linux) or "aside" + "placed"."""

on_step: Callable[[str], None] | None = None
"""Called with each step's name (STEPS) right after it is done; None in production. The kill tests
set it to SIGKILL the writer at a chosen step."""

_use_exchange = True  # the kill tests turn it off to exercise the rename-aside path
_CHUNK = 1 << 20


class ArtifactError(UserError):
    """An artifact is missing, incomplete, corrupt or in the way; the message is one line naming the
    file and what was expected."""


class ArtifactWriteError(ArtifactError, OSError):
    """Writing an output failed for a reason the user can fix (read-only, full, permissions, not a
    directory). Also an OSError, with the original `errno`, so code that catches OSError around a
    write (to clean up, or to retry) still does."""

    path: str  # the output named in the message
    reason: str  # what went wrong, e.g. "no space left on device"


# OS errors writing an output that the user fixes (another path, free space, a mount, permissions),
# reported as one line instead of a traceback. EIO and the like stay OSErrors: those are not input.
_USER_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EROFS",
        "EACCES",
        "EPERM",
        "ENOSPC",
        "EDQUOT",
        "EFBIG",
        "ENOTDIR",
        "EISDIR",
        "EEXIST",
        "ENOTEMPTY",
        "ENAMETOOLONG",
        "EXDEV",
        "ELOOP",
        "EMLINK",
    )  # fmt: skip
    if hasattr(errno, name)
)


def write_error(path: str | Path, e: OSError) -> ArtifactWriteError | None:
    """The one-line ArtifactError for an OSError writing output `path`, or None if it is not one the
    user can fix (the caller then re-raises the OSError)."""
    if e.errno not in _USER_ERRNOS:
        return None
    reason = (e.strerror or str(e)).lower()
    where = os.path.abspath(os.fsdecode(e.filename)) if isinstance(e.filename, (str, bytes)) else ""
    if e.errno == errno.EEXIST and where and os.path.exists(where) and not os.path.isdir(where):
        reason = "not a directory"  # mkdir(parents=True) met a file where a directory must go
    parent = os.path.dirname(os.path.abspath(path))
    if where and os.path.dirname(where) != parent and not where.startswith(os.path.join(parent, ".")):
        # a path other than the output, its siblings or its temp copies (say a source file): name it too
        reason += f": {where}"
    return _write_error(path, reason, e.errno)


def _write_error(path: str | Path, reason: str, code: int | None) -> ArtifactWriteError:
    err = ArtifactWriteError(f"{path}: cannot write ({reason})")
    err.errno = code  # strerror and filename stay unset: they would replace the one-line message
    err.path, err.reason = str(path), reason
    return err


@contextmanager
def write_errors(path: str | Path) -> Iterator[None]:
    """Turn a user-fixable OSError inside the block into `write_error(path, e)`."""
    try:
        yield
    except ArtifactWriteError as e:
        # a file inside `path`'s temp copy (say its config.json) failed: name the output, not the temp
        staged = os.path.join(os.path.dirname(os.path.abspath(path)), f".{Path(path).name}.")
        if e.path.startswith(staged):
            raise _write_error(path, e.reason, e.errno) from None
        raise
    except OSError as e:
        err = write_error(path, e)
        if err is None:
            raise
        raise err from None


def discard(path: Path) -> None:
    """Remove a temp file if there is one; never raises (it runs while another error propagates, and on a
    read-only filesystem even unlinking a missing file fails with EROFS rather than ENOENT)."""
    with contextlib.suppress(OSError):
        if os.path.lexists(path):
            os.unlink(path)


# ---- single files ---------------------------------------------------------------------------------


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (for a directory: its entries, so a rename survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_open(path: Path, mode: str = "w", *, overwrite: bool = True) -> Iterator[IO[Any]]:
    """A temp file `.name.tmp-PID` next to `path`, fsynced and renamed onto it on success, removed on failure.

    Without `overwrite` an existing `path` is refused at the rename (`place_file`). A user-fixable
    OSError (read-only, full, not a directory...) becomes an ArtifactError naming `path`.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with write_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            place_file(tmp, path, overwrite=overwrite)
    finally:
        discard(tmp)


def place_file(tmp: Path, path: Path, *, overwrite: bool) -> None:
    """Rename finished temp file `tmp` onto `path` and fsync the directory. Without `overwrite` the rename
    is exclusive: an existing `path`, even one that appeared a moment ago, is an ArtifactError."""
    with write_errors(path):
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                if not _rename_noreplace(tmp, path):
                    os.link(tmp, path)  # EEXIST if `path` exists: no window for a second writer
                    os.unlink(tmp)
            except FileExistsError:
                raise ArtifactError(f"{path}: exists; pass overwrite=True to replace it") from None
        fsync_path(path.parent)


def write_json(path: Path, obj: Any) -> None:
    """`obj` as indented, key-sorted JSON, atomically (the same object gives the same bytes)."""
    with atomic_open(path) as f:
        f.write(_json_text(obj))


def _json_text(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks (constant memory for any size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


@functools.cache
def version() -> str:
    """The installed gemmakit version, as every manifest and results file records it ("unknown" if none)."""
    try:
        return metadata.version("gemmakit")
    except metadata.PackageNotFoundError:
        return "unknown"


# ---- directories: stage, commit, abort ------------------------------------------------------------


def _step(name: str) -> None:
    if on_step is not None:
        on_step(name)


def _check_target(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ArtifactError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ArtifactError(f"{out_dir}: exists and is not empty; pass overwrite=True to replace it")


def stage(out_dir: str | Path, *, overwrite: bool) -> Path:
    """A fresh temp directory next to `out_dir` to write the artifact into; `commit` moves it into place.

    First `recover`s `out_dir` (so a kill of an earlier writer is repaired and its temp directories
    removed), then refuses a target that is not a directory, or is not empty without `overwrite`.
    """
    out_dir = Path(os.path.abspath(out_dir))
    with write_errors(out_dir):
        recover(out_dir)
        _check_target(out_dir, overwrite)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
    except BaseException:
        abort(tmp)
        raise
    return tmp


def _walk(root: Path) -> tuple[list[Path], list[Path]]:
    """(every regular file, every directory) under root, sorted; links are not followed."""
    files, dirs = [], []
    for d, subdirs, names in os.walk(root):
        dirs.append(Path(d))
        subdirs.sort()
        files += [Path(d, n) for n in sorted(names) if os.path.isfile(os.path.join(d, n))]
    return files, dirs


def commit(tmp: str | Path, out_dir: str | Path, *, producer: str, overwrite: bool, manifest: bool = True,
           extra: Mapping[str, Any] | None = None) -> Path:  # fmt: skip
    """Move staged directory `tmp` into place as `out_dir`, replacing it whole; returns `out_dir`.

    fsyncs every file and directory in `tmp`, then (unless `manifest=False`: a directory with a
    manifest of its own format, or one inside a larger artifact) writes manifest.json LAST:
    `extra`'s fields plus "producer", "gemmakit_version" and "files" {relative path: {"sha256",
    "size"}} of every other file. An existing `out_dir` is swapped out atomically (or renamed aside
    and restored if placing the new one fails), the parent is fsynced, the old copy removed. On an
    exception `tmp` is left for the caller to `abort`.

    Without `overwrite` the placing rename is exclusive (`RENAME_NOREPLACE`; an empty `out_dir` is
    removed first), so a target another writer committed meanwhile is refused, never replaced. A
    user-fixable OSError is an ArtifactError naming `out_dir`.
    """
    tmp, out_dir = Path(tmp), Path(os.path.abspath(out_dir))
    with write_errors(out_dir):
        return _commit(tmp, out_dir, producer=producer, overwrite=overwrite, manifest=manifest, extra=extra)


def _commit(tmp: Path, out_dir: Path, *, producer: str, overwrite: bool, manifest: bool,
            extra: Mapping[str, Any] | None) -> Path:  # fmt: skip
    _check_target(out_dir, overwrite)  # it may have appeared while we were writing
    files, dirs = _walk(tmp)
    for path in files + dirs[::-1]:  # files, then directories deepest first, tmp itself last
        fsync_path(path)
    _step("synced")
    if manifest:
        listed = [f for f in files if f != tmp / MANIFEST]
        write_json(tmp / MANIFEST, {
            **(extra or {}), "producer": producer, "gemmakit_version": version(),
            "files": {f.relative_to(tmp).as_posix(): {"sha256": sha256_file(f), "size": f.stat().st_size}
                      for f in listed},
        })  # fmt: skip
        _step("manifest")
    parent = out_dir.parent
    if not overwrite:
        _place_exclusive(tmp, out_dir)
        _step("placed")
        old = None
    elif out_dir.is_dir() and _exchange(tmp, out_dir):  # out_dir is the new one, tmp holds the old
        _step("swapped")
        old = tmp
    else:
        old = None
        if out_dir.is_dir():
            old = tmp.with_name(f".{out_dir.name}.old-{tmp.name.rsplit('.tmp-', 1)[1]}")
            os.rename(out_dir, old)
            _step("aside")
        try:
            os.rename(tmp, out_dir)
        except BaseException:
            if old is not None and not os.path.lexists(out_dir):
                os.rename(old, out_dir)
            raise
        _step("placed")
    fsync_path(parent)
    _step("parent_synced")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _step("cleaned")
    return out_dir


def _place_exclusive(tmp: Path, out_dir: Path) -> None:
    """Rename `tmp` to `out_dir` only if nothing is there; an empty `out_dir` (which `_check_target`
    allows without overwrite) is removed first. rmdir refuses a non-empty directory and the rename is
    exclusive, so a directory another writer placed at any moment is refused, never replaced."""
    refused = ArtifactError(f"{out_dir}: exists and is not empty (written meanwhile by another process?); "
                            "pass overwrite=True to replace it")  # fmt: skip
    if out_dir.is_dir() and not out_dir.is_symlink():
        try:
            os.rmdir(out_dir)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise refused from None
            raise
    try:
        if not _rename_noreplace(tmp, out_dir):
            # no renameat2: rename replaces only an empty directory, so a filled one still fails
            os.rename(tmp, out_dir)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise refused from None
        raise


def abort(tmp: str | Path) -> None:
    """Remove a staged directory that will not be committed (idempotent)."""
    shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_dir(out_dir: str | Path, *, overwrite: bool, producer: str, manifest: bool = True,
               extra: Mapping[str, Any] | None = None) -> Iterator[Path]:  # fmt: skip
    """`stage`, yield the temp directory to write into, then `commit` it (same arguments); on an
    exception inside the block, or in the commit, the temp directory is removed and the old
    `out_dir`, if any, stays in place. `extra` is read at the commit, so the block may still fill it
    (e.g. with the fields of an inner artifact it wrote)."""
    tmp = stage(out_dir, overwrite=overwrite)
    try:
        with write_errors(out_dir):  # e.g. the disk filling up while the block writes into tmp
            yield tmp
        commit(tmp, out_dir, producer=producer, overwrite=overwrite, manifest=manifest, extra=extra)
    except BaseException:
        abort(tmp)
        raise


# ---- the atomic swap ------------------------------------------------------------------------------

_AT_FDCWD, _RENAME_NOREPLACE, _RENAME_EXCHANGE = -100, 1, 2
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


@functools.cache
def _renameat2() -> Any:
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc >= 2.28, musl
    except OSError:
        return None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    fn = _renameat2() if _use_exchange else None
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:  # a filesystem or kernel without it: rename aside instead
        return False
    raise OSError(err, os.strerror(err), str(b))


def _rename_noreplace(src: Path, dst: Path) -> bool:
    """Rename `src` to `dst` only if `dst` does not exist (renameat2 RENAME_NOREPLACE; EEXIST if it
    does); False where unsupported, for the caller to fall back."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(dst))


# ---- reading: recover, verify ---------------------------------------------------------------------


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _leftovers(path: Path) -> tuple[list[Path], list[Path]]:
    """(stale temp dirs, stale aside copies) that killed writers of `path` left; live writers' are skipped."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(tmp|old)-(?:(\d+)-)?[^/]*$")
    temps, asides = [], []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:  # no parent directory (yet), or not readable: nothing to repair
        return [], []
    for entry in entries:
        m = pattern.match(entry.name)
        if m and entry.is_dir(follow_symlinks=False) and not (m.group(2) and _alive(int(m.group(2)))):
            (temps if m.group(1) == "tmp" else asides).append(Path(entry.path))
    return temps, asides


def recover(path: str | Path) -> bool:
    """Repair what killed writers of artifact `path` left; returns True if it put an old copy back.

    If `path` is missing and an aside copy `.NAME.old-*` exists (a kill between renaming the old
    directory aside and renaming the new one in), the newest is renamed back. Then every temp
    directory and aside copy of `path` whose writer process is no longer running is removed.
    """
    path = Path(os.path.abspath(path))
    temps, asides = _leftovers(path)
    restored = False
    if asides and not os.path.lexists(path):
        newest = max(asides, key=lambda p: p.stat().st_mtime_ns)
        os.rename(newest, path)
        fsync_path(path.parent)
        asides.remove(newest)
        restored = True
    for p in temps + asides:
        shutil.rmtree(p, ignore_errors=True)
    return restored


def verify(path: str | Path) -> dict[str, Any]:
    """The manifest of artifact directory `path` after checking every listed file's size and sha256.

    `recover`s `path` first. Raises ArtifactError, one line naming the file and what was expected,
    if the directory or its manifest is missing or unreadable, or a listed file is missing or differs.
    """
    path = Path(path)
    recover(path)
    man = path / MANIFEST
    if not path.is_dir():
        raise ArtifactError(f"{path}: no such directory (expected an artifact directory with {MANIFEST})")
    if not man.is_file():
        raise ArtifactError(f"{path}: no {MANIFEST}; not a complete artifact")
    try:
        data = json.loads(man.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ArtifactError(f"{man}: unreadable ({' '.join(str(e).split())})") from None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict):
        raise ArtifactError(f"{man}: expected a JSON object with a 'files' object")
    for name, rec in files.items():
        parts = Path(name).parts
        if Path(name).is_absolute() or ".." in parts or not isinstance(rec, dict):
            raise ArtifactError(f"{man}: files.{name}: expected a relative path -> {{'sha256', 'size'}}")
        file = path / name
        if not file.is_file():
            raise ArtifactError(f"{file}: missing (listed in {MANIFEST})")
        if (size := file.stat().st_size) != rec.get("size"):
            raise ArtifactError(f"{file}: size {size} bytes, {MANIFEST} expects {rec.get('size')}")
        if (digest := sha256_file(file)) != rec.get("sha256"):
            raise ArtifactError(
                f"{file}: checksum mismatch: sha256 {digest}, {MANIFEST} expects {rec.get('sha256')}"
            )
    return data
