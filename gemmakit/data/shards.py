"""Token shards: the on-disk format between tokenization and training, its writer and its reader.

Where it sits: corpus -> (data pipeline / `tokenize_to_shards`) -> `ShardWriter` -> a shard directory
-> `Shards.open` -> `data.loader.PackedLoader` -> `train.loop`. Nothing here knows about models.

The format (version 1; the contract every writer of shards follows). A shard directory holds:

- `shard-NNNNN.bin`: raw little-endian token ids, no header, in the index's `dtype` ("uint16" when
  vocab_size - 1 <= 65535, else "uint32": the smallest unsigned dtype, 2 bytes/token for Gemma 1/2's
  256000 ids would not fit, so those use 4). Documents are concatenated; every document starts with
  `bos_id` (writers refuse documents that do not; nothing is prepended silently). A document never
  spans two shards, and every shard holds at least one document. File size = n_tokens * itemsize.
- `shard-NNNNN.docs.npy`: a 1-D int64 .npy array (read with allow_pickle=False) of the offsets, in
  tokens, where each document starts within its shard: strictly increasing, first 0, all < n_tokens.
  Kept out of the index so index.json stays small for millions of documents (8 bytes per document).
- `index.json`, written LAST (temp file, fsync, rename): the commit marker. Exactly these keys:
  `{"format": "gemmakit-shards", "version": 1, "dtype": "uint16"|"uint32", "vocab_size": int,
  "tokenizer_sha256": str, "bos_id": int, "n_tokens": int, "n_docs": int, "shards": [{"file": str,
  "n_tokens": int, "n_docs": int, "sha256": str (of the .bin), "docs_file": str}], "meta": {...}}`.
  `meta` is free-form (sources, created_by); totals equal the sums over `shards`; file names are plain
  names inside the directory. Readers refuse unknown keys and other versions.

Key trade-off: opening is cheap and hashing is opt-in. `Shards.open` checks the index, every file's
byte size and the document offsets (O(index + 8 bytes per document)), then memory-maps the .bin files,
so a 100 GB corpus opens in well under a second; `verify=True` also hashes every byte (sha256) and
checks each document's first token and the id range, at disk speed (minutes for 100 GB). Files are
size-checked before mapping; a file truncated *while* mapped raises SIGBUS on access (mmap semantics),
which no check at open time can prevent. Writers are atomic (`gemmakit.artifact`, without a
manifest.json: index.json is this format's own): a temp directory next to the target is swapped into
place only after every file is fsynced, so readers never see a partial shard set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from array import array
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gemmakit import artifact
from gemmakit.errors import UserError
from gemmakit.tokenizer import Tokenizer, TokenizerError

log = logging.getLogger(__name__)

FORMAT, VERSION, INDEX = "gemmakit-shards", 1, "index.json"
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}  # little-endian, as the format says
_FIELDS = {"format": str, "version": int, "dtype": str, "vocab_size": int, "tokenizer_sha256": str,
           "bos_id": int, "n_tokens": int, "n_docs": int, "shards": list, "meta": dict}  # fmt: skip
_SHARD_FIELDS = {"file": str, "n_tokens": int, "n_docs": int, "sha256": str, "docs_file": str}
_NPY_MAGIC = b"\x93NUMPY"


class ShardError(UserError):
    """A shard directory or a document is invalid; the message is one line naming the file and problem."""


def _err(where: Path | str, problem: str) -> ShardError:
    return ShardError(f"{where}: " + " ".join(str(problem).split()))  # one line, always


def dtype_for_vocab(vocab_size: int) -> str:
    """The format's token dtype name: the smallest unsigned dtype that holds ids up to vocab_size - 1."""
    return "uint16" if vocab_size - 1 <= np.iinfo(np.uint16).max else "uint32"


# ---- writing --------------------------------------------------------------------------------------


class ShardWriter:
    """Write documents (token lists starting with BOS) into a shard directory, committed at `close()`.

    `shard_tokens` is the target shard size: a new shard starts when the next document would overflow
    the current one, so a shard exceeds it only when it holds a single longer document. Files go to a
    temp directory `.<name>.tmp-*` next to `out_dir`; on an exception inside `with` (or `abort()`) it is
    removed and nothing is committed. `meta` is written to index.json at close and may be updated until
    then. A writer left neither closed nor aborted leaves its temp directory behind (never read).
    """

    def __init__(self, out_dir: str | Path, *, vocab_size: int, tokenizer_sha256: str, bos_id: int,
                 shard_tokens: int = 1 << 26, meta: dict | None = None,
                 overwrite: bool = False) -> None:  # fmt: skip
        self.out_dir = Path(os.path.abspath(out_dir))
        for name, value in (("vocab_size", vocab_size), ("bos_id", bos_id), ("shard_tokens", shard_tokens)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise _err(self.out_dir, f"{name}: expected a non-negative int, got {value!r}")
        if not 1 <= vocab_size <= 1 << 32 or bos_id >= vocab_size or shard_tokens < 1:
            got = f"vocab_size={vocab_size}, bos_id={bos_id}, shard_tokens={shard_tokens}"
            raise _err(
                self.out_dir, f"need 1 <= vocab_size <= 2**32, bos_id < vocab_size, shard_tokens > 0: {got}"
            )
        if not isinstance(tokenizer_sha256, str):
            raise _err(self.out_dir, f"tokenizer_sha256: expected str, got {type(tokenizer_sha256).__name__}")
        self.vocab_size, self.tokenizer_sha256, self.bos_id = vocab_size, tokenizer_sha256, bos_id
        self.shard_tokens, self.overwrite = shard_tokens, overwrite
        self.meta: dict = dict(meta or {})
        self.dtype = dtype_for_vocab(vocab_size)
        self.n_tokens = self.n_docs = 0
        try:
            self._tmp = artifact.stage(self.out_dir, overwrite=overwrite)
        except artifact.ArtifactError as e:  # the target is in the way
            raise ShardError(str(e)) from None
        self._shards: list[dict[str, Any]] = []
        self._file: Any = None  # the open .bin of the current shard
        self._hash: Any = None
        self._offsets = array("q")  # int64 document starts within the current shard
        self._shard_n = 0  # tokens in the current shard
        self._state = "open"

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state == "open":
            self.close()

    def _doc_array(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        """Validate one document; return it in the file's dtype. Nothing is written on error."""
        where, n = self.out_dir, self.n_docs
        arr = np.asarray(tokens)
        if arr.ndim != 1 or arr.size == 0:
            raise _err(where, f"doc {n}: expected a non-empty 1-D sequence of ids, got shape {arr.shape}")
        if arr.dtype.kind not in "iu":
            raise _err(where, f"doc {n}: token ids must be integers, got dtype {arr.dtype}")
        bad = (arr < 0) | (arr >= self.vocab_size)
        if bad.any():
            i = int(np.argmax(bad))
            raise _err(
                where, f"doc {n}: token id {int(arr[i])} at position {i} is not in [0, {self.vocab_size})"
            )
        if arr[0] != self.bos_id:
            raise _err(where, f"doc {n}: must start with bos_id {self.bos_id}, starts with {int(arr[0])}")
        return arr.astype(DTYPES[self.dtype], copy=False)

    def add(self, tokens: Sequence[int] | np.ndarray) -> None:
        """Append one document; ShardError (and nothing written) if it is invalid."""
        if self._state != "open":
            raise _err(self.out_dir, f"writer is {self._state}; cannot add documents")
        doc = self._doc_array(tokens)
        try:
            if self._file is not None and self._shard_n + len(doc) > self.shard_tokens:
                self._finish_shard()
            if self._file is None:
                self._file = open(self._tmp / f"shard-{len(self._shards):05d}.bin", "wb")  # noqa: SIM115
                self._hash = hashlib.sha256()
            data = doc.tobytes()
            self._file.write(data)
            self._hash.update(data)
        except BaseException:
            self.abort()
            raise
        self._offsets.append(self._shard_n)
        self._shard_n += len(doc)
        self.n_docs += 1
        self.n_tokens += len(doc)

    def _finish_shard(self) -> None:
        """Close and fsync the current .bin, write its .docs.npy, record it for the index."""
        f, self._file = self._file, None
        f.flush()
        os.fsync(f.fileno())
        f.close()
        name = Path(f.name).name
        docs_file = name.removesuffix(".bin") + ".docs.npy"
        with open(self._tmp / docs_file, "wb") as g:
            np.save(g, np.frombuffer(self._offsets, dtype=np.int64).astype("<i8"), allow_pickle=False)
            g.flush()
            os.fsync(g.fileno())
        self._shards.append({"file": name, "n_tokens": self._shard_n, "n_docs": len(self._offsets),
                             "sha256": self._hash.hexdigest(), "docs_file": docs_file})  # fmt: skip
        self._offsets, self._shard_n = array("q"), 0

    def _write_index(self) -> None:
        index = {"format": FORMAT, "version": VERSION, "dtype": self.dtype, "vocab_size": self.vocab_size,
                 "tokenizer_sha256": self.tokenizer_sha256, "bos_id": self.bos_id, "n_tokens": self.n_tokens,
                 "n_docs": self.n_docs, "shards": self._shards, "meta": self.meta}  # fmt: skip
        try:
            text = json.dumps(index, indent=1, allow_nan=False) + "\n"
        except (TypeError, ValueError) as e:
            raise _err(self.out_dir, f"meta: not JSON-serialisable ({e})") from None
        with artifact.atomic_open(self._tmp / INDEX) as f:
            f.write(text)

    def _commit(self) -> None:
        """Swap the temp dir into place (`artifact.commit`; index.json is the manifest)."""
        try:
            artifact.commit(self._tmp, self.out_dir, producer="gemmakit.data.shards", overwrite=self.overwrite,
                            manifest=False)  # fmt: skip
        except artifact.ArtifactError as e:  # it may have appeared while we were writing
            raise ShardError(str(e)) from None

    def close(self) -> Path:
        """Write the last shard and index.json, then move the directory into place. Returns out_dir."""
        if self._state == "closed":
            return self.out_dir
        if self._state != "open":
            raise _err(self.out_dir, f"writer is {self._state}; cannot close")
        try:
            if self.n_docs == 0:
                raise _err(self.out_dir, "no documents were added; refusing to write an empty shard set")
            self._finish_shard()
            self._write_index()
            self._commit()
        except BaseException:
            self.abort()
            raise
        self._state = "closed"
        log.info("wrote %s: %d docs, %d tokens, %d shards", self.out_dir, self.n_docs, self.n_tokens,
                 len(self._shards))  # fmt: skip
        return self.out_dir

    def abort(self) -> None:
        """Discard everything written so far (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        artifact.abort(self._tmp)
        if self._state == "open":
            self._state = "aborted"


# ---- reading --------------------------------------------------------------------------------------


def _check_fields(obj: Any, fields: dict[str, type], where: Path, what: str) -> None:
    if not isinstance(obj, dict):
        raise _err(where, f"{what}: expected a JSON object, got {type(obj).__name__}")
    if unknown := sorted(set(obj) - set(fields)):
        raise _err(where, f"{what}: unknown key(s) {unknown}; expected only {sorted(fields)}")
    if missing := sorted(set(fields) - set(obj)):
        raise _err(where, f"{what}: missing key(s) {missing}")
    for key, typ in fields.items():
        v = obj[key]
        if not isinstance(v, typ) or isinstance(v, bool) or (typ is int and v < 0):
            want = "a non-negative int" if typ is int else typ.__name__
            raise _err(where, f"{what}.{key}: expected {want}, got {v!r}")


def _read_index(root: Path) -> dict[str, Any]:
    path = root / INDEX
    if not root.is_dir():
        raise _err(root, "not a directory; expected a shard directory holding index.json")
    if not path.is_file():
        raise _err(path, "missing; the directory is not a committed shard set")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise _err(path, f"not valid UTF-8 at byte {e.start}") from None
    except json.JSONDecodeError as e:
        raise _err(path, f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    _check_fields(index, _FIELDS, path, "index")
    if index["format"] != FORMAT:
        raise _err(path, f"format: expected {FORMAT!r}, got {index['format']!r}")
    if index["version"] != VERSION:
        raise _err(path, f"version: this gemmakit reads version {VERSION}, got {index['version']}")
    vocab, dtype = index["vocab_size"], index["dtype"]
    if not 1 <= vocab <= 1 << 32:
        raise _err(path, f"vocab_size: expected 1..2**32, got {vocab}")
    if dtype != dtype_for_vocab(vocab):
        raise _err(path, f"dtype: expected {dtype_for_vocab(vocab)!r} for vocab_size {vocab} (the smallest "
                   f"unsigned dtype holding vocab_size-1), got {dtype!r}")  # fmt: skip
    if index["bos_id"] >= vocab:
        raise _err(path, f"bos_id: {index['bos_id']} is not below vocab_size {vocab}")
    if not index["shards"]:
        raise _err(path, "shards: empty; a shard set holds at least one shard")
    names: set[str] = set()
    for i, s in enumerate(index["shards"]):
        _check_fields(s, _SHARD_FIELDS, path, f"shards[{i}]")
        for key in ("file", "docs_file"):
            name = s[key]
            if name in names or name in ("", ".", "..", INDEX) or Path(name).name != name or "\\" in name:
                raise _err(path, f"shards[{i}].{key}: {name!r} is not a unique plain file name")
            names.add(name)
        if not 1 <= s["n_docs"] <= s["n_tokens"]:
            raise _err(path, f"shards[{i}]: need 1 <= n_docs <= n_tokens, got {s['n_docs']}, {s['n_tokens']}")
    for key in ("n_tokens", "n_docs"):
        if (total := sum(s[key] for s in index["shards"])) != index[key]:
            raise _err(path, f"{key}: {index[key]} differs from the sum over shards ({total})")
    return index


def _load_offsets(path: Path, n_docs: int, n_tokens: int) -> np.ndarray:
    """The validated int64 document starts of one shard, with n_tokens appended as the last end."""
    if not path.is_file():
        raise _err(path, "missing (listed in index.json)")
    with open(path, "rb") as f:
        if f.read(len(_NPY_MAGIC)) != _NPY_MAGIC:
            raise _err(path, "not a .npy file (bad magic bytes)")
    try:
        starts = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise _err(path, f"unreadable .npy ({e})") from None
    if starts.ndim != 1 or starts.dtype.kind not in "iu" or len(starts) != n_docs:
        raise _err(path, f"expected {n_docs} integer offsets (index.json n_docs), got {starts.dtype} "
                   f"array of shape {starts.shape}")  # fmt: skip
    offsets = np.append(starts.astype(np.int64), np.int64(n_tokens))
    if offsets[0] != 0 or (np.diff(offsets) <= 0).any():
        raise _err(path, f"offsets must start at 0 and increase strictly below n_tokens={n_tokens}")
    return offsets


class Shards:
    """A committed shard directory, memory-mapped. Build it with `Shards.open(path)`."""

    def __init__(
        self, path: Path, index: dict[str, Any], maps: list[np.ndarray], offsets: list[np.ndarray]
    ) -> None:
        self.path, self.index, self._maps, self._offsets = path, index, maps, offsets
        # _doc_base[s] = global index of shard s's first document; the last entry is n_docs
        self._doc_base = np.cumsum([0] + [len(o) - 1 for o in offsets]).tolist()
        self._docs: np.ndarray | None = None

    @classmethod
    def open(cls, path: str | Path, *, verify: bool = False) -> Shards:
        """Validate index.json, file sizes and offsets, then map the .bin files read-only.

        `verify=True` also checks every .bin's sha256 against the index, that every document starts
        with bos_id and that every id is below vocab_size (reads every byte).
        """
        root = Path(path)
        if not root.exists():
            artifact.recover(root)  # a writer killed mid-replace may have left it aside
        index = _read_index(root)
        dt = DTYPES[index["dtype"]]
        maps, offsets = [], []
        for s in index["shards"]:
            bin_path = root / s["file"]
            if not bin_path.is_file():
                raise _err(bin_path, "missing (listed in index.json)")
            size, want = bin_path.stat().st_size, s["n_tokens"] * dt.itemsize
            if size != want:
                raise _err(bin_path, f"size {size} bytes, expected {want} (n_tokens {s['n_tokens']} x "
                           f"{dt.itemsize} bytes); the file is truncated or corrupt")  # fmt: skip
            offsets.append(_load_offsets(root / s["docs_file"], s["n_docs"], s["n_tokens"]))
            maps.append(np.memmap(bin_path, dtype=dt, mode="r", shape=(s["n_tokens"],)))
        shards = cls(root, index, maps, offsets)
        if verify:
            shards._verify()
        return shards

    def _verify(self) -> None:
        for s, mm, offsets in zip(self.index["shards"], self._maps, self._offsets, strict=True):
            bin_path = self.path / s["file"]
            if (digest := artifact.sha256_file(bin_path)) != s["sha256"]:
                raise _err(bin_path, f"sha256 mismatch: index.json says {s['sha256']}, file has {digest}")
            firsts = mm[offsets[:-1]]
            if (bad := np.flatnonzero(firsts != self.bos_id)).size:
                o = int(offsets[bad[0]])
                raise _err(bin_path, f"document at offset {o} starts with {int(firsts[bad[0]])}, not bos_id")
            if (top := int(mm.max())) >= self.vocab_size:
                raise _err(bin_path, f"token id {top} is not below vocab_size {self.vocab_size}")

    vocab_size = property(lambda self: self.index["vocab_size"])
    tokenizer_sha256 = property(lambda self: self.index["tokenizer_sha256"])
    bos_id = property(lambda self: self.index["bos_id"])
    n_tokens = property(lambda self: self.index["n_tokens"])
    n_docs = property(lambda self: self.index["n_docs"])
    dtype = property(lambda self: self.index["dtype"], doc="'uint16' or 'uint32'")
    meta = property(lambda self: self.index["meta"])

    def __len__(self) -> int:
        return self.n_docs

    def doc_span(self, i: int) -> tuple[int, int, int]:
        """(shard, start, end) of global document `i`: its tokens are shard's [start, end)."""
        if not 0 <= i < self.n_docs:
            raise IndexError(f"document {i} out of range [0, {self.n_docs})")
        s = bisect_right(self._doc_base, i) - 1
        k = i - self._doc_base[s]
        return s, int(self._offsets[s][k]), int(self._offsets[s][k + 1])

    def tokens(self, shard: int, start: int, end: int) -> np.ndarray:
        """Tokens [start, end) of one shard: a read-only view into the memory map (no copy)."""
        return self._maps[shard][start:end]

    def doc(self, i: int) -> np.ndarray:
        """Document `i` (global index over all shards), BOS first: a read-only memory-mapped view."""
        return self.tokens(*self.doc_span(i))

    @property
    def docs(self) -> np.ndarray:
        """(n_docs, 3) int64 rows (shard, start, end), built on first use (24 bytes per document)."""
        if self._docs is None:
            offs = self._offsets
            parts = [np.stack([np.full(len(o) - 1, s), o[:-1], o[1:]], 1) for s, o in enumerate(offs)]
            self._docs = np.concatenate(parts).astype(np.int64)
        return self._docs

    def check_tokenizer(self, tok: Tokenizer) -> None:
        """ShardError unless `tok` is the tokenizer these shards were written with (by sha256)."""
        if tok.sha256 != self.tokenizer_sha256:
            raise _err(self.path / INDEX, f"tokenizer mismatch: shards were written with tokenizer sha256 "
                       f"{self.tokenizer_sha256}, the given tokenizer has sha256 {tok.sha256}")  # fmt: skip


# ---- tokenizing text files ------------------------------------------------------------------------


def _is_jsonl(path: Path) -> bool:
    """True when the first non-blank line parses as a JSON object (reads only up to that line)."""
    with open(path, "rb") as f:
        for raw in f:
            try:
                line = raw.decode("utf-8").removeprefix("\ufeff")
            except UnicodeDecodeError:
                return False
            if line.strip():
                try:
                    return isinstance(json.loads(line), dict)
                except (json.JSONDecodeError, RecursionError):  # too deep to be a document's record
                    return False
    return False


def _jsonl_texts(path: Path, text_field: str, digest: Any) -> Iterator[tuple[str, str]]:
    """(where, text) per non-blank line; ShardError naming file:line on the first malformed line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            digest.update(raw)
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _err(where, f"not valid UTF-8 at byte {e.start} of the line") from None
            line = line.removeprefix("\ufeff") if lineno == 1 else line
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise _err(where, f"invalid JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:  # e.g. 100k `[`: past the decoder's recursion limit, not a ValueError
                raise _err(where, "JSON nested too deeply to decode") from None
            if not isinstance(obj, dict):
                raise _err(where, f"expected a JSON object, got {type(obj).__name__}")
            if text_field not in obj:
                raise _err(where, f"no {text_field!r} key (keys: {sorted(obj)[:8]})")
            if not isinstance(obj[text_field], str):
                raise _err(where, f"{text_field!r} must be a string, got {type(obj[text_field]).__name__}")
            yield where, obj[text_field]


def _text_doc(path: Path, digest: Any) -> Iterator[tuple[str, str]]:
    data = path.read_bytes()
    digest.update(data)
    try:
        yield str(path), data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise _err(path, f"not valid UTF-8 at byte {e.start}") from None


def tokenize_to_shards(inputs: Sequence[str | Path], tokenizer: Tokenizer, out_dir: str | Path, *,
                       text_field: str = "text", shard_tokens: int = 1 << 26,
                       overwrite: bool = False) -> Path:  # fmt: skip
    """Tokenize text files into a shard directory; returns out_dir.

    Each input is told apart by content, not name: a file whose first non-blank line parses as a JSON
    object is JSONL (one document per non-blank line, text under `text_field`); any other file is one
    plain-text document. A UTF-8 BOM is ignored. Each document is `tokenizer.encode(text, bos=True,
    eos=True)`; empty texts ("") are skipped. The first malformed JSONL line (bad JSON, not an object,
    missing or non-string field, bad UTF-8) raises ShardError naming file:line and nothing is written.
    A file named `.jsonl`/`.ndjson` is always read as JSONL, so a malformed first line is reported as
    such instead of being taken for plain text. No documents at all -> ShardError.
    """
    paths = [Path(inputs)] if isinstance(inputs, str | Path) else [Path(p) for p in inputs]
    if not paths:
        raise ShardError("inputs: no input files given")
    for p in paths:
        if not p.is_file():
            raise _err(p, "not a file (inputs are .txt or JSONL files)")
    sources: list[dict[str, Any]] = []  # filled per file below; the writer's meta holds this same list
    meta = {"created_by": "gemmakit.data.tokenize_to_shards", "gemmakit_version": artifact.version(),
            "text_field": text_field, "sources": sources}  # fmt: skip
    with ShardWriter(out_dir, vocab_size=tokenizer.vocab_size, tokenizer_sha256=tokenizer.sha256,
                     bos_id=tokenizer.bos_id, shard_tokens=shard_tokens, meta=meta,
                     overwrite=overwrite) as w:  # fmt: skip
        for p in paths:
            # A .jsonl name is never a reason to read a file as text: its content must then be JSONL.
            jsonl = _is_jsonl(p) or p.suffix.lower() in (".jsonl", ".ndjson")
            digest, n_docs, n_empty = hashlib.sha256(), 0, 0
            for where, text in _jsonl_texts(p, text_field, digest) if jsonl else _text_doc(p, digest):
                if not text:
                    n_empty += 1
                    continue
                try:
                    w.add(tokenizer.encode(text, bos=True, eos=True))
                except TokenizerError as e:
                    raise _err(where, e) from None
                n_docs += 1
            sources.append({"path": str(p), "format": "jsonl" if jsonl else "text",
                            "sha256": digest.hexdigest(), "n_docs": n_docs, "n_empty": n_empty})  # fmt: skip
        if w.n_docs == 0:
            raise ShardError(f"inputs: no documents in {len(paths)} file(s) (all empty or blank)")
    return Path(out_dir)
