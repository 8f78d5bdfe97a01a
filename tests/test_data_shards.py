"""Token shards (gemmakit.data.shards) and the packing loader (gemmakit.data.loader).

References are independent of the code under test: the documents we wrote (read back with plain
numpy from the raw files), `Tokenizer.encode` for tokenized text, and, for the loader, documents whose
tokens name their document (doc i = [BOS, M + i, M + i, ...]) so rows can be decoded by hand.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from gemmakit.data import LoaderError, PackedLoader, ShardError, Shards, ShardWriter, tokenize_to_shards

BOS = 2
SHA = "ab" * 32


def _docs(n: int, vocab: int, seed: int = 0, max_len: int = 30) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        d = rng.integers(0, vocab, int(rng.integers(1, max_len + 1)))
        d[0] = BOS
        docs.append(d)
    return docs


def _write(out, docs, vocab: int = 640, **kw):
    with ShardWriter(out, vocab_size=vocab, tokenizer_sha256=SHA, bos_id=BOS, **kw) as w:
        for d in docs:
            w.add(d)
    return out


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


# ---- format round trip ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("vocab", "dtype"), [(640, "uint16"), (65536, "uint16"), (65537, "uint32"), (70000, "uint32")]
)
def test_round_trip(tmp_path, vocab, dtype) -> None:
    docs = _docs(60, vocab)
    docs[3], docs[5] = np.append(docs[3], vocab - 1), np.append(docs[5], 0)  # the extreme ids survive
    out = _write(tmp_path / "ds", docs, vocab, shard_tokens=200, meta={"sources": ["x"]})
    index = json.loads((out / "index.json").read_text())
    assert index["format"] == "gemmakit-shards" and index["version"] == 1 and index["dtype"] == dtype
    assert (index["vocab_size"], index["tokenizer_sha256"], index["bos_id"]) == (vocab, SHA, BOS)
    assert index["n_docs"] == 60 and index["n_tokens"] == sum(map(len, docs))
    assert index["meta"] == {"sources": ["x"]} and len(index["shards"]) > 1
    # Raw files read with plain numpy, independent of the reader.
    read = []
    for s in index["shards"]:
        raw = np.fromfile(out / s["file"], dtype="<u2" if dtype == "uint16" else "<u4")
        assert len(raw) == s["n_tokens"] and hashlib.sha256(raw.tobytes()).hexdigest() == s["sha256"]
        assert s["n_tokens"] <= 200 or s["n_docs"] == 1  # the target size is respected
        starts = np.load(out / s["docs_file"], allow_pickle=False)
        assert starts.dtype == np.int64 and len(starts) == s["n_docs"]
        read += np.split(raw, starts[1:])
    assert [r.tolist() for r in read] == [d.tolist() for d in docs]
    shards = Shards.open(out, verify=True)
    assert (shards.n_docs, shards.n_tokens, shards.dtype, shards.vocab_size) == (
        60,
        index["n_tokens"],
        dtype,
        vocab,
    )
    assert all(shards.doc(i).tolist() == d.tolist() for i, d in enumerate(docs))
    assert shards.docs.shape == (60, 3) and (shards.docs[:, 2] - shards.docs[:, 1]).tolist() == list(
        map(len, docs)
    )


def test_writer_exception_leaves_nothing(tmp_path) -> None:
    writer = ShardWriter(tmp_path / "ds", vocab_size=640, tokenizer_sha256=SHA, bos_id=BOS)
    with pytest.raises(RuntimeError, match="boom"), writer as w:
        w.add([BOS, 5, 6])
        assert [p.name.startswith(".ds.tmp-") for p in tmp_path.iterdir()] == [True]  # written aside
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_rules(tmp_path) -> None:
    out = _write(tmp_path / "ds", [[BOS, 1]])
    with pytest.raises(ShardError, match="not empty") as e:
        _write(out, [[BOS, 3]])
    assert str(out) in _one_line(e)
    # A failing overwrite keeps the old set intact and leaves no temp dir.
    with pytest.raises(RuntimeError), ShardWriter(out, vocab_size=640, tokenizer_sha256=SHA, bos_id=BOS,
                                                  overwrite=True) as w:  # fmt: skip
        w.add([BOS, 4])
        raise RuntimeError
    assert Shards.open(out).doc(0).tolist() == [BOS, 1] and sorted(p.name for p in tmp_path.iterdir()) == [
        "ds"
    ]
    _write(out, [[BOS, 3]], overwrite=True)
    assert Shards.open(out).doc(0).tolist() == [BOS, 3] and sorted(p.name for p in tmp_path.iterdir()) == [
        "ds"
    ]


@pytest.mark.parametrize(
    ("doc", "pattern"),
    [([BOS, 5, 640], r"doc 1: token id 640 at position 2"), ([BOS, -1], r"doc 1: token id -1"),
     ([7, 5], r"doc 1: must start with bos_id 2"), ([], r"doc 1: expected a non-empty"),
     ([2.0, 1.0], r"doc 1: token ids must be integers")],
)  # fmt: skip
def test_bad_documents(tmp_path, doc, pattern) -> None:
    with ShardWriter(tmp_path / "ds", vocab_size=640, tokenizer_sha256=SHA, bos_id=BOS) as w:
        w.add([BOS, 1])
        with pytest.raises(ShardError, match=pattern) as e:
            w.add(doc)
        assert str(tmp_path / "ds") in _one_line(e)
        w.add([BOS, 2])  # a rejected document is not written; the writer goes on
    assert [d.tolist() for d in map(Shards.open(tmp_path / "ds").doc, range(2))] == [[BOS, 1], [BOS, 2]]


def test_no_documents_is_an_error(tmp_path) -> None:
    with pytest.raises(ShardError, match="no documents"):
        _write(tmp_path / "ds", [])
    assert list(tmp_path.iterdir()) == []


def _set(key, value):
    def edit(index):
        index[key] = value

    return edit


def _edit_index(edit):
    def mutate(out):
        index = json.loads((out / "index.json").read_text())
        edit(index)
        (out / "index.json").write_text(json.dumps(index))

    return mutate


def _truncate(out):
    with open(out / "shard-00000.bin", "r+b") as f:
        f.truncate(f.seek(0, 2) - 2)


def _shuffle_offsets(out):
    starts = np.load(out / "shard-00000.docs.npy")
    np.save(out / "shard-00000.docs.npy", starts[::-1].copy())


CORRUPTIONS = {
    "truncated bin": (_truncate, r"shard-00000\.bin: size \d+ bytes, expected"),
    "missing bin": (lambda out: (out / "shard-00001.bin").unlink(), r"shard-00001\.bin: missing"),
    "missing docs": (lambda out: (out / "shard-00000.docs.npy").unlink(), r"shard-00000\.docs\.npy: missing"),
    "pickled docs": (lambda out: (out / "shard-00000.docs.npy").write_bytes(b"\x80\x04K\x01."),
                     r"docs\.npy: not a \.npy"),
    "bad offsets": (_shuffle_offsets, r"docs\.npy: offsets must start at 0"),
    "missing index": (lambda out: (out / "index.json").unlink(), r"index\.json: missing"),
    "not json": (lambda out: (out / "index.json").write_text("{nope"), r"index\.json: not valid JSON"),
    "unknown key": (_edit_index(_set("extra", 1)), r"index\.json: index: unknown key\(s\) \['extra'\]"),
    "wrong version": (_edit_index(_set("version", 2)), r"index\.json: version: .* got 2"),
    "wrong dtype": (_edit_index(_set("dtype", "uint32")), r"index\.json: dtype: expected 'uint16'"),
    "bad dtype": (_edit_index(_set("dtype", "int8")), r"index\.json: dtype: .* got 'int8'"),
    "wrong total": (_edit_index(_set("n_tokens", 1)), r"index\.json: n_tokens: 1 differs"),
    "escaping path": (_edit_index(lambda i: i["shards"][0].update(file="../x.bin")),
                      r"shards\[0\]\.file: '\.\./x\.bin'"),
    "missing shard key": (_edit_index(lambda i: i["shards"][1].pop("sha256")),
                          r"shards\[1\]: missing key\(s\) \['sha256'\]"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_shards_are_refused(tmp_path, case) -> None:
    out = _write(tmp_path / "ds", _docs(40, 640), shard_tokens=150)
    mutate, pattern = CORRUPTIONS[case]
    mutate(out)
    with pytest.raises(ShardError, match=pattern) as e:
        Shards.open(out)
    _one_line(e)


def test_verify_catches_a_flipped_byte(tmp_path) -> None:
    out = _write(tmp_path / "ds", _docs(40, 640), shard_tokens=150)
    path = out / "shard-00001.bin"
    data = bytearray(path.read_bytes())
    data[5] ^= 0x01
    path.write_bytes(bytes(data))
    Shards.open(out)  # sizes still fit: only hashing can tell
    with pytest.raises(ShardError, match=r"shard-00001\.bin: sha256 mismatch") as e:
        Shards.open(out, verify=True)
    _one_line(e)


# ---- tokenize_to_shards ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok3(tmp_path_factory):
    from spm_helpers import train_gemma_spm

    from gemmakit.tokenizer import Tokenizer

    return Tokenizer.load(train_gemma_spm(tmp_path_factory.mktemp("spm"), "gemma3"))


def test_tokenize_txt_and_jsonl(tmp_path, tok3) -> None:
    a = tmp_path / "a.txt"
    a.write_text("Hello world.\nSecond line of the same document.\n", encoding="utf-8")
    b = tmp_path / "b.jsonl"
    b.write_bytes(
        '\ufeff{"text": "first doc", "id": 1}\r\n\n{"text": "café 日本"}\n'.encode() + b'{"text": ""}\n'
    )
    c = tmp_path / "data.bin"  # JSONL by content, whatever the name
    c.write_text('\n  {"body": "from another field"}\n')
    d = tmp_path / "d.txt"  # JSON, but not an object: a text document
    d.write_text('["not", "jsonl"]\n{"x": 1}\n')
    out = tokenize_to_shards([a, b], tok3, tmp_path / "s1")
    tokenize_to_shards([c], tok3, tmp_path / "s2", text_field="body")
    tokenize_to_shards([d], tok3, tmp_path / "s3")
    texts = [
        ["Hello world.\nSecond line of the same document.\n", "first doc", "café 日本"],
        ["from another field"],
        ['["not", "jsonl"]\n{"x": 1}\n'],
    ]
    for name, want in zip(("s1", "s2", "s3"), texts, strict=True):
        shards = Shards.open(tmp_path / name, verify=True)
        shards.check_tokenizer(tok3)
        assert shards.vocab_size == tok3.vocab_size and shards.tokenizer_sha256 == tok3.sha256
        got = [shards.doc(i).tolist() for i in range(shards.n_docs)]
        assert got == [tok3.encode(t, bos=True, eos=True) for t in want]
    sources = Shards.open(out).meta["sources"]
    assert [(s["format"], s["n_docs"], s["n_empty"]) for s in sources] == [("text", 1, 0), ("jsonl", 2, 1)]
    assert sources[1]["sha256"] == hashlib.sha256(b.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("lines", "where", "pattern"),
    [(['{"text": "ok"}', '{"text": "ok"}', '{"text": broken'], 3, "invalid JSON"),
     (['{"text": "ok"}', "[1, 2]"], 2, "expected a JSON object, got list"),
     (['{"text": "ok"}', '{"txt": "x"}'], 2, "no 'text' key"),
     (['{"text": "ok"}', '{"text": 5}'], 2, "'text' must be a string, got int"),
     (['{"text": "ok"}', '{"text": "\\ud800"}'], 2, "lone surrogate"),
     (['{"text": broken', '{"text": "ok"}'], 1, "invalid JSON")],  # a .jsonl name is held to its content
)  # fmt: skip
def test_malformed_jsonl_names_file_and_line(tmp_path, tok3, lines, where, pattern) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    with pytest.raises(ShardError, match=pattern) as e:
        tokenize_to_shards([src], tok3, tmp_path / "out")
    assert _one_line(e).startswith(f"{src}:{where}:")
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_tokenize_refuses_empty_input_and_other_tokenizers(tmp_path, tok3) -> None:
    from spm_helpers import train_gemma_spm

    from gemmakit.tokenizer import Tokenizer

    with pytest.raises(ShardError, match="no input files"):
        tokenize_to_shards([], tok3, tmp_path / "out")
    (tmp_path / "e.txt").write_text("")
    (tmp_path / "f.jsonl").write_text("\n\n")
    with pytest.raises(ShardError, match="no documents"):
        tokenize_to_shards([tmp_path / "e.txt", tmp_path / "f.jsonl"], tok3, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "g.txt").write_text("some text")
    shards = Shards.open(tokenize_to_shards([tmp_path / "g.txt"], tok3, tmp_path / "out"))
    other = Tokenizer.load(train_gemma_spm(tmp_path, "gemma2"))
    with pytest.raises(ShardError, match="tokenizer mismatch") as e:
        shards.check_tokenizer(other)
    assert tok3.sha256 in _one_line(e) and other.sha256 in str(e.value)


# ---- loader ---------------------------------------------------------------------------------------

M = 10  # doc i is [BOS, M + i, M + i, ...]: every token after BOS names its document


def _marked(tmp_path, lengths: list[int]) -> Shards:
    docs = [[BOS] + [M + i] * (n - 1) for i, n in enumerate(lengths)]
    return Shards.open(_write(tmp_path / "marked", docs, vocab=M + len(lengths), shard_tokens=97))


@pytest.fixture
def marked(tmp_path) -> Shards:
    rng = np.random.default_rng(1)
    lengths = rng.integers(2, 10, 45).tolist() + rng.integers(12, 30, 6).tolist()  # 6 longer than a row (9)
    return _marked(tmp_path, lengths)


def _batches(loader: PackedLoader, n: int) -> list[torch.Tensor]:
    return [loader.next_batch() for _ in range(n)]


def test_single_document_rules(tmp_path) -> None:
    # One long document (7 > L = 5) is never cut: the rows are the document repeated without gaps.
    long = PackedLoader(_marked(tmp_path / "a", [7]), seq_len=4, batch_size=3)
    stream = torch.cat(_batches(long, 2)).flatten().tolist()
    assert stream == ([BOS] + [M] * 6) * 4 + [BOS, M]
    assert long.stats["tokens_dropped"] == 0 and long.epoch == 4
    # One short document (3 <= L = 5): each row starts with BOS; the copy that does not fit is cut.
    short = PackedLoader(_marked(tmp_path / "b", [3]), seq_len=4, batch_size=2)
    assert short.next_batch().tolist() == [[BOS, M, M, BOS, M]] * 2
    assert short.stats == {"rows": 2, "docs": 4, "docs_cut": 2, "docs_split": 0, "tokens_dropped": 2}


def _decode_epoch(loader: PackedLoader, lengths: list[int]) -> tuple[set[int], int, int]:
    """Read one rank's first epoch from its rows: (documents seen, BOS-only documents, rows)."""
    width, k = loader.seq_len + 1, len(range(loader.rank, len(lengths), loader.world_size))
    rows: list[list[int]] = []
    while sum(r.count(BOS) for r in rows) <= k:  # until the first BOS of the next epoch
        rows += loader.next_batch().tolist()
    seen, anonymous, count, bos_seen = set(), 0, {}, 0
    for j, row in enumerate(rows):
        if row[0] != BOS:  # a continuation: the previous row ended inside the same long document
            assert j > 0 and rows[j - 1][-1] in (BOS, row[0]) and lengths[row[0] - M] > width
        for p, t in enumerate(row):
            if t == BOS:
                bos_seen += 1
                if bos_seen > k:
                    break
                nxt = row[p + 1] if p + 1 < width else (rows[j + 1][0] if j + 1 < len(rows) else BOS)
                if nxt == BOS:
                    anonymous += 1  # a short document cut right after its BOS
                else:
                    assert nxt not in seen
                    seen.add(nxt)
            else:
                assert p == 0 or row[p - 1] in (BOS, t)  # pieces are contiguous runs of one document
                count[t] = count.get(t, 0) + 1
        if bos_seen > k:
            break
    for t, c in count.items():
        n = lengths[t - M]
        assert c <= n - 1 and (c == n - 1 or n <= width)  # long documents are never cut short
    assert set(count) <= seen  # every token belongs to a document whose start this rank read
    return seen, anonymous, len(rows)


def test_one_epoch_covers_every_document_once(marked) -> None:
    lengths = [len(marked.doc(i)) for i in range(marked.n_docs)]
    loader = PackedLoader(marked, seq_len=8, batch_size=2, seed=3)
    seen, anonymous, _ = _decode_epoch(loader, lengths)
    assert loader.epoch == 1
    assert {t - M for t in seen} <= set(range(marked.n_docs))
    assert len(seen) + anonymous == marked.n_docs


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_split_the_single_process_rows(marked, world_size) -> None:
    """W ranks with batch B hold exactly the rows one process with batch B x W holds, rank r taking
    rows r, r + W, ...: disjoint across ranks, and the global batch does not depend on W."""
    single = PackedLoader(marked, seq_len=8, batch_size=2 * world_size, seed=3)
    ranks = [PackedLoader(marked, seq_len=8, batch_size=2, seed=3, rank=r, world_size=world_size)
             for r in range(world_size)]  # fmt: skip
    for _ in range(40):  # several epochs of this 51-document set
        whole = single.next_batch()
        parts = [loader.next_batch() for loader in ranks]
        for r, part in enumerate(parts):
            assert torch.equal(part, whole[r::world_size])
    assert all(loader.epoch == single.epoch for loader in ranks) and single.epoch >= 2


def test_each_epoch_is_a_new_permutation(tmp_path) -> None:
    # Documents exactly one row long: row i holds one whole document, so rows spell out the order.
    shards = _marked(tmp_path, [9] * 20)
    orders = []
    for rank in range(2):
        loader = PackedLoader(shards, seq_len=8, batch_size=5, seed=4, rank=rank, world_size=2)
        rows = torch.cat(_batches(loader, 6)).tolist()  # 3 epochs of 10 documents
        assert all(row == [BOS] + [row[1]] * 8 for row in rows) and loader.stats["tokens_dropped"] == 0
        orders.append([[row[1] - M for row in rows[e * 10 : (e + 1) * 10]] for e in range(3)])
    for e in range(3):
        assert sorted(orders[0][e] + orders[1][e]) == list(range(20))  # each epoch: every doc once
    assert len({tuple(orders[0][e]) for e in range(3)}) == 3  # and in a new order


def test_deterministic_per_seed(marked) -> None:
    a, b, c = (PackedLoader(marked, seq_len=8, batch_size=3, seed=s) for s in (7, 7, 8))
    first, second, other = _batches(a, 10), _batches(b, 10), _batches(c, 10)
    assert all(torch.equal(x, y) for x, y in zip(first, second, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(first, other, strict=True))
    assert all(x.dtype == torch.int64 and x.shape == (3, 9) for x in first)
    for batch in first:
        rows = batch.tolist()
        assert all(
            row[0] == BOS or prev[-1] in (BOS, row[0]) for prev, row in zip(rows, rows[1:], strict=False)
        )


@pytest.mark.parametrize(("rank", "world_size"), [(0, 1), (1, 2)])
def test_resume_gives_the_same_next_batches(marked, rank, world_size) -> None:
    kw = dict(seq_len=8, batch_size=2, seed=5, rank=rank, world_size=world_size)
    probe = PackedLoader(marked, **kw)
    boundary = next(i for i in range(1, 500) if probe.next_batch() is not None and probe.epoch == 1)
    for k in (3, boundary - 3, boundary, boundary + 5):  # mid-epoch, across the boundary, at it, after
        reference = PackedLoader(marked, **kw)
        _batches(reference, k)
        state = json.loads(json.dumps(reference.state_dict()))
        assert len(json.dumps(state)) < 1000
        expected = _batches(reference, 8)
        resumed = PackedLoader(marked, **kw)
        resumed.load_state_dict(state)
        assert resumed.step == k and resumed.epoch == state["epoch"]
        assert all(torch.equal(x, y) for x, y in zip(_batches(resumed, 8), expected, strict=True))
        assert resumed.stats == reference.stats and resumed.epoch == reference.epoch


@pytest.mark.parametrize(
    ("field", "value"), [("world_size", 2), ("rank", 1), ("seed", 1), ("seq_len", 16), ("batch_size", 4)]
)
def test_resume_refuses_another_configuration(marked, field, value) -> None:
    kw = dict(seq_len=8, batch_size=2, seed=0, rank=0, world_size=1)
    saved_kw = {**kw, field: value, **({"world_size": 2} if field == "rank" else {})}  # rank 1 needs 2 ranks
    saved = PackedLoader(marked, **saved_kw)
    _batches(saved, 2)
    with pytest.raises(LoaderError, match=f"loader state: {field} is") as e:
        PackedLoader(marked, **kw).load_state_dict(saved.state_dict())
    _one_line(e)


def test_resume_refuses_a_tampered_position(marked) -> None:
    state = PackedLoader(marked, seq_len=8, batch_size=2).state_dict()
    with pytest.raises(LoaderError, match="pos 9999 is past"):
        PackedLoader(marked, seq_len=8, batch_size=2).load_state_dict({**state, "pos": 9999})
    with pytest.raises(LoaderError, match="missing keys \\['step'\\]"):
        PackedLoader(marked, seq_len=8, batch_size=2).load_state_dict(
            {k: v for k, v in state.items() if k != "step"}
        )


def test_loader_arguments(marked, tmp_path) -> None:
    with pytest.raises(LoaderError, match="rank: expected an int in \\[0, world_size=2\\)"):
        PackedLoader(marked, seq_len=8, batch_size=2, rank=2, world_size=2)
    with pytest.raises(LoaderError, match="seq_len"):
        PackedLoader(marked, seq_len=0, batch_size=2)
    two = _marked(tmp_path / "two", [3, 4])
    with pytest.raises(LoaderError, match="2 documents cannot be split over 3 ranks"):
        PackedLoader(two, seq_len=8, batch_size=2, world_size=3)
