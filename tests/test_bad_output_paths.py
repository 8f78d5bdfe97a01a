"""Output paths the user got wrong: read-only, full, already taken or the source itself (issue 17).

Every writer (convert, quantize, export-gguf, anything on `gemmakit.artifact`) must turn a fixable OS
error into one `gemmakit: error:` line naming the output and the reason, exit 2, and leave nothing
behind. Read-only and tiny filesystems come from a private tmpfs in a user + mount namespace
(`unshare -rm`), since root ignores chmod; the listing of what is left is taken inside that
namespace, before the tmpfs vanishes with it. The source is the bundled nano model.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from test_cli import assert_user_error

from gemmakit import artifact
from gemmakit.artifact import ArtifactError, atomic_open, verify
from gemmakit.cli import NANO_DIR

NANO = str(NANO_DIR)
WRITERS = {  # command line without --out, for each writer the CLI has
    "convert-hf": ["convert", "--model", NANO, "--to", "hf"],
    "convert-gemma_pytorch": ["convert", "--model", NANO, "--to", "gemma_pytorch"],
    "quantize": ["quantize", "--model", NANO, "--scheme", "int8"],
    "export-gguf": ["export-gguf", "--model", NANO, "--type", "q8_0"],
}
# Mount a fresh tmpfs on $MNT (read-only if $RO), run the command, then list what it left there.
_SCRIPT = (
    'mount -t tmpfs -o "size=$SIZE" tmpfs "$MNT" || exit 99; '
    'if [ -n "$RO" ]; then mount -o remount,ro "$MNT" || exit 99; fi; '
    '"$@"; rc=$?; echo "--- left:"; ls -A "$MNT"; exit $rc'
)


def _can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


needs_unshare = pytest.mark.skipif(not _can_unshare(), reason="needs `unshare -rm` (user + mount namespaces)")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gemmakit.cli", *args], capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def cli_on_tmpfs(mnt: Path, args: list[str], *, read_only: bool,
                 size: str = "64k") -> tuple[subprocess.CompletedProcess, list[str]]:  # fmt: skip
    """Run the CLI with a private tmpfs mounted at `mnt`; returns (process, names left in the tmpfs)."""
    mnt.mkdir(exist_ok=True)
    env = {**os.environ, "MNT": str(mnt), "SIZE": size, "RO": "1" if read_only else ""}
    cmd = ["unshare", "-rm", "sh", "-c", _SCRIPT, "sh", sys.executable, "-m", "gemmakit.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode != 99, f"could not mount the tmpfs: {proc.stderr}"
    stdout, _, left = proc.stdout.partition("--- left:\n")
    proc.stdout = stdout
    return proc, left.split()


@needs_unshare
@pytest.mark.parametrize("writer", list(WRITERS))
@pytest.mark.parametrize(
    "read_only, reason", [(True, "read-only file system"), (False, "no space left on device")]
)
def test_a_read_only_or_full_filesystem_is_one_line_and_leaves_nothing(
    writer, read_only, reason, tmp_path
) -> None:
    """Rows 10-12: a read-only target directory (export-gguf's cleanup used to raise EROFS again), or a
    64 KiB tmpfs that fills while the weights are written; either way the temp output must go."""
    if writer == "export-gguf":
        pytest.importorskip("gguf")
    out = tmp_path / "mnt" / "out"
    proc, left = cli_on_tmpfs(tmp_path / "mnt", [*WRITERS[writer], "--out", str(out)], read_only=read_only)
    assert_user_error(proc, str(out), reason)
    assert proc.stderr.startswith("gemmakit: error:")
    assert left == []


def test_a_second_writer_to_the_same_new_target_is_refused_at_commit(tmp_path) -> None:
    """Row 23: both writers stage while the target does not exist yet; the first commits while the second
    is between its target check and its rename. The second must not replace the first."""
    target = tmp_path / "art"
    first, second = artifact.stage(target, overwrite=False), artifact.stage(target, overwrite=False)
    (first / "who.txt").write_text("first")
    (second / "who.txt").write_text("second")

    def first_commits_meanwhile(step: str) -> None:
        if step == "synced":  # the second is past its own _check_target
            artifact.on_step = None
            artifact.commit(first, target, producer="test", overwrite=False)

    artifact.on_step = first_commits_meanwhile
    try:
        with pytest.raises(ArtifactError, match=f"^{target}: exists and is not empty"):
            artifact.commit(second, target, producer="test", overwrite=False)
    finally:
        artifact.on_step = None
    artifact.abort(second)
    assert (target / "who.txt").read_text() == "first" and verify(target)["producer"] == "test"
    assert sorted(os.listdir(tmp_path)) == ["art"]


def test_an_empty_target_directory_is_still_allowed_without_overwrite(tmp_path) -> None:
    target = tmp_path / "empty"
    target.mkdir()
    with artifact.atomic_dir(target, overwrite=False, producer="test") as tmp:
        (tmp / "a.txt").write_text("a")
    assert (target / "a.txt").read_text() == "a"


def test_a_single_file_without_overwrite_is_placed_exclusively(tmp_path) -> None:
    path = tmp_path / "f.json"
    with atomic_open(path, overwrite=False) as f:
        f.write("first")
    with pytest.raises(ArtifactError, match=f"^{path}: exists"), atomic_open(path, overwrite=False) as f:
        f.write("second")
    assert path.read_text() == "first" and os.listdir(tmp_path) == ["f.json"]


@pytest.mark.parametrize("writer", ["convert-hf", "quantize"])
def test_an_existing_output_without_overwrite_is_refused_and_kept(writer, tmp_path) -> None:
    out = tmp_path / "out"
    assert cli(*WRITERS[writer], "--out", str(out)).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert_user_error(cli(*WRITERS[writer], "--out", str(out)), str(out), "not empty")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.parametrize("to", ["hf", "gemma_pytorch"])
def test_converting_in_place_keeps_the_tokenizer_and_other_files(to, tmp_path) -> None:
    """Row 24: --out = --model with --overwrite used to drop tokenizer.model and every other extra."""
    model = tmp_path / "nano"
    shutil.copytree(NANO_DIR, model)
    (model / "README.md").write_text("notes\n")
    extras = {p.name: p.read_bytes() for p in model.iterdir() if p.name in ("tokenizer.model", "nano.json")}
    extras["README.md"] = b"notes\n"
    proc = cli("convert", "--model", str(model), "--to", to, "--out", str(model), "--overwrite")
    assert proc.returncode == 0, proc.stderr
    weights = {"hf": ["config.json", "model.safetensors"], "gemma_pytorch": ["model.ckpt"]}[to]
    assert sorted(os.listdir(model)) == sorted([*extras, *weights, "manifest.json"])  # old shards gone
    assert {name: (model / name).read_bytes() for name in extras} == extras
    assert set(extras) <= set(verify(model)["files"])
    gen = cli("generate", "--model", str(model), "--prompt", "Hello", "--max-new-tokens", "3")
    assert gen.returncode == 0, gen.stderr


def _enospc(*_args: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_file_inside_a_staged_dir_names_the_output_and_stays_an_oserror(tmp_path) -> None:
    """A write_json into the temp copy names the artifact, not the temp path; `except OSError` callers
    (the training loop's cleanup) still catch it."""
    out = tmp_path / "out"
    with (
        pytest.raises(OSError) as info,
        artifact.atomic_dir(out, overwrite=False, producer="test") as tmp,
        mock.patch("os.fsync", _enospc),
    ):
        artifact.write_json(tmp / "config.json", {})
    assert isinstance(info.value, ArtifactError) and info.value.errno == errno.ENOSPC
    assert str(info.value) == f"{out}: cannot write (no space left on device)"
    assert os.listdir(tmp_path) == []


def test_cleanup_never_masks_the_first_error(tmp_path) -> None:
    """On a read-only filesystem even unlinking a missing temp file fails (EROFS, not ENOENT)."""
    path = tmp_path / "f.json"

    def erofs(*_args: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    with (
        mock.patch("os.fsync", _enospc),
        mock.patch("os.unlink", erofs),
        pytest.raises(ArtifactError, match=f"^{path}: cannot write \\(no space left on device\\)$"),
    ):
        artifact.write_json(path, {})
