"""Issue 17's bad-input rows for the data pipeline: `data run`, `data synth` and `shards` (rows 13-16).

Every case runs the real CLI in a subprocess and must exit 2 with one `gemmakit: error:` line naming
the file or value, no traceback, and no output directory left behind (a run whose shards all failed
has nothing a resume could reuse). The one exception is a single undecodable JSONL line, which is
quarantined and counted by reason like any other malformed line. Corpora are a few hundred generated
documents so that the whole file stays fast.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
from data_helpers import write_recipe
from test_bad_output_paths import cli, cli_on_tmpfs, needs_unshare
from test_cli import assert_user_error

from gemmakit.data.webgen import web_docs

ROOT = Path(__file__).resolve().parents[1]
NANO_TOKENIZER = ROOT / "gemmakit" / "assets" / "nano" / "tokenizer.model"
# One source, one cheap per-document stage, no token shards: the rows are about reading the input.
ONE_SOURCE = """
[pipeline]
shards = {shards}
workers = {workers}

[[source]]
name = "c"
paths = ["{path}"]

[[stage]]
kind = "pii"

[output]
tokenizer = ""
"""


def _jsonl(n: int = 300) -> bytes:
    return "".join(json.dumps({"id": d["id"], "text": d["text"]}) + "\n" for d in web_docs(n, 0)).encode()


def _recipe(root: Path, name: str, shards: int = 1) -> Path:
    # write_recipe fills {shards} and {workers}; the doubled braces keep {path} for the file name.
    return write_recipe(root, shards=shards, text=ONE_SOURCE.replace("{path}", name))


def _data_run(recipe: Path, out: Path) -> subprocess.CompletedProcess:
    return cli("data", "run", "--recipe", str(recipe), "--output", str(out))


def _assert_failed_run(proc: subprocess.CompletedProcess, out: Path, *needles: str) -> None:
    assert_user_error(proc, *needles)
    assert proc.stderr.startswith("gemmakit: error:")
    assert not out.exists()  # no shard finished: nothing to resume, so nothing is left


@pytest.mark.parametrize("docs", [300, 5])
def test_truncated_zstd_fails_the_shard_naming_the_file(tmp_path, docs) -> None:
    """Row 13: the stream reader used to stop quietly at the cut (rc 0, a partial or zero count)."""
    zstandard = pytest.importorskip("zstandard")
    whole = zstandard.ZstdCompressor().compress(_jsonl(docs))
    (tmp_path / "c.jsonl.zst").write_bytes(whole[: len(whole) // 2])
    out = tmp_path / "out"
    proc = _data_run(_recipe(tmp_path, "c.jsonl.zst"), out)
    _assert_failed_run(proc, out, "c.jsonl.zst", "truncated zstd")


def test_concatenated_zstd_frames_still_read_whole(tmp_path) -> None:
    """The frame-end check must not mistake a second frame for damage (zstd files may be concatenated)."""
    zstandard = pytest.importorskip("zstandard")
    lines = _jsonl(40).splitlines(keepends=True)
    c = zstandard.ZstdCompressor()
    (tmp_path / "c.jsonl.zst").write_bytes(
        c.compress(b"".join(lines[:15])) + c.compress(b"".join(lines[15:]))
    )
    out = tmp_path / "out"
    proc = _data_run(_recipe(tmp_path, "c.jsonl.zst"), out)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads((out / "stats.json").read_text())
    assert stats["total"]["docs_in"] == 40


def test_corrupt_deflate_stream_fails_the_shard_naming_the_file(tmp_path) -> None:
    """Row 14: a damaged deflate block raises zlib.error, which is neither OSError nor EOFError."""
    data = bytearray(gzip.compress(_jsonl()))
    data[10:14] = b"\xff\xff\xff\xff"  # the first deflate block header: "invalid block type"
    (tmp_path / "c.jsonl.gz").write_bytes(bytes(data))
    out = tmp_path / "out"
    proc = _data_run(_recipe(tmp_path, "c.jsonl.gz"), out)
    _assert_failed_run(proc, out, "c.jsonl.gz", "corrupt gzip")


def _nested_jsonl(path: Path) -> None:
    # 100k `[` makes json.loads raise RecursionError, which `except ValueError` does not catch.
    path.write_text(json.dumps({"text": "a first document"}) + "\n" + "[" * 100_000 + "\n"
                    + json.dumps({"text": "a last document"}) + "\n")  # fmt: skip


def test_deeply_nested_line_is_quarantined_and_counted(tmp_path) -> None:
    """Row 14: one such line is one malformed line, not a crashed worker (two workers: the pool path)."""
    _nested_jsonl(tmp_path / "c.jsonl")
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, shards=2, workers=2, text=ONE_SOURCE.replace("{path}", "c.jsonl"))
    proc = _data_run(recipe, out)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    stats = json.loads((out / "stats.json").read_text())
    assert stats["total"]["malformed"] == {"json_too_deep": 1} and stats["total"]["kept"] == 2
    q = [json.loads(x) for p in (out / "quarantine").glob("*.jsonl") for x in p.read_text().splitlines()]
    assert [(Path(e["file"]).name, e["line"], e["category"]) for e in q] == [("c.jsonl", 2, "json_too_deep")]
    assert "json_too_deep" in (out / "report.md").read_text()


def test_deeply_nested_line_in_shards_names_file_and_line(tmp_path) -> None:
    """Row 14 through `gemmakit shards`, which refuses the first malformed line instead of skipping it."""
    _nested_jsonl(tmp_path / "c.jsonl")
    out = tmp_path / "tok"
    proc = cli("shards", str(tmp_path / "c.jsonl"), "--tokenizer", str(NANO_TOKENIZER), "--out", str(out))
    _assert_failed_run(proc, out, f"{tmp_path / 'c.jsonl'}:2", "nested too deeply")


def test_recipe_that_is_a_directory(tmp_path) -> None:
    """Row 15: reading a directory used to raise IsADirectoryError from inside the TOML reader."""
    proc = subprocess.run([sys.executable, "-m", "gemmakit.cli", "data", "run", "--recipe", str(tmp_path)],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)  # fmt: skip
    assert_user_error(proc, str(tmp_path), "is a directory")
    assert not (tmp_path / "data-runs").exists()


def test_output_that_is_a_regular_file(tmp_path) -> None:
    """Row 15: `--output` naming a file used to fail in mkdir with FileExistsError."""
    (tmp_path / "c.jsonl").write_bytes(_jsonl(5))
    taken = tmp_path / "taken"
    taken.write_text("mine\n")
    proc = _data_run(_recipe(tmp_path, "c.jsonl"), taken)
    assert_user_error(proc, str(taken), "not a directory")
    assert taken.read_text() == "mine\n"


def test_synth_out_that_is_a_regular_file(tmp_path) -> None:
    """Row 15: `data synth --out FILE` used to fail with NotADirectoryError on FILE/web."""
    taken = tmp_path / "taken"
    taken.write_text("mine\n")
    proc = cli("data", "synth", "--out", str(taken), "--docs", "10")
    assert_user_error(proc, str(taken), "not a directory")
    assert taken.read_text() == "mine\n"


@needs_unshare
def test_data_run_into_a_read_only_directory(tmp_path) -> None:
    """Row 15: EROFS on the output is named, and the read-only tmpfs is left as it was (empty)."""
    (tmp_path / "c.jsonl").write_bytes(_jsonl(5))
    out = tmp_path / "mnt" / "out"
    args = ["data", "run", "--recipe", str(_recipe(tmp_path, "c.jsonl")), "--output", str(out)]
    proc, left = cli_on_tmpfs(tmp_path / "mnt", args, read_only=True)
    assert_user_error(proc, str(out), "Read-only file system")
    assert proc.stderr.startswith("gemmakit: error:") and left == []


@needs_unshare
def test_synth_into_a_read_only_directory(tmp_path) -> None:
    """Row 15, `data synth`."""
    out = tmp_path / "mnt" / "corpus"
    proc, left = cli_on_tmpfs(tmp_path / "mnt", ["data", "synth", "--out", str(out), "--docs", "10"],
                              read_only=True)  # fmt: skip
    assert_user_error(proc, str(out), "Read-only file system")
    assert proc.stderr.startswith("gemmakit: error:") and left == []


def test_absurd_shard_count_is_refused_at_once(tmp_path) -> None:
    """Row 16: planning 10^8 shards (a byte range of every input each) used to run for minutes."""
    (tmp_path / "c.jsonl").write_bytes(_jsonl(5))
    recipe = _recipe(tmp_path, "c.jsonl", shards=100_000_000)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "gemmakit.cli", "data", "run", "--recipe", str(recipe),
                           "--output", str(out)], capture_output=True, text=True, timeout=30)  # fmt: skip
    _assert_failed_run(proc, out, str(recipe), "shards", "100000000", "at most 100000")
