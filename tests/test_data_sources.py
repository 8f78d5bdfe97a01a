"""Corpus sources: the malformed-line corpus (reliability-tests.md D4) loses no good line and counts and
quarantines every bad one, in plain, gzip and zstd JSONL; corrupt compression is a clear error; text
directories and Parquet read back exactly."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from gemmakit.data.sources import MALFORMED, Quarantine, SourceError, SourceStats, read_source


def _corpus() -> tuple[bytes, list[str], dict[str, int]]:
    """(file bytes, texts of the good lines in order, expected malformed counts)."""
    good = [f"good document {i} café" for i in range(12)]
    lines = [
        b"\xef\xbb\xbf" + json.dumps({"text": good[0], "id": "a"}).encode(),  # BOM on line 1: repaired
        json.dumps({"text": good[1]}).encode() + b"\r",  # CRLF: repaired
        b"{not json",
        json.dumps({"text": good[2]}).encode(),
        b'{"text": "bad byte \xff here"}',  # invalid UTF-8
        json.dumps({"text": good[3]}).encode(),
        b"",  # blank
        b"   \t",  # blank
        b"[1, 2, 3]",  # not an object
        json.dumps({"body": "no text field"}).encode(),
        json.dumps({"text": 42}).encode(),
        json.dumps({"text": good[4]}).encode(),
        b'{"text": "' + b"x" * 3000 + b'"}',  # too long at max_line_bytes=2048
        *(json.dumps({"text": t}).encode() for t in good[5:]),
        b'{"text": "torn last li',  # a torn last line, no newline
    ]
    data = b"\n".join(lines)
    expected = {"invalid_json": 2, "invalid_utf8": 1, "not_object": 1, "missing_text": 1, "text_not_string": 1,
                "line_too_long": 1}  # fmt: skip
    return data, good, expected


def _zstd(data: bytes) -> bytes:
    zstandard = pytest.importorskip("zstandard")
    return zstandard.ZstdCompressor().compress(data)


@pytest.mark.parametrize("codec", ["plain", "gzip", "zstd"])
def test_malformed_corpus_keeps_every_good_line(tmp_path: Path, codec: str) -> None:
    data, good, expected = _corpus()
    blob = {"plain": lambda d: d, "gzip": gzip.compress, "zstd": _zstd}[codec](data)
    path = tmp_path / "corpus.bin"  # a neutral name: the format is found from the bytes
    path.write_bytes(blob)
    stats, quarantine = SourceStats(), Quarantine(tmp_path / "quarantine.jsonl")
    docs = list(read_source(path, quarantine=quarantine, stats=stats, max_line_bytes=2048))
    quarantine.close()
    assert [d.text for d in docs] == good
    assert docs[0].id == "a" and docs[1].id == "corpus.bin:2" and docs[1].meta["line"] == 2
    assert dict(stats.malformed) == expected and set(stats.malformed) <= set(MALFORMED)
    assert stats.blank == 2 and stats.repaired["bom"] == 1 and stats.repaired["crlf"] == 1
    assert stats.lines == stats.docs + stats.blank + sum(stats.malformed.values()) == data.count(b"\n") + 1
    entries = [json.loads(ln) for ln in (tmp_path / "quarantine.jsonl").read_text().splitlines()]
    assert sorted(e["category"] for e in entries) == sorted(k for k, v in expected.items() for _ in range(v))
    assert {e["line"] for e in entries} == {3, 5, 9, 10, 11, 13, data.count(b"\n") + 1}
    assert all(e["file"] == str(path) for e in entries)


def test_a_100_mb_line_is_quarantined_without_losing_the_next_one(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"text": "before"}\n{"text": "' + b"y" * (100 << 20) + b'"}\n{"text": "after"}\n')
    stats = SourceStats()
    assert [d.text for d in read_source(path, stats=stats)] == ["before", "after"]
    assert stats.malformed == {"line_too_long": 1}


@pytest.mark.parametrize("codec", ["gzip", "zstd"])
def test_corrupt_compressed_files_are_clear_errors(tmp_path: Path, codec: str) -> None:
    data = b"".join(json.dumps({"text": f"doc {i} " * 50}).encode() + b"\n" for i in range(2000))
    blob = bytearray(gzip.compress(data) if codec == "gzip" else _zstd(data))
    blob[len(blob) // 2 : len(blob) // 2 + 64] = b"\x00" * 64
    path = tmp_path / "bad"
    path.write_bytes(bytes(blob))
    with pytest.raises(SourceError, match=rf"{path}: corrupt {codec} data after \d+ lines"):
        list(read_source(path))


def test_text_directories_and_parquet(tmp_path: Path) -> None:
    root = tmp_path / "texts"
    (root / "b").mkdir(parents=True)
    (root / "a.txt").write_text("first\r\nline")
    (root / "b" / "c.txt").write_bytes(b"\xef\xbb\xbfsecond")
    (root / "b" / "bad.txt").write_bytes(b"\xff\xfe broken")
    (root / "empty.txt").write_text("  \n")
    stats, q = SourceStats(), Quarantine(None)
    docs = list(read_source(root, stats=stats, quarantine=q))
    assert [(d.id, d.text) for d in docs] == [("a.txt", "first\nline"), ("b/c.txt", "second")]
    assert (
        stats.malformed == {"invalid_utf8": 1}
        and stats.blank == 1
        and q.entries[0]["category"] == "invalid_utf8"
    )

    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    table = pa.table({"id": ["x", "y", "z"], "text": ["one", None, "three"], "lang": ["en", "en", "fr"]})
    pq.write_table(table, tmp_path / "t.parquet")
    stats = SourceStats()
    docs = list(read_source(tmp_path / "t.parquet", stats=stats))
    assert [(d.id, d.text, d.meta["lang"]) for d in docs] == [("x", "one", "en"), ("z", "three", "fr")]
    assert stats.malformed == {"text_not_string": 1}
    with pytest.raises(SourceError, match="no column 'body'"):
        list(read_source(tmp_path / "t.parquet", text_field="body"))
    with pytest.raises(SourceError, match="no such file"):
        read_source(tmp_path / "missing.jsonl")
