"""Evaluation-set decontamination: drop (or flag) training documents that share a word n-gram with an
evaluation set, as GPT-3 (Brown et al. 2020, appendix C) and the Gemma reports do, with n = 13.

Where it sits: sources -> filters -> dedup -> **decontamination** -> outputs (`data.pipeline`). A
`decontam_filter` is a pure `Doc -> (Doc | None, reason)` like every other filter; the reason names
the eval set ("decontam_mmlu"), so the run's stats count hits per eval set.

Texts are compared as `dedup.normalize` words (NFKC, lowercase, punctuation and symbols as
separators, apostrophes deleted), hashed by the same `dedup.word_hashes` / `dedup.ngram_hashes`,
so "The Cat, sat..." in a document matches "the cat sat" in a question. The index is one sorted
uint64 array of n-gram keys (8 bytes each: MMLU's ~14k questions ~ 1M keys ~ 16 MB with set ids);
a document costs one vectorised hash pass and a binary search per n-gram. Keys are 64-bit hashes,
not the words: the chance that a 1,000-word document falsely hits a 10M-key index is ~1e-9.

Key trade-off: evaluation texts shorter than n words (short questions, answer choices) either cannot
be found or must be matched whole. We index a text of `min_words`..n-1 words as one whole n-gram (the
document must contain all its words in order), and skip shorter ones: 8 consecutive words in a fixed
order rarely occur by chance in unrelated text, while 3-word choices ("the united states") would
hit a large share of any web corpus. GPT-3 used n between 8 and 13 depending on the dataset
(lm-evaluation-harness, docs/decontamination.md) and NeMo Curator's tasks default to
min_ngram_size=8, max_ngram_size=13: our defaults min_words=8, n=13.
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gemmakit.data.dedup import ngram_hashes, ngram_hashes_many, word_hashes
from gemmakit.data.sources import Doc
from gemmakit.errors import UserError

log = logging.getLogger(__name__)

ACTIONS = ("drop", "flag")
_GLOB = re.compile(r"[*?\[]")
_NAME = re.compile(r"[^A-Za-z0-9_]")
_BLANK = object()  # what _parse returns for a blank line


class DecontamError(UserError):
    """A decontamination setting or eval file is invalid; the message names the field or file:line."""


@dataclass(frozen=True)
class DecontamConfig:
    """Which eval sets to protect and how; defaults follow GPT-3's 13-gram rule."""

    evals: tuple[str, ...] = ()  # JSONL files or glob patterns (plain or gzip); a set's name is the file stem
    fields: tuple[str, ...] = ()  # string fields indexed (and lists of them); () = every string of a record
    n: int = 13  # n-gram length in normalised words (GPT-3, the Gemma reports)
    action: str = "drop"  # "drop", or "flag": keep with meta["contamination"] = [eval set names]
    min_words: int = 8  # eval texts of min_words..n-1 words are matched whole; shorter ones are skipped

    def __post_init__(self) -> None:
        for name in ("evals", "fields"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(isinstance(v, str) and v for v in value):
                raise DecontamError(f"decontam.{name}: expected a tuple of non-empty strings, got {value!r}")
        if not _is_int(self.n) or not 1 <= self.n <= 1000:
            raise DecontamError(f"decontam.n: expected an integer in [1, 1000], got {self.n!r}")
        if self.action not in ACTIONS:
            raise DecontamError(f"decontam.action: expected one of {', '.join(ACTIONS)}, got {self.action!r}")
        if not _is_int(self.min_words) or not 1 <= self.min_words <= self.n:
            raise DecontamError(
                f"decontam.min_words: expected an integer in [1, n={self.n}], got {self.min_words!r}"
            )


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class EvalIndex:
    """The n-gram keys of every eval set; `hits(text)` names the sets a text shares an n-gram with."""

    def __init__(self, names: tuple[str, ...], keys: np.ndarray, sets: np.ndarray,
                 lengths: tuple[int, ...]) -> None:  # fmt: skip
        self.names = names  # eval set names, sorted
        self._keys = keys  # (K,) uint64, sorted; a key in several sets appears once per set
        self._sets = sets  # (K,) index into names of each key
        self._lengths = lengths  # n-gram lengths present: n, and the lengths of short texts indexed whole
        # A presence table on the keys' top bits, >= 8 slots per key: a document's n-grams that miss it
        # (>= 7/8 of clean ones) skip the binary search, whose cache misses cost ~125 ns per query at
        # 700k keys. 1 byte per slot: as large as the keys themselves.
        bits = max(16, int(8 * len(keys)).bit_length())
        self._shift = np.uint64(64 - bits)
        self._present = np.zeros(1 << bits, bool)
        self._present[keys >> self._shift] = True

    def __len__(self) -> int:
        return len(self._keys)

    def hits(self, text: str) -> list[str]:
        """Sorted names of the eval sets sharing at least one indexed n-gram with `text`."""
        grams = ngram_hashes_many(word_hashes(text), self._lengths)
        grams = np.sort(grams[self._present[grams >> self._shift]])
        if not len(grams):
            return []
        lo = np.searchsorted(self._keys, grams)
        hit = self._keys[np.minimum(lo, len(self._keys) - 1)] == grams
        if not hit.any():
            return []
        found: set[int] = set()
        hi = np.searchsorted(self._keys, grams[hit], side="right")
        for a, b in zip(lo[hit].tolist(), hi.tolist(), strict=True):  # rare: contaminated n-grams only
            found.update(self._sets[a:b].tolist())
        return sorted(self.names[i] for i in found)


def _paths(cfg: DecontamConfig, source: str) -> list[Path]:
    paths: list[Path] = []
    for entry in cfg.evals:
        if _GLOB.search(entry):
            matched = sorted(m for m in glob.glob(entry, recursive=True) if Path(m).is_file())
            if not matched:
                raise DecontamError(f"{source}: decontam.evals: pattern {entry!r} matched no files")
            paths.extend(Path(m) for m in matched)
        elif not Path(entry).is_file():
            raise DecontamError(f"{source}: decontam.evals: {entry}: no such file")
        else:
            paths.append(Path(entry))
    return list(dict.fromkeys(paths))  # a file named twice (a path and a glob) counts once


def _set_names(paths: list[Path], source: str) -> dict[Path, str]:
    """Reason-code-safe name of each file (its stem, letters, digits and "_"); two files with one name
    are refused, since their hits could not be told apart in the stats."""
    names: dict[str, Path] = {}
    for path in paths:
        stem = path.name.removesuffix(".gz").removesuffix(".jsonl").removesuffix(".json")
        name = _NAME.sub("_", stem) or "eval"  # "mmlu.test.jsonl.gz" -> "mmlu_test"
        if name in names:
            raise DecontamError(f"{source}: decontam.evals: {names[name]} and {path} both give the eval set "
                                f"name {name!r}; rename one (the name is the file stem)")  # fmt: skip
        names[name] = path
    return {path: name for name, path in names.items()}


def _records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, JSON value) of each non-blank line; unreadable files, bad UTF-8 or JSON raise
    `DecontamError` naming file:line."""
    n = 0
    try:
        with open(path, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"  # gzip by magic bytes, not by name
        with gzip.open(path, "rb") if gz else open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                yield n, _parse(path, n, raw)
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DecontamError(f"{path}:{n + 1}: cannot read ({e})") from None


def _parse(path: Path, n: int, raw: bytes) -> Any:
    try:
        line = raw.decode("utf-8").lstrip("\ufeff") if n == 1 else raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DecontamError(f"{path}:{n}: invalid UTF-8 at byte {e.start}") from None
    if not line.strip():
        return _BLANK
    try:
        return json.loads(line)
    except ValueError as e:
        raise DecontamError(f"{path}:{n}: invalid JSON ({e})") from None


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)


def _set_keys(path: Path, cfg: DecontamConfig) -> tuple[np.ndarray, set[int], dict[str, int]]:
    """(unique n-gram keys, whole-text lengths used, counts) of one eval file."""
    keys, lengths = [], set()
    counts = {"records": 0, "texts": 0, "short_skipped": 0}
    for n, record in _records(path):
        if record is _BLANK:
            continue
        if not isinstance(record, dict):
            raise DecontamError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
        values = [record[f] for f in cfg.fields if f in record] if cfg.fields else list(record.values())
        texts = list(_strings(values))
        if cfg.fields and not texts:
            raise DecontamError(f"{path}:{n}: none of the fields {', '.join(cfg.fields)} holds a string")
        counts["records"] += 1
        for text in texts:
            words = word_hashes(text)
            if len(words) >= cfg.n:
                keys.append(ngram_hashes(words, cfg.n))
            elif len(words) >= cfg.min_words:
                keys.append(ngram_hashes(words, len(words)))
                lengths.add(len(words))
            else:
                counts["short_skipped"] += 1
                continue
            counts["texts"] += 1
    return np.unique(np.concatenate(keys)) if keys else np.zeros(0, np.uint64), lengths, counts


def build_index(cfg: DecontamConfig, source: str = "<recipe>") -> EvalIndex:
    """The n-gram index of the eval sets `cfg.evals`; missing files, unmatched globs, bad JSON or
    non-object lines raise `DecontamError` naming the file (and line)."""
    if not cfg.evals:
        raise DecontamError(f"{source}: decontam.evals is empty; list the eval sets' JSONL files")
    names = _set_names(_paths(cfg, source), source)
    ordered = sorted(names.items(), key=lambda item: item[1])
    keys, sets, lengths = [], [], {cfg.n}
    for i, (path, name) in enumerate(ordered):
        k, used, counts = _set_keys(path, cfg)
        log.info("decontam: %s (%s): %s, %d n-grams", name, path, counts, len(k))
        keys.append(k)
        sets.append(np.full(len(k), i, np.int32))
        lengths |= used
    all_keys = np.concatenate(keys)
    order = np.argsort(all_keys, kind="stable")
    return EvalIndex(tuple(n for _, n in ordered), all_keys[order], np.concatenate(sets)[order],
                     tuple(sorted(lengths)))  # fmt: skip


def decontam_filter(cfg: DecontamConfig, source: str = "<recipe>") -> Callable[[Doc], tuple[Doc | None, str]]:
    """A pipeline filter over `build_index(cfg)`: a clean doc -> (doc, ""); a contaminated one ->
    (None, "decontam_<set>") with action "drop", or (a copy with meta["contamination"] = [sets],
    "decontam_flag_<set>") with "flag"; <set> is the first hit in sorted order (one count per doc)."""
    index = build_index(cfg, source)

    def apply(doc: Doc) -> tuple[Doc | None, str]:
        names = index.hits(doc.text)
        if not names:
            return doc, ""
        if cfg.action == "drop":
            return None, f"decontam_{names[0]}"
        return Doc(doc.id, doc.text, {**doc.meta, "contamination": names}), f"decontam_flag_{names[0]}"

    return apply
