"""Document deduplication: exact (normalised-text hash) and near-duplicate (MinHash + LSH), keep-first.

Where it sits: sources -> filters -> **dedup** -> decontamination -> outputs (`data.pipeline`). Dedup is
global, so it comes in two pure halves: `signatures(texts, cfg)` runs per shard in parallel workers, and
`find_duplicates(sigs, cfg)` runs once over every shard's signatures and says which documents to drop
(a duplicate of an EARLIER document in global order: shard 0 in order, then shard 1, ...).

Everything is bit-for-bit deterministic across processes, runs and machines: words are hashed with
numpy uint64 arithmetic (never Python's per-process salted `hash()`), and the permutation constants
come from a splitmix64 stream of the seed computed in Python integers (numpy's Generator streams may
change between numpy versions).

How a signature is made, vectorised over a batch of documents (~1 MiB of text at a time):
1. `normalize`: NFKC, lowercase, apostrophes deleted, every other non-letter/digit becomes a separator;
   ASCII documents (the common case) take a `bytes.translate` fast path with the same result.
2. each word's hash is computed from the bytes in numpy: sum(byte_j * P^j) over the word, times
   P^-start so it does not depend on where the word sits (mod 2^64), then a splitmix64 mix. No Python
   object per word: 27 us per 300-word document against 44 us for a dict-cached blake2b per word.
3. each window of `ngram` consecutive word hashes is combined with fixed odd multipliers and mixed
   (a shingle); a document shorter than `ngram` words is one shingle;
4. shingle keys x (32 bits) go through `num_perm` hash functions h(x) = ((a*x + b) mod 2^64) >> 32 with
   random 64-bit a, b: Dietzfelbinger's multiply-add-shift, strongly universal for 32-bit keys and
   free of the `% prime` that dominates datatrove's (a*x + b) % (2^61 - 1); the minimum per document
   is the signature (uint32). The shift is taken after the minimum (it is monotone).

Key trade-off: near-duplicate clusters are connected components of verified pairs (see
`find_duplicates`), so a chain A~B~C can drop C although sim(A, C) < threshold. Every link is verified
against the threshold, and Jaccard distance is a metric, so k links keep the chain's ends at
J >= 1 - k * (1 - threshold) (0.6 for two links at 0.8), up to the estimate's noise (std 0.038 at 0.8).
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gemmakit.errors import UserError

log = logging.getLogger(__name__)

METHODS = ("exact", "minhash")
_MASK = (1 << 64) - 1
_U64 = np.uint64
_BATCH_BYTES = 1 << 20  # text per vectorised batch (or one longer document): peak ~15 B per byte of text
_BATCH_DOCS = 8192  # documents per batch at most: its (8192, 112) uint64 minima are 7 MiB
_PIECE = 1 << 18  # bytes hashed at once (a 50 MB document is cut at separators into pieces)
_PAIR_CHUNK = 1 << 15  # candidate pairs verified at once: 2 x 32768 x 112 x 4 B = 28 MiB
_CANDIDATE_P = 0.95  # with bands=0, a pair at exactly `threshold` becomes a candidate with p >= this
_APOSTROPHES = re.compile("['\u2019\u02bc]")  # "don't" == "dont" == "don’t"
_NON_WORD = re.compile(r"[\W_]+")  # Python's \w minus "_": Unicode letters and digits (str.isalnum)
_ASCII = bytes(ord(chr(c).lower()) if c < 128 and chr(c).isalnum() else 0 for c in range(256))  # sep: 0


class DedupError(UserError):
    """A dedup setting or input is invalid; the message names the field or shard and what was expected."""


@dataclass(frozen=True)
class DedupConfig:
    """How documents are compared; defaults follow datatrove's MinHash dedup (5-gram word shingles)."""

    method: str = "minhash"  # "exact": hash of normalize(text); "minhash": near-duplicates (includes exact)
    threshold: float = 0.8  # Jaccard similarity of the 5-gram shingle sets at which two docs are duplicates
    ngram: int = 5  # words per shingle (datatrove's default); shorter docs are one shingle
    # 112 hash functions: the Jaccard estimate's std at 0.8 is sqrt(0.8*0.2/112) = 0.038, and 112 =
    # 16x7 = 14x8 splits into bands evenly; 448 bytes per document (1M docs: 448 MB as uint32).
    num_perm: int = 112
    # LSH bands (rows = num_perm // bands); 0 derives the most rows per band for which a pair at exactly
    # `threshold` is still a candidate with p >= 0.95 (0.8 -> 16 bands x 7 rows: 0.977; datatrove's
    # 14x8 gives 0.924). Candidates are then verified, so extra candidates cost time, not precision.
    bands: int = 0
    seed: int = 1  # seeds the hash functions (a, b); signatures are comparable only with equal seeds

    def __post_init__(self) -> None:
        _check(
            self.method in METHODS, f"dedup.method: expected one of {', '.join(METHODS)}, got {self.method!r}"
        )
        _check(_is_num(self.threshold) and 0.0 < self.threshold <= 1.0,
               f"dedup.threshold: expected a number in (0, 1], got {self.threshold!r}")  # fmt: skip
        for name, lo, hi in (("ngram", 1, 1000), ("num_perm", 1, 4096), ("seed", 0, _MASK)):
            value = getattr(self, name)
            ok = _is_int(value) and lo <= value <= hi
            _check(ok, f"dedup.{name}: expected an integer in [{lo}, {hi}], got {value!r}")
        _check(_is_int(self.bands) and 0 <= self.bands <= self.num_perm,
               f"dedup.bands: expected an integer in [0, num_perm={self.num_perm}], got {self.bands!r}")  # fmt: skip

    def band_rows(self) -> tuple[int, int]:
        """(bands, rows per band) of the LSH index; bands * rows <= num_perm (the rest are verification only)."""
        if self.bands:
            return self.bands, self.num_perm // self.bands
        for rows in range(self.num_perm, 0, -1):
            bands = self.num_perm // rows
            if 1.0 - (1.0 - self.threshold**rows) ** bands >= _CANDIDATE_P:
                return bands, rows
        return self.num_perm, 1


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise DedupError(message)


def _is_int(v: object) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return isinstance(v, float | int | np.floating | np.integer) and not isinstance(v, bool)


# Text -> words -> word hashes -> n-gram hashes (shared with data.decontam)


def _clean(text: str) -> bytes:
    """UTF-8 bytes of the normalised text in which every separator is a zero byte (runs not collapsed);
    zero, so that separators add nothing to the byte sums of `_hash_piece`."""
    if text.isascii():  # 1 us vs 70 us for 300 words by regex; the same words (NFKC, \w agree on ASCII)
        return text.encode("ascii").translate(_ASCII, b"'")
    text = _APOSTROPHES.sub("", unicodedata.normalize("NFKC", text).lower())
    return _NON_WORD.sub("\0", text).encode("utf-8")


def normalize(text: str) -> str:
    """Lowercase NFKC text whose words are the maximal runs of Unicode letters and digits, joined by
    single spaces: punctuation, symbols, "_", whitespace and control characters separate words, and
    apostrophes are deleted ("Don't stop!" -> "dont stop"). Combining marks left after NFKC separate
    words too; index and documents agree, which is all dedup and decontamination need."""
    return " ".join(_clean(text).replace(b"\0", b" ").decode("utf-8").split())


def _splitmix(state: int, count: int) -> list[int]:
    """`count` splitmix64 outputs from `state`, in Python integers (identical on every platform)."""
    out = []
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & _MASK
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        out.append(z ^ (z >> 31))
    return out


_P = _splitmix(1, 1)[0] | 1  # byte-polynomial base; odd, so invertible mod 2^64
_P_INV = pow(_P, -1, 1 << 64)
_GRAM_MUL = np.array([c | 1 for c in _splitmix(2, 4096)], dtype=_U64)  # per-position word multipliers
_LEN_MUL = _U64(_splitmix(3, 1)[0])  # times the length: a key depends on how many words/bytes it covers


def _len_term(n: int) -> np.uint64:
    return _U64(n * int(_LEN_MUL) & _MASK)  # in Python ints: numpy warns on uint64 scalar overflow


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (wrapping): every input bit reaches every output bit."""
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


def _power_table(base: int, length: int) -> np.ndarray:
    powers = np.full(length, base, dtype=_U64)
    powers[0] = 1
    return np.cumprod(powers)  # base^j mod 2^64 (uint64 products wrap, as intended)


_POWERS: list[np.ndarray] = []  # [P^j, P^-j] for j < _PIECE, built on first use (2 x 2 MiB)


def _powers(length: int) -> tuple[np.ndarray, np.ndarray]:
    if length > _PIECE:  # a single word longer than a piece: a one-off table
        return _power_table(_P, length), _power_table(_P_INV, length)
    if not _POWERS:
        _POWERS.extend([_power_table(_P, _PIECE), _power_table(_P_INV, _PIECE)])
    return _POWERS[0], _POWERS[1]


def _hash_piece(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(word start offsets, word hashes) of one `_clean` byte piece that begins and ends with a separator."""
    word = arr != 0
    edges = np.flatnonzero(word[1:] != word[:-1]) + 1  # alternating word starts and ends
    starts, ends = edges[0::2], edges[1::2]
    if not len(starts):
        return starts, np.zeros(0, _U64)
    powers, inverse = _powers(len(arr))
    terms = np.multiply(arr, powers[: len(arr)], dtype=_U64)  # byte_j P^j; separators are 0
    poly = (
        np.add.reduceat(terms, starts) * inverse[starts]
    )  # sum over the word, times P^-start: position-free
    return starts, _mix(poly + (ends - starts).astype(_U64) * _LEN_MUL)


def _hash_words(buf: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(word start offsets in `buf`, uint64 word hashes); `buf` begins and ends with a zero byte. Pieces
    of <= 256 KiB cut at a separator bound memory; word hashes do not depend on where a word sits."""
    starts, hashes, pos = [], [], 0
    while pos < len(buf) - 1:
        cut = buf.rfind(b"\0", pos + 1, pos + _PIECE) if len(buf) - pos > _PIECE else len(buf) - 1
        if cut <= pos:  # one word longer than a piece: run to its end
            cut = buf.find(b"\0", pos + _PIECE)
        s, h = _hash_piece(np.frombuffer(buf, dtype=np.uint8, count=cut + 1 - pos, offset=pos))
        starts.append(s + pos)
        hashes.append(h)
        pos = cut
    if not starts:
        return np.zeros(0, np.int64), np.zeros(0, _U64)
    return np.concatenate(starts), np.concatenate(hashes)


def word_hashes(text: str) -> np.ndarray:
    """(words,) uint64 hashes of the words of `normalize(text)`, deterministic across processes."""
    return _hash_words(b"\0" + _clean(text) + b"\0")[1]


def _combine(hashes: np.ndarray, n: int) -> np.ndarray:
    """Unmixed key of every window of n consecutive word hashes: sum_k h[i+k] * M_k (mod 2^64)."""
    acc = hashes[: len(hashes) - n + 1] * _GRAM_MUL[0]
    for k in range(1, n):
        acc += hashes[k : len(hashes) - n + 1 + k] * _GRAM_MUL[k]
    return acc


def ngram_hashes(hashes: np.ndarray, n: int) -> np.ndarray:
    """(len - n + 1,) uint64 keys of the word n-grams of one text's `word_hashes` (empty if shorter).
    n = len(hashes) gives the key of the whole text; n is part of the key."""
    if n > len(hashes) or n > len(_GRAM_MUL):
        return np.zeros(0, _U64)
    if n == 0:
        return np.zeros(1, _U64)
    return _mix(_combine(hashes, n) + _len_term(n))


def ngram_hashes_many(hashes: np.ndarray, lengths: Sequence[int]) -> np.ndarray:
    """`ngram_hashes(hashes, n)` for every n >= 1 in `lengths`, concatenated in increasing n, in one
    incremental pass (the window sums of n + 1 words extend those of n words by one term)."""
    wanted, out = set(lengths), []
    acc = hashes * _GRAM_MUL[0]
    for n in range(1, min(max(wanted, default=0), len(hashes), len(_GRAM_MUL)) + 1):
        if n > 1:
            acc = acc[:-1] + hashes[n - 1 :] * _GRAM_MUL[n - 1]
        if n in wanted:
            out.append(_mix(acc + _len_term(n)))
    return np.concatenate(out) if out else np.zeros(0, _U64)


# Signatures (per shard, parallel)


def _shingles(hashes: np.ndarray, bounds: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(32-bit shingle keys as uint64, start of each document's run): every document has >= 1 shingle;
    a document of fewer than n words is one shingle, the key `ngram_hashes(its hashes, len)` gives."""
    counts = np.diff(bounds)  # words per document
    per_doc = np.maximum(counts - n + 1, 1)
    runs = np.concatenate([[0], np.cumsum(per_doc)[:-1]]).astype(np.int64)
    keys = np.empty(int(per_doc.sum()), _U64)
    if len(hashes) >= n:
        owner = np.repeat(np.arange(len(counts)), counts)  # document of each word
        full = np.flatnonzero(owner[: len(owner) - n + 1] == owner[n - 1 :])  # windows inside one doc
        doc = owner[full]
        keys[runs[doc] + full - bounds[doc]] = _mix(_combine(hashes, n)[full] + _len_term(n))
    short = np.flatnonzero(counts < n)
    whole = np.zeros(len(short), _U64)
    for k in range(n - 1):
        has = counts[short] > k
        whole[has] += hashes[bounds[short[has]] + k] * _GRAM_MUL[k]
    length = counts[short].astype(_U64)
    keys[runs[short]] = np.where(length > 0, _mix(whole + length * _LEN_MUL), _U64(0))
    return keys >> _U64(32), runs


def _permutations(cfg: DedupConfig) -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) of the num_perm multiply-add-shift hash functions; a odd, both 64-bit."""
    vals = _splitmix(cfg.seed ^ 0x5EED_0F_DEDB, 2 * cfg.num_perm)
    return np.array([v | 1 for v in vals[0::2]], dtype=_U64), np.array(vals[1::2], dtype=_U64)


def _minhash_batch(texts: Sequence[str], cfg: DedupConfig, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    cleaned = [_clean(t) for t in texts]
    buf = b"\0" + b"\0".join(cleaned) + b"\0"
    doc_starts = np.cumsum([1] + [len(c) + 1 for c in cleaned])  # byte offset of each document (+ end)
    word_starts, hashes = _hash_words(buf)
    keys, runs = _shingles(hashes, np.searchsorted(word_starts, doc_starts), cfg.ngram)
    out = np.empty((len(texts), cfg.num_perm), dtype=_U64)
    tmp = np.empty(len(keys), dtype=_U64)
    for j in range(cfg.num_perm):  # a loop of num_perm vector passes beats a (shingles, num_perm) block
        np.multiply(keys, a[j], out=tmp)
        tmp += b[j]
        out[:, j] = np.minimum.reduceat(tmp, runs)
    return (out >> _U64(32)).astype(np.uint32)


def exact_hash(text: str) -> int:
    """64-bit blake2b of normalize(text) (little-endian), the key of the exact method."""
    return int.from_bytes(hashlib.blake2b(normalize(text).encode("utf-8"), digest_size=8).digest(), "little")


def signatures(texts: Sequence[str], cfg: DedupConfig) -> np.ndarray:
    """(n, num_perm) uint32 MinHash signatures of `texts`, or (n, 1) uint64 `exact_hash`es for method
    "exact". Empty and punctuation-only texts are allowed (they are all one shingle, duplicates of each
    other). ~300-word documents: ~14k docs/s on one core (tests/test_data_dedup.py prints it)."""
    if cfg.method == "exact":
        return np.fromiter((exact_hash(t) for t in texts), dtype=_U64, count=len(texts)).reshape(-1, 1)
    a, b = _permutations(cfg)
    out, start, size = np.empty((len(texts), cfg.num_perm), np.uint32), 0, 0
    for i, text in enumerate(texts):
        size += len(text)
        if size >= _BATCH_BYTES or i + 1 - start == _BATCH_DOCS or i == len(texts) - 1:
            out[start : i + 1] = _minhash_batch(texts[start : i + 1], cfg, a, b)
            start, size = i + 1, 0
    return out


# Clustering (global, one process)


def _stack(sigs: Sequence[np.ndarray], cfg: DedupConfig) -> tuple[np.ndarray, np.ndarray]:
    """All shards' signatures in global order, and each shard's first global index (+ the total)."""
    width, dtype = (1, _U64) if cfg.method == "exact" else (cfg.num_perm, np.uint32)
    for s, sig in enumerate(sigs):
        if not isinstance(sig, np.ndarray) or sig.ndim != 2 or sig.shape[1] != width or sig.dtype != dtype:
            got = f"{sig.dtype} {sig.shape}" if isinstance(sig, np.ndarray) else type(sig).__name__
            raise DedupError(f"find_duplicates: shard {s} signatures are {got}; method {cfg.method!r} "
                             f"with num_perm={cfg.num_perm} expects {np.dtype(dtype)} (n, {width})")  # fmt: skip
    offsets = np.cumsum([0] + [len(s) for s in sigs])
    return (np.concatenate(sigs) if sigs else np.zeros((0, width), dtype)), offsets


def _bucket_pairs(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(u, v), u < v: every document paired with the first and the previous member of its bucket."""
    order = np.argsort(keys, kind="stable")  # stable: members of a bucket stay in global order
    ks = keys[order]
    new = np.ones(len(ks), bool)
    new[1:] = ks[1:] != ks[:-1]
    first = np.maximum.accumulate(np.where(new, np.arange(len(ks)), 0))
    later = np.flatnonzero(~new)
    prev = later[first[later] != later - 1]  # the predecessor, when it is not the first itself
    return np.concatenate([order[first[later]], order[prev - 1]]), np.concatenate([order[later], order[prev]])


def _candidates(sig: np.ndarray, cfg: DedupConfig) -> tuple[np.ndarray, np.ndarray]:
    """Unique candidate pairs (u < v) sharing at least one LSH band, vectorised: per band, sort and group."""
    bands, rows = cfg.band_rows()
    us, vs = [], []
    for k in range(bands):
        band = sig[:, k * rows : (k + 1) * rows].astype(_U64)
        u, v = _bucket_pairs(_mix((band * _GRAM_MUL[:rows]).sum(axis=1, dtype=_U64)))
        us.append(u)
        vs.append(v)
    code = np.unique(np.concatenate(us).astype(np.int64) * len(sig) + np.concatenate(vs))
    return code // len(sig), code % len(sig)


def _verified(sig: np.ndarray, u: np.ndarray, v: np.ndarray, cfg: DedupConfig) -> np.ndarray:
    """Mask of the pairs whose estimated Jaccard (share of equal signature entries) >= threshold."""
    need = math.ceil(cfg.threshold * cfg.num_perm - 1e-9)  # integer count: no float ties across machines
    ok = np.zeros(len(u), bool)
    for i in range(0, len(u), _PAIR_CHUNK):
        j = slice(i, i + _PAIR_CHUNK)
        ok[j] = (sig[u[j]] == sig[v[j]]).sum(axis=1) >= need
    return ok


def _components(n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Label of each node = the smallest index in its connected component (vectorised union-find:
    hook the larger root under the smaller, then jump pointers until every tree is a star)."""
    labels = np.arange(n)
    while True:
        lu, lv = labels[u], labels[v]
        if np.array_equal(lu, lv):
            return labels
        np.minimum.at(labels, np.maximum(lu, lv), np.minimum(lu, lv))
        while not np.array_equal(jumped := labels[labels], labels):
            labels = jumped


def _exact_labels(keys: np.ndarray) -> np.ndarray:
    order = np.argsort(keys, kind="stable")
    ks = keys[order]
    new = np.ones(len(ks), bool)
    new[1:] = ks[1:] != ks[:-1]
    labels = np.empty(len(ks), np.int64)
    labels[order] = order[np.maximum.accumulate(np.where(new, np.arange(len(ks)), 0))]
    return labels


def find_duplicates(sigs: Sequence[np.ndarray], cfg: DedupConfig) -> tuple[list[np.ndarray], list[list[tuple[int, int]]]]:  # fmt: skip
    """Which documents to drop, over all shards' `signatures` (shard s: sigs[s], possibly (0, P)).

    Returns (dropped, clusters): dropped[s] is a bool array over shard s, True where the document
    duplicates an EARLIER one in global order (keep-first); clusters lists every cluster of >= 2
    documents as [(shard, index), ...] in global order, the kept document first, clusters ordered by it.

    exact: equal hashes. minhash: LSH banding proposes pairs (each document with the first and the
    previous member of each band bucket, not all pairs: a 10k-copy cluster costs 20k pairs, not 50M);
    every pair is verified (estimated Jaccard >= threshold); clusters are the connected components of
    verified pairs. Transitivity can chain: A~B and B~C drop C even if sim(A, C) < threshold. We accept
    it (as datatrove's union-find does) because a pairwise rule would make the kept set depend on the
    order pairs are seen, and successive edits of one page are exactly such chains; each link is verified,
    so chained docs stay close (the planted test measures false merges below threshold - 0.1).
    Runtime O(n log n) per band, numpy throughout; memory ~ the signatures plus one band's keys.
    """
    sig, offsets = _stack(sigs, cfg)
    n = len(sig)
    if cfg.method == "exact":
        labels = _exact_labels(sig[:, 0])
    else:
        u, v = _candidates(sig, cfg) if n else (np.zeros(0, np.int64), np.zeros(0, np.int64))
        ok = _verified(sig, u, v, cfg)
        log.info("dedup: %d docs, %d candidate pairs, %d verified", n, len(u), int(ok.sum()))
        labels = _components(n, u[ok], v[ok])
    dropped = labels != np.arange(n)
    members = np.flatnonzero(np.isin(labels, labels[dropped]))  # ascending global order
    members = members[np.argsort(labels[members], kind="stable")]
    shard = np.searchsorted(offsets, members, side="right") - 1
    pairs = list(zip(shard.tolist(), (members - offsets[shard]).tolist(), strict=True))
    cuts = np.flatnonzero(np.diff(labels[members])) + 1
    clusters = [pairs[i:j] for i, j in zip([0, *cuts.tolist()], [*cuts.tolist(), len(pairs)], strict=True)]
    return [dropped[offsets[s] : offsets[s + 1]] for s in range(len(sigs))], [c for c in clusters if c]
