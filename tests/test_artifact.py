"""`gemmakit.artifact`: a writer SIGKILLed at every step leaves the whole old or the whole new artifact,
`verify` names what is wrong in one line, and leftovers of killed writers are cleaned up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gemmakit import artifact
from gemmakit.artifact import ArtifactError, atomic_dir, recover, verify

# The old and the new artifact differ in every file, in their file sets and in a manifest field, so a
# mix of the two is told apart from either.
OLD = {"a.txt": "old a\n" * 50, "b.txt": "old b\n" * 70, "only-old.txt": "gone in the new one\n"}
NEW = {"a.txt": "new a\n" * 60, "b.txt": "new b\n" * 40, "c.txt": "new c\n", "sub/d.bin": "new d" * 999}

_WRITER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from gemmakit import artifact
    target, mode, kill_at, files = Path(sys.argv[1]), sys.argv[2], sys.argv[3], eval(sys.argv[4])
    artifact._use_exchange = mode != "aside"
    def kill(step):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    artifact.on_step = kill
    with artifact.atomic_dir(target, overwrite=True, producer="test", extra={"generation": "new"}) as tmp:
        for i, (name, text) in enumerate(files.items()):
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)
            kill(f"file{i}")
""")


def _write(target: Path, files: dict[str, str], generation: str) -> None:
    with atomic_dir(target, overwrite=True, producer="test", extra={"generation": generation}) as tmp:
        for name, text in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)


def _content(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text() for p in root.rglob("*") if p.is_file()}


def _steps(mode: str) -> list[str]:
    place = {"exchange": ["swapped"], "aside": ["aside", "placed"], "fresh": ["placed"]}[mode]
    return ["file0", "file2", "synced", "manifest", *place, "parent_synced", "cleaned"]


def _exchange_works(probe: Path) -> bool:
    (probe / "x").mkdir(parents=True)
    (probe / "y").mkdir()
    return artifact._exchange(probe / "x", probe / "y")


CASES = [(mode, step) for mode in ("exchange", "aside", "fresh") for step in [*_steps(mode), None]]


@pytest.mark.parametrize(("mode", "kill_at"), CASES, ids=[f"{m}-{s or 'no-kill'}" for m, s in CASES])
def test_a_writer_killed_at_any_step_leaves_the_old_or_the_new_artifact(tmp_path, mode, kill_at) -> None:
    if mode == "exchange" and not _exchange_works(tmp_path / "probe"):
        pytest.skip("no renameat2(RENAME_EXCHANGE) on this system or filesystem")
    root = tmp_path / "out"
    root.mkdir()
    target = root / "art"
    if mode != "fresh":
        _write(target, OLD, "old")
    proc = subprocess.run([sys.executable, "-c", _WRITER, str(target), mode, str(kill_at), repr(NEW)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == (0 if kill_at is None else -signal.SIGKILL), proc.stderr
    steps = _steps(mode)
    done = steps.index(kill_at) if kill_at else len(steps)
    placed = steps.index({"exchange": "swapped"}.get(mode, "placed"))
    expect = "new" if done >= placed else (None if mode == "fresh" else "old")

    if kill_at == "aside":  # the one moment with no target: the old copy sits aside
        assert not target.exists() and recover(target) and target.is_dir()
    if expect is None:  # nothing was ever committed: still nothing, and no leftovers once recovered
        recover(target)
        assert sorted(os.listdir(root)) == []
        return
    manifest = verify(target)  # runs recover first
    assert manifest["generation"] == expect and manifest["producer"] == "test"
    files = NEW if expect == "new" else OLD
    assert _content(target) == {**files, "manifest.json": (target / "manifest.json").read_text()}
    assert sorted(manifest["files"]) == sorted(files)  # every file listed, the manifest itself not
    assert sorted(os.listdir(root)) == ["art"]  # the killed writer's temp dir or old copy is gone

    _write(target, {"z.txt": "next\n"}, "next")  # and the next write replaces it cleanly
    assert verify(target)["generation"] == "next" and sorted(os.listdir(root)) == ["art"]


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)  # fmt: skip
    return int(proc.stdout)


def test_the_next_write_removes_stale_temp_dirs_but_not_a_live_writers(tmp_path) -> None:
    target = tmp_path / "art"
    _write(target, OLD, "old")
    dead = _dead_pid()
    stale = [
        tmp_path / f".art.tmp-{dead}-abc",
        tmp_path / f".art.old-{dead}-def",
        tmp_path / ".art.tmp-legacy1",
    ]
    live = tmp_path / f".art.tmp-{os.getpid()}-ghi"
    other = tmp_path / f".other.tmp-{dead}-jkl"  # another artifact's: not ours to touch
    for d in [*stale, live, other]:
        d.mkdir()
        (d / "half-written").write_text("x")
    _write(target, NEW, "new")
    assert sorted(os.listdir(tmp_path)) == sorted(["art", live.name, other.name])
    assert verify(target)["generation"] == "new"


def test_recover_puts_the_old_copy_back_only_when_the_target_is_missing(tmp_path) -> None:
    target = tmp_path / "art"
    _write(target, OLD, "old")
    aside = tmp_path / f".art.old-{_dead_pid()}-abc"
    os.rename(target, aside)
    assert recover(target) is True and verify(target)["generation"] == "old" and not aside.exists()
    assert recover(target) is False and recover(tmp_path / "missing" / "art") is False


def _one_line_error(path: Path) -> str:
    with pytest.raises(ArtifactError) as e:
        verify(path)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_verify_names_the_file_and_what_was_expected(tmp_path) -> None:
    target = tmp_path / "art"
    _write(target, NEW, "new")
    manifest = verify(target)
    rec = manifest["files"]["sub/d.bin"]
    assert rec["size"] == len(NEW["sub/d.bin"]) and len(rec["sha256"]) == 64
    assert manifest["gemmakit_version"] == artifact.version()

    d = target / "sub" / "d.bin"
    raw = bytearray(d.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one changed byte, same size
    d.write_bytes(bytes(raw))
    msg = _one_line_error(target)
    assert msg.startswith(str(d)) and "checksum mismatch" in msg and rec["sha256"] in msg

    d.write_bytes(bytes(raw) + b"!")
    msg = _one_line_error(target)
    assert msg.startswith(str(d)) and f"expects {rec['size']}" in msg

    d.unlink()
    assert _one_line_error(target) == f"{d}: missing (listed in manifest.json)"

    (target / "manifest.json").write_text("{not json")
    assert "manifest.json: unreadable" in _one_line_error(target)
    (target / "manifest.json").write_text(json.dumps({"files": {"../escape": {"sha256": "", "size": 0}}}))
    assert "files.../escape: expected a relative path" in _one_line_error(target)

    (target / "manifest.json").unlink()
    assert _one_line_error(target) == f"{target}: no manifest.json; not a complete artifact"
    assert "no such directory" in _one_line_error(tmp_path / "nothing-here")


def test_refusals_failures_and_manifest_false(tmp_path) -> None:
    target = tmp_path / "art"
    _write(target, OLD, "old")
    with pytest.raises(ArtifactError, match="exists and is not empty; pass overwrite=True"):
        artifact.stage(target, overwrite=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match="exists and is not a directory"):
        artifact.stage(tmp_path / "file", overwrite=True)
    with (
        pytest.raises(RuntimeError, match="boom"),
        atomic_dir(target, overwrite=True, producer="test") as tmp,
    ):
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("boom")
    assert verify(target)["generation"] == "old" and sorted(os.listdir(tmp_path)) == ["art", "file"]

    with atomic_dir(tmp_path / "plain", overwrite=False, producer="test", manifest=False) as tmp:
        (tmp / "index.json").write_text("{}")
    assert os.listdir(tmp_path / "plain") == ["index.json"]
    assert (tmp_path / "plain").stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700


def test_sha256_file_and_write_json(tmp_path) -> None:
    import hashlib

    blob = os.urandom(3 * (1 << 20) + 17)  # spans several read chunks
    (tmp_path / "blob").write_bytes(blob)
    assert artifact.sha256_file(tmp_path / "blob") == hashlib.sha256(blob).hexdigest()
    artifact.write_json(tmp_path / "x.json", {"b": 1, "a": "é"})
    assert (tmp_path / "x.json").read_text(encoding="utf-8") == '{\n "a": "é",\n "b": 1\n}\n'
    assert sorted(os.listdir(tmp_path)) == ["blob", "x.json"]  # no temp file left


def test_importing_it_does_not_import_torch() -> None:
    code = "import sys, gemmakit.artifact; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
