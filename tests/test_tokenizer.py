"""Tokenizer tests against independent references: raw SentencePiece, HF's GemmaTokenizer (converted
from the same SentencePiece file) and the protobuf library, on tiny models trained with Gemma's
special-token layouts (tests/spm_helpers.py)."""

from __future__ import annotations

import hashlib
import random

import pytest
import sentencepiece
from sentencepiece import sentencepiece_model_pb2
from spm_helpers import gemma_spm_bytes

from gemmakit import tokenizer as tokenizer_module
from gemmakit.tokenizer import (
    LAYOUT_GEMMA1_2,
    LAYOUT_GEMMA3,
    StreamDecoder,
    Tokenizer,
    TokenizerError,
    layout_for_generation,
)

# Reference §4.2: <start_of_turn>/<end_of_turn> per layout.
OFFICIAL_TURN_IDS = {"gemma2": (106, 107), "gemma3": (105, 106)}
SPECIAL_STRINGS = ["<bos>", "<eos>", "<pad>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>",
                   "<unused0>", "<unused98>", "<2mass>", "[@BOS@]", "[multimodal]"]  # fmt: skip
FIXED_TEXTS = [
    "", "hello world", " hello", "hello ", "  two  spaces  ", "\n", "\n\nparagraph\n\n\n", "\t tab\t",
    "Digits 1234567890 and 3.14159", "😀", "a😀b👍🏽c", "👨‍👩‍👧‍👦 family", "日本語のテキスト", "中文 한국어",
    "e\u0301 combining \u0301\u0302\u0303 marks", "café naïve über", "\u00a0nbsp\u3000ideographic",
    "\x00 nul \x7f del", "\U0010ffff\ue000 private use", "<start_of_turn>user\nhi<end_of_turn>",
    "Привет, мир!", "\r\nwindows\r\n", "<0xF0><0x9F> literal byte-piece names",
]  # fmt: skip


def random_text(rng: random.Random, n: int) -> str:
    """Mixed text: ASCII, whitespace runs, accents, CJK, emoji, combining marks, any code point."""
    pools = ["abc xyz ", "  \n\n\t", "0123456789", "éüçñ", "日本語中文한국", "😀👍🏽🚀", "\u0301\u0308",
             "<>_/", "Привет"]  # fmt: skip
    out = []
    for _ in range(n):
        if rng.random() < 0.1:  # any non-surrogate code point, all planes
            cp = rng.randrange(0x110000 - 0x800)
            out.append(chr(cp + 0x800 if cp >= 0xD800 else cp))
        else:
            out.append(rng.choice(rng.choice(pools)))
    return "".join(out)


@pytest.fixture(scope="module")
def raw(model_path) -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_file=str(model_path))


@pytest.fixture(scope="module")
def hf_tok(model_path):
    transformers = pytest.importorskip("transformers")
    # add_bos_token=True as in the official tokenizer_config.json (a bare tokenizer.model lacks it).
    return transformers.GemmaTokenizer.from_pretrained(str(model_path.parent), add_bos_token=True)


# ---- loading and special ids -------------------------------------------------------------------


def test_layout_and_special_ids(tok, generation, raw):
    sot, eot = OFFICIAL_TURN_IDS[generation]
    assert tok.generation_layout == layout_for_generation(generation)
    assert tok.generation_layout == (LAYOUT_GEMMA3 if generation == "gemma3" else LAYOUT_GEMMA1_2)
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
    assert (raw.pad_id(), raw.eos_id(), raw.bos_id(), raw.unk_id()) == (0, 1, 2, 3)
    assert (tok.start_of_turn_id, tok.end_of_turn_id) == (sot, eot)
    assert raw.id_to_piece(sot) == "<start_of_turn>" and raw.id_to_piece(eot) == "<end_of_turn>"
    assert tok.stop_ids == (1, eot)
    assert tok.vocab_size == raw.get_piece_size()
    for i in range(tok.vocab_size):
        assert tok.id_to_piece(i) == raw.id_to_piece(i)
    assert tok.piece_to_id("<end_of_turn>") == eot and tok.piece_to_id("<unk>") == 3
    assert tok.reserved_ids == frozenset(range(4, eot + 1))


def test_directory_file_and_sha256(model_path, tok):
    assert Tokenizer.load(model_path.parent).sha256 == tok.sha256
    assert tok.sha256 == hashlib.sha256(model_path.read_bytes()).hexdigest()
    assert Tokenizer.load(str(model_path)).sha256 == tok.sha256


def test_layouts_have_distinct_hashes():
    assert len({hashlib.sha256(gemma_spm_bytes(g)).digest() for g in ("gemma1", "gemma3")}) == 2
    assert gemma_spm_bytes("gemma2") == gemma_spm_bytes("gemma1/2")


def _error(path) -> str:
    with pytest.raises(TokenizerError) as info:
        Tokenizer.load(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_load_errors_name_the_file(tmp_path, model_path):
    assert str(tmp_path / "nope.model") in _error(tmp_path / "nope.model")
    assert "no tokenizer.model" in _error(tmp_path)
    cases = {
        "empty.model": b"",
        "tokenizer.json": b'{"version": "1.0", "model": {}}',
        "weights.safetensors": (8).to_bytes(8, "little") + b'{"a": 1}',
        "garbage.model": b"\x0a" + bytes(range(256)) * 4,
        "truncated.model": model_path.read_bytes()[: len(model_path.read_bytes()) // 2],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        message = _error(tmp_path / name)
        assert str(tmp_path / name) in message, message
    assert "tokenizer.json" in _error(tmp_path / "tokenizer.json")


def test_non_gemma_layout_rejected(tmp_path):
    # Same trained model with <start_of_turn> moved one slot down: not an official layout.
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(gemma_spm_bytes("gemma3"))
    proto.pieces[104].piece, proto.pieces[105].piece = "<start_of_turn>", "<unused98>"
    (tmp_path / "moved.model").write_bytes(proto.SerializeToString())
    message = _error(tmp_path / "moved.model")
    assert "(104, 106)" in message and "gemma3" in message
    proto.pieces[2].piece = "<s>"
    (tmp_path / "bos.model").write_bytes(proto.SerializeToString())
    assert "<bos>" in _error(tmp_path / "bos.model")


def test_layout_for_generation():
    assert [layout_for_generation(g) for g in ("gemma1", "gemma2", "gemma3")] == [
        LAYOUT_GEMMA1_2, LAYOUT_GEMMA1_2, LAYOUT_GEMMA3]  # fmt: skip
    with pytest.raises(TokenizerError, match="gemma4"):
        layout_for_generation("gemma4")


# ---- encode ------------------------------------------------------------------------------------


def test_encode_matches_sentencepiece_and_hf(tok, raw, hf_tok):
    rng = random.Random(0)
    texts = [t for t in FIXED_TEXTS if "<" not in t] + [random_text(rng, 60) for _ in range(200)]
    for text in texts:
        ids = tok.encode(text, bos=False)
        assert ids == raw.encode(text), text
        assert ids == hf_tok(text, add_special_tokens=False).input_ids, text
        if text:  # HF adds one <bos> too (but returns [] for "")
            assert tok.encode(text) == hf_tok(text).input_ids


def test_exactly_one_bos(tok):
    for text in ["hello", "", "<bos>hello", "<bos><bos>", "x<bos>", "<eos>"]:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1, text
        assert tok.eos_id not in ids
        assert tok.encode(text, bos=False) == ids[1:]
        with_eos = tok.encode(text, eos=True)
        assert with_eos[-1] == tok.eos_id and with_eos.count(tok.eos_id) == 1
    assert tok.encode("") == [tok.bos_id]


def test_special_strings_cannot_inject_control_ids(tok, raw):
    # Raw SentencePiece does turn these strings into their ids (USER_DEFINED pieces) ...
    assert raw.encode("<start_of_turn>") == [tok.start_of_turn_id]
    assert raw.encode("<end_of_turn>") == [tok.end_of_turn_id]
    # ... the Tokenizer never does, yet decodes them back to the same text.
    for s in SPECIAL_STRINGS:
        text = f"{s}a {s}{s}\n{s}"
        ids = tok.encode(text, bos=False)
        assert not set(ids) & set(range(tok.end_of_turn_id + 1)), (s, ids)
        assert tok.decode(ids) == text


def test_retyping_matches_protobuf_edit(model_path, tok):
    """The in-place wire patch equals the same edit made with the protobuf library."""
    data = model_path.read_bytes()
    raw_sp = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
    spans = tokenizer_module._piece_spans(data)
    pieces = [raw_sp.id_to_piece(i) for i in range(len(spans))]
    patched, retyped = tokenizer_module._retype_reserved(data, spans, pieces, tok.end_of_turn_id)
    assert retyped == tok.reserved_ids
    expected = sentencepiece_model_pb2.ModelProto()
    expected.ParseFromString(data)
    kinds = sentencepiece_model_pb2.ModelProto.SentencePiece
    for i in retyped:
        assert expected.pieces[i].type == kinds.USER_DEFINED
        expected.pieces[i].type = kinds.CONTROL
    got = sentencepiece_model_pb2.ModelProto()
    got.ParseFromString(patched)
    assert got == expected and len(patched) == len(data)
    # Text without reserved strings: the patched model encodes like the original one.
    patched_sp = sentencepiece.SentencePieceProcessor(model_proto=patched)
    rng = random.Random(1)
    for text in [random_text(rng, 50) for _ in range(100)]:
        assert patched_sp.encode(text) == raw_sp.encode(text)


def test_encode_rejects_non_text(tok):
    with pytest.raises(TokenizerError, match="surrogate at index 1"):
        tok.encode("a\ud800b")
    with pytest.raises(TokenizerError, match="bytes"):
        tok.encode(b"hello")  # type: ignore[arg-type]


# ---- decode ------------------------------------------------------------------------------------


def test_round_trip(tok, raw):
    rng = random.Random(2)
    for text in FIXED_TEXTS + [random_text(rng, 80) for _ in range(300)]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert raw.decode(ids) == text


def test_decode_matches_sentencepiece_on_any_ids(tok, raw):
    """Arbitrary ids (model output): controls vanish, <unk> is " ⁇ ", bad UTF-8 is U+FFFD per byte."""
    byte_ids = [i for i in range(tok.vocab_size) if raw.is_byte(i)]
    assert len(byte_ids) == 256
    rng = random.Random(3)
    for i in range(tok.vocab_size):
        assert tok.decode([i]) == raw.decode([i]), i
    for _ in range(400):
        pool = byte_ids if rng.random() < 0.5 else range(tok.vocab_size)
        ids = [rng.choice(pool) if rng.random() < 0.8 else rng.randrange(tok.vocab_size)
               for _ in range(rng.randint(1, 12))]  # fmt: skip
        assert tok.decode(ids) == raw.decode(ids), ids


def test_decode_unused_pieces_like_sentencepiece():
    # SentencePiece decodes UNUSED pieces (never produced by encode) as their text.
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(gemma_spm_bytes("gemma2"))
    kinds = sentencepiece_model_pb2.ModelProto.SentencePiece
    unused = [50, [p.piece for p in proto.pieces].index("he")]
    for i in unused:
        proto.pieces[i].type = kinds.UNUSED
    data = proto.SerializeToString()
    raw = sentencepiece.SentencePieceProcessor(model_proto=data)
    tok = Tokenizer(data)
    ids = [*unused, 2, *tok.encode("hehe he", bos=False)]
    assert tok.decode(ids) == raw.decode(ids) == "<unused43>he" + "hehe he"


def test_decode_and_piece_errors(tok):
    with pytest.raises(TokenizerError, match=f"token id {tok.vocab_size} outside"):
        tok.decode([5, tok.vocab_size])
    with pytest.raises(TokenizerError, match="-1"):
        tok.id_to_piece(-1)
    with pytest.raises(TokenizerError, match="not-a-piece"):
        tok.piece_to_id("not-a-piece")


# ---- streaming ---------------------------------------------------------------------------------


def _stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    decoder = StreamDecoder(tok)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


def test_stream_holds_back_split_characters(tok, raw):
    ids = tok.encode("a😀b", bos=False)
    assert [raw.id_to_piece(i) for i in ids[1:5]] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert _stream(tok, ids) == ["a", "", "", "", "😀", "b", ""]
    # An unfinished character at the end becomes U+FFFD per byte, like decode().
    assert "".join(_stream(tok, ids[:3])) == tok.decode(ids[:3]) == raw.decode(ids[:3]) == "a\ufffd\ufffd"


def test_stream_equals_decode(tok):
    rng = random.Random(4)
    for text in FIXED_TEXTS + [random_text(rng, 80) for _ in range(300)]:
        ids = tok.encode(text, eos=rng.random() < 0.5)
        pieces = _stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids) == text
        assert "\ufffd" not in "".join(pieces) or "\ufffd" in text  # never a premature U+FFFD


def test_stream_equals_decode_on_any_ids(tok):
    byte_ids = [tok.piece_to_id(f"<0x{b:02X}>") for b in range(256)]
    rng = random.Random(5)
    decoder = StreamDecoder(tok)
    for _ in range(400):
        ids = [rng.choice(byte_ids) if rng.random() < 0.7 else rng.randrange(tok.vocab_size)
               for _ in range(rng.randint(1, 16))]  # fmt: skip
        text = "".join(decoder.push(i) for i in ids) + decoder.flush()  # reused after flush
        assert text == tok.decode(ids), ids
