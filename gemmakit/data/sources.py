"""Corpus sources: JSONL (plain, gzip, zstd), Parquet and directories of text files -> `Doc` records.

Where it sits: the first stage of the data pipeline (`data.pipeline`, the data issue): every later
stage (filters, dedup, decontamination, shards) sees only `Doc(id, text, meta)`. Compression and
Parquet are recognised by magic bytes (gzip 1f 8b, zstd 28 b5 2f fd, Parquet "PAR1"), never by name.

JSONL lines are judged one at a time, so one bad byte never costs the rest of a file (datatrove
abandons a file at its first UnicodeDecodeError; reliability-tests.md D4). Each line ends up in
exactly one bucket, so lines = docs + blank + sum(malformed):
- a document: a JSON object whose `text_field` is a string. A UTF-8 BOM on the first line and a
  CRLF ending are repaired and counted (`repaired["bom"]`, `repaired["crlf"]`); a last line without
  a newline is kept if it parses (`repaired["no_final_newline"]`);
- blank: only whitespace; skipped and counted;
- malformed, by category: invalid_utf8, invalid_json (a torn last line lands here), not_object,
  missing_text, text_not_string, line_too_long, json_too_deep (nesting past Python's recursion limit,
  e.g. 100k `[`: json.loads raises RecursionError, not ValueError), bad_messages (chat: not a list
  of {role, content} turns), bad_preference (a row `data.preference.parse_preference` rejects).
  Each is written to the quarantine sidecar with its file:line and the first 1000 bytes of the line.

Key trade-off: lines longer than `max_line_bytes` (16 MiB by default) are quarantined without being
held in memory (read in 1 MiB pieces), bounding memory on a corrupt file with a 100 MB "line" at the
price of refusing genuinely huge documents; raise the limit for corpora that have them.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from gemmakit.data.preference import PreferenceDataError, pair_record, parse_preference
from gemmakit.errors import UserError

MALFORMED = ("invalid_utf8", "invalid_json", "json_too_deep", "not_object", "missing_text", "text_not_string",
             "line_too_long", "bad_messages", "bad_preference")  # fmt: skip
MODEL_ROLES = ("model", "assistant")  # the speaker whose turns SFT trains on (Gemma says "model")
_GZIP, _ZSTD, _PARQUET = b"\x1f\x8b", b"\x28\xb5\x2f\xfd", b"PAR1"
_BOM = b"\xef\xbb\xbf"
_PIECE = 1 << 20


class SourceError(UserError):
    """A source cannot be read at all (corrupt compression, unknown format); names the file and why."""


@dataclass(frozen=True)
class Doc:
    """One document: a stable id, its text, and the rest of its record (source file, line, fields)."""

    id: str  # the record's id field if it has one, else "<file name>:<line>"
    text: str
    meta: dict = field(default_factory=dict)


@dataclass
class SourceStats:
    """Exact counts for one source; `lines == docs + blank + sum(malformed.values())` for JSONL."""

    lines: int = 0
    docs: int = 0
    blank: int = 0
    malformed: Counter = field(default_factory=Counter)
    repaired: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {"lines": self.lines, "docs": self.docs, "blank": self.blank,
                "malformed": dict(sorted(self.malformed.items())), "repaired": dict(sorted(self.repaired.items()))}  # fmt: skip


class Quarantine:
    """The sidecar of rejected lines: JSONL {"file", "line", "category", "raw"}, written atomically on close."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self.entries: list[dict] = []

    def add(self, file: Path, line: int, category: str, raw: bytes) -> None:
        self.entries.append({"file": str(file), "line": line, "category": category,
                             "raw": raw[:1000].decode("utf-8", errors="replace")})  # fmt: skip

    def close(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for e in self.entries:
                f.write(json.dumps(e, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def sniff(path: Path) -> str:
    """'directory', 'parquet', 'gzip', 'zstd' or 'text' (plain JSONL / text), from magic bytes."""
    if path.is_dir():
        return "directory"
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise SourceError(f"{path}: cannot read ({e.strerror})") from None
    if head.startswith(_GZIP):
        return "gzip"
    if head == _ZSTD:
        return "zstd"
    if head == _PARQUET:
        return "parquet"
    return "text"


def _open_binary(path: Path, kind: str) -> IO[bytes]:
    if kind == "gzip":
        return gzip.open(path, "rb")
    if kind == "zstd":
        try:
            import zstandard
        except ImportError:
            raise SourceError(
                f"{path}: zstd-compressed; install the data extra (pip install 'gemmakit[data]')"
            ) from None
        return io.BufferedReader(_ZstdFrames(path, zstandard))
    return open(path, "rb")  # noqa: SIM115 (closed by the caller's with)


class _ZstdFrames(io.RawIOBase):
    """A zstd file's decompressed bytes, frame after frame, that fails on a truncated last frame.

    zstandard's stream_reader just returns EOF when the input ends inside a frame, so a file cut in
    half would read as a shorter, valid corpus (rc 0, records silently lost); a decompressobj tells a
    finished frame (`eof`) from one still waiting for input."""

    def __init__(self, path: Path, zstandard: Any) -> None:
        self._file = open(path, "rb")  # noqa: SIM115 (closed in close())
        self._zstd, self._dobj, self._done = zstandard, None, False
        self._buf, self._at = b"", 0  # decompressed bytes not yet read start at _at (no re-slicing)

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while self._at == len(self._buf) and not self._done:
            self._buf, self._at = b"", 0
            self._fill()
        n = min(len(b), len(self._buf) - self._at)
        b[:n] = memoryview(self._buf)[self._at : self._at + n]
        self._at += n
        return n

    def _fill(self) -> None:
        # 64 KiB of input at a time: decompressobj has no output cap, so this bounds each step's output
        # to 64 KiB times the compression ratio.
        data = self._file.read(1 << 16)
        if not data:
            if self._dobj is not None and not self._dobj.eof:
                raise SourceError(f"{self._file.name}: truncated zstd data (the file ends inside a frame; "
                                  "was it cut short by a failed copy or download?)")  # fmt: skip
            self._done = True
            return
        parts = []
        while data:
            if self._dobj is None or self._dobj.eof:
                self._dobj = self._zstd.ZstdDecompressor().decompressobj()
            parts.append(self._dobj.decompress(data))
            # The bytes after a finished frame start the next frame (a concatenated file).
            data = self._dobj.unused_data if self._dobj.eof else b""
        self._buf = b"".join(parts)

    def close(self) -> None:
        self._file.close()
        super().close()


def _lines(f: IO[bytes], max_line_bytes: int) -> Iterator[tuple[bytes, bool, bool, int]]:
    """(line without its newline, ended by a newline, too long, bytes consumed) per line; at most
    max_line_bytes + 1 bytes in memory."""
    while True:
        piece = f.readline(max_line_bytes + 1)
        if not piece:
            return
        if piece.endswith(b"\n"):
            yield piece[:-1], True, False, len(piece)
        elif len(piece) <= max_line_bytes:  # the last line, without a newline
            yield piece, False, False, len(piece)
        else:  # too long: keep its start for the quarantine, skip the rest in 1 MiB pieces
            rest, consumed = piece, len(piece)
            while rest and not rest.endswith(b"\n"):
                rest = f.readline(_PIECE)
                consumed += len(rest)
            yield piece[:1000], bool(rest), True, consumed


def _seek_line(f: IO[bytes], start: int) -> tuple[int, int]:
    """Move to the first line starting at or after byte `start`; (its byte offset, lines before it).

    A line belongs to the byte range its first byte falls in (the Hadoop split rule), so ranges
    [0, a), [a, b), ... of one file read every line exactly once."""
    if start <= 0:
        return 0, 0
    f.seek(start - 1)
    while True:  # skip the rest of the line holding byte start - 1
        piece = f.readline(_PIECE)
        if not piece or piece.endswith(b"\n"):
            break
    pos = f.tell()
    f.seek(0)
    newlines, left = 0, pos
    while left:
        chunk = f.read(min(left, 16 << 20))
        newlines += chunk.count(b"\n")
        left -= len(chunk)
    return pos, newlines


def read_jsonl(path: str | Path, *, text_field: str = "text", id_field: str = "id",
               quarantine: Quarantine | None = None, stats: SourceStats | None = None,
               max_line_bytes: int = 16 << 20, chat: bool = False, byte_range: tuple[int, int] | None = None,
               preference: bool = False) -> Iterator[Doc]:  # fmt: skip
    """Documents of a JSONL file (plain, gzip or zstd); bad lines go to `quarantine`, counts to `stats`.

    With `chat=True`, `text_field` names a list of {"role": str, "content": str} turns (SFT data, e.g.
    "messages"): the Doc keeps the turns in `meta["messages"]` and its text is `chat_text(turns)`.
    With `preference=True` (`text_field` unused), each line is a TRL preference row read by
    `data.preference.parse_preference` (a rejected row is quarantined as "bad_preference"): the Doc keeps
    the normalised pair in `meta["preference"]` and its text is `chat_text(prompt + chosen + rejected)`.
    `byte_range=(start, end)` (plain files only) reads just the lines whose first byte is in [start, end),
    with their true line numbers: how the pipeline splits one big file between shards."""
    path, stats = Path(path), stats if stats is not None else SourceStats()
    kind = sniff(path)
    if byte_range is not None and kind != "text":
        raise SourceError(f"{path}: byte ranges need an uncompressed file, this one is {kind}")
    start, end = byte_range or (0, None)
    try:
        with _open_binary(path, kind) as f:
            pos, before = _seek_line(f, start) if start else (0, 0)
            if start:
                f.seek(pos)
            for n, (raw, ended, too_long, consumed) in enumerate(_lines(f, max_line_bytes), before + 1):
                if end is not None and pos >= end:
                    break
                pos += consumed
                stats.lines += 1
                doc, category = _judge(raw, n, ended, too_long, path, text_field, id_field, stats, chat,
                                       preference)  # fmt: skip
                if doc is not None:
                    stats.docs += 1
                    yield doc
                elif category == "blank":
                    stats.blank += 1
                else:
                    stats.malformed[category] += 1
                    if quarantine is not None:
                        quarantine.add(path, n, category, raw)
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise SourceError(f"{path}: corrupt {kind} data after {stats.lines} lines ({e})") from None
    except Exception as e:  # zstandard raises its own ZstdError
        if type(e).__name__ == "ZstdError":
            raise SourceError(f"{path}: corrupt zstd data after {stats.lines} lines ({e})") from None
        raise


def _judge(raw: bytes, n: int, ended: bool, too_long: bool, path: Path, text_field: str, id_field: str,
           stats: SourceStats, chat: bool = False,
           preference: bool = False) -> tuple[Doc | None, str]:  # fmt: skip
    """(the document, "") or (None, the bucket) for one line."""
    if too_long:
        return None, "line_too_long"
    if n == 1 and raw.startswith(_BOM):
        raw = raw[len(_BOM) :]
        stats.repaired["bom"] += 1
    if raw.endswith(b"\r"):
        raw = raw[:-1]
        stats.repaired["crlf"] += 1
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "invalid_utf8"
    if not line.strip():
        return None, "blank"
    try:
        obj = json.loads(line)
    except ValueError:
        return None, "invalid_json"
    except RecursionError:  # deeper nesting than the decoder can recurse; one bad line, not a bad file
        return None, "json_too_deep"
    if not isinstance(obj, dict):
        return None, "not_object"
    if preference:
        return _preference_doc(obj, n, ended, path, id_field, stats)
    if text_field not in obj:
        return None, "missing_text"
    text = turns = obj[text_field]
    if chat:
        if not _turns_ok(turns):
            return None, "bad_messages"
        text = chat_text(turns)
    elif not isinstance(text, str):
        return None, "text_not_string"
    if not ended:
        stats.repaired["no_final_newline"] += 1
    doc_id = obj.get(id_field)
    meta = {k: v for k, v in obj.items() if k != text_field}
    if chat:
        meta["messages"] = turns  # the conversation itself; filters read and rewrite its turns here
    meta.update(source=str(path), line=n)
    return Doc(str(doc_id) if doc_id is not None else f"{path.name}:{n}", text, meta), ""


def _preference_doc(obj: dict, n: int, ended: bool, path: Path, id_field: str,
                    stats: SourceStats) -> tuple[Doc | None, str]:  # fmt: skip
    try:
        pair = parse_preference(obj, f"{path}:{n}")
    except PreferenceDataError:
        return None, "bad_preference"
    if not ended:
        stats.repaired["no_final_newline"] += 1
    record = pair_record(pair)
    meta = {k: v for k, v in obj.items() if k not in record and k != "margin"}
    meta.update(preference=record, source=str(path), line=n)
    doc_id = obj.get(id_field)
    text = chat_text(record["prompt"] + record["chosen"] + record["rejected"])
    return Doc(str(doc_id) if doc_id is not None else f"{path.name}:{n}", text, meta), ""


def _turns_ok(turns: Any) -> bool:
    return (
        isinstance(turns, list)
        and bool(turns)
        and all(
            isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str)
            for t in turns
        )
    )


def chat_text(turns: list[dict]) -> str:
    """The text filters see for a conversation: its turns' contents, separated by blank lines."""
    return "\n\n".join(t["content"] for t in turns)


def read_text_dir(path: str | Path, *, quarantine: Quarantine | None = None,
                  stats: SourceStats | None = None, suffix: str = ".txt") -> Iterator[Doc]:  # fmt: skip
    """One document per `suffix` file under `path` (recursive, sorted by relative path); bad UTF-8 quarantined."""
    root, stats = Path(path), stats if stats is not None else SourceStats()
    for file in sorted(p for p in root.rglob(f"*{suffix}") if p.is_file()):
        rel = file.relative_to(root).as_posix()
        stats.lines += 1
        data = file.read_bytes()
        try:
            text = data.removeprefix(_BOM).decode("utf-8").replace("\r\n", "\n")
        except UnicodeDecodeError:
            stats.malformed["invalid_utf8"] += 1
            if quarantine is not None:
                quarantine.add(file, 0, "invalid_utf8", data)
            continue
        if not text.strip():
            stats.blank += 1
            continue
        stats.docs += 1
        yield Doc(rel, text, {"source": str(file)})


def read_parquet(path: str | Path, *, text_field: str = "text", id_field: str = "id",
                 quarantine: Quarantine | None = None, stats: SourceStats | None = None) -> Iterator[Doc]:  # fmt: skip
    """Rows of a Parquet file, batch by batch (needs pyarrow: the `data` extra)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SourceError(
            f"{path}: Parquet needs pyarrow; install the data extra (pip install 'gemmakit[data]')"
        ) from None
    path, stats = Path(path), stats if stats is not None else SourceStats()
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends
        raise SourceError(f"{path}: not a readable Parquet file ({e})") from None
    if text_field not in pf.schema_arrow.names:
        raise SourceError(f"{path}: no column {text_field!r}; columns are {pf.schema_arrow.names}")
    n = 0
    for batch in pf.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            n += 1
            stats.lines += 1
            text = row.get(text_field)
            if not isinstance(text, str):
                stats.malformed["text_not_string"] += 1
                if quarantine is not None:
                    quarantine.add(path, n, "text_not_string", repr(text).encode())
                continue
            stats.docs += 1
            meta = {k: v for k, v in row.items() if k != text_field} | {"source": str(path), "line": n}
            doc_id = row.get(id_field)
            yield Doc(str(doc_id) if doc_id is not None else f"{path.name}:{n}", text, meta)


def read_source(path: str | Path, **kwargs: Any) -> Iterator[Doc]:
    """Documents of any supported source, chosen by content: a directory, Parquet, or (compressed) JSONL."""
    path = Path(path)
    if not path.exists():
        raise SourceError(f"{path}: no such file or directory")
    kind = sniff(path)
    if kwargs.get("preference") and kind in ("directory", "parquet"):
        raise SourceError(f"{path}: preference sources must be JSONL (plain, gzip or zstd), this is a {kind}")
    if kind == "directory":
        kwargs.pop("text_field", None), kwargs.pop("id_field", None), kwargs.pop("max_line_bytes", None)
        return read_text_dir(path, **kwargs)
    if kind == "parquet":
        kwargs.pop("max_line_bytes", None)
        return read_parquet(path, **kwargs)
    return read_jsonl(path, **kwargs)
