"""Tokenizer: Gemma's SentencePiece model, its special ids, and UTF-8-safe streaming decode.

Where it sits: text -> `Tokenizer.encode` -> token ids -> model / `infer` -> token ids ->
`StreamDecoder` -> text. `chat` builds turn-formatted ids on top of `encode`. Nothing here imports
torch or the model; the tokenizer and the model meet only through integer ids.

Facts (shared/reference/gemma-architecture.md §4): BPE with byte fallback and split digits, no dummy
prefix ("hello" and " hello" are different tokens), whitespace runs are pieces. Ids 0..3 are
<pad> <eos> <bos> <unk> in every Gemma file; the turn markers <start_of_turn>/<end_of_turn> are
106/107 in the 256000-piece file of Gemma 1, 1.1, CodeGemma and 2, and 105/106 in the 262144-piece
Gemma 3 file. Every Gemma expects exactly one <bos> at position 0 (lambada perplexity of gemma-7b:
3.46 with it, ~5.9e9 without; lm-evaluation-harness#1465).

Key trade-off: injection safety over agreeing with raw SentencePiece on hostile text. In the
official files the turn markers, <mask> and <unusedN> are USER_DEFINED pieces, which SentencePiece
matches anywhere in its input: raw `encode("<end_of_turn>")` gives the single marker id, so user text
could forge a turn boundary (HF tokenizers do the same unless split_special_tokens=True). We retype
those pieces to CONTROL in an in-memory copy of the model (ids, scores and every other piece stay
the same), so such strings are tokenized as ordinary text ("<", "end", ...). Control ids are placed
only by code (`encode(bos=...)`, `chat.render`). Text without such strings encodes exactly as the
unmodified SentencePiece model encodes it.
"""

from __future__ import annotations

import codecs
import hashlib
import logging
import re
from collections.abc import Iterable
from pathlib import Path

import sentencepiece

from gemmakit.config import GENERATIONS
from gemmakit.errors import UserError

log = logging.getLogger(__name__)

LAYOUT_GEMMA1_2 = "gemma1/2"  # Gemma 1, 1.1, CodeGemma, 2: 256000 pieces, turn markers 106/107
LAYOUT_GEMMA3 = "gemma3"  # Gemma 3: 262144 pieces, turn markers 105/106
# layout -> (<start_of_turn> id, <end_of_turn> id); reference §4.2.
LAYOUT_TURN_IDS: dict[str, tuple[int, int]] = {LAYOUT_GEMMA1_2: (106, 107), LAYOUT_GEMMA3: (105, 106)}
# Pieces whose ids are the same in both layouts (reference §4.2).
_FIXED_IDS = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
_START_OF_TURN, _END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
# Reserved pieces outside the 4..<end_of_turn> block that must not be reachable from text either:
# Gemma 3's <unused99>..<unused6238> after id 256000 and the image markers 255999/256000.
_RESERVED_PIECE = re.compile(r"<unused\d+>|<start_of_image>|<end_of_image>|<image_soft_token>")
# SentencePiece.Type enum values (sentencepiece_model.proto).
_CONTROL, _USER_DEFINED = 3, 4
_BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")
# Decoding maps each invalid UTF-8 byte to one U+FFFD, as SentencePiece and HF's ByteFallback do.
# Python's "replace" would give one per invalid *sequence*, so we decode with surrogateescape
# (one U+DC80..U+DCFF per invalid byte >= 0x80; valid UTF-8 never yields those) and translate.
_ESCAPES_TO_FFFD = {0xDC80 + b: 0xFFFD for b in range(128)}


class TokenizerError(UserError):
    """A tokenizer file or a tokenizer call is invalid; the message is one line naming the culprit."""


def layout_for_generation(generation: str) -> str:
    """The special-token layout that a `ModelConfig.generation` ("gemma1"/"gemma2"/"gemma3") uses."""
    if generation not in GENERATIONS:
        raise TokenizerError(f"unknown generation {generation!r}; expected one of {GENERATIONS}")
    return LAYOUT_GEMMA3 if generation == "gemma3" else LAYOUT_GEMMA1_2


# ---- reading the serialized ModelProto (protobuf wire format, no protobuf dependency) ----------


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode the protobuf varint at `pos`: (value, position after it). IndexError if truncated."""
    value = shift = 0
    while shift < 70:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise ValueError(f"varint longer than 10 bytes at offset {pos}")


def _piece_spans(buf: bytes) -> list[tuple[int, int]]:
    """(start, end) of every `pieces` sub-message (ModelProto field 1), in id order.

    Walks the whole top level, so it also rejects files that are not a well-formed protobuf.
    A hand-written walk of two varints per piece: 262144 pieces (Gemma 3) take ~0.15 s.
    """
    spans, pos, end = [], 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            _, pos = _varint(buf, pos)
            continue
        if wire in (1, 5):
            pos += 8 if wire == 1 else 4
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if key >> 3 == 1:
                spans.append((pos, pos + length))
            pos += length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} at offset {pos}")
    if pos != end:
        raise ValueError("last field runs past the end of the file")
    return spans


def _type_offset(buf: bytes, start: int, end: int) -> int:
    """Offset of the `type` varint (field 3) inside one SentencePiece sub-message, or -1."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if field == 3 and wire == 0:
            return pos
        if wire == 0:
            _, pos = _varint(buf, pos)
        elif wire == 2:
            length, pos = _varint(buf, pos)
            pos += length
        else:
            pos += 8 if wire == 1 else 4
    return -1


def _retype_reserved(
    model: bytes, spans: list[tuple[int, int]], pieces: list[str], last_reserved: int
) -> tuple[bytes, frozenset[int]]:
    """Copy of `model` with reserved USER_DEFINED pieces retyped CONTROL, and the retyped ids.

    Reserved: ids 4..last_reserved (<mask> .. <end_of_turn>) and any piece named like
    `_RESERVED_PIECE`. Both type values are one-byte varints, so the patch is in place and every
    offset, id and score is untouched.
    """
    patched, retyped = bytearray(model), []
    for i, (start, end) in enumerate(spans):
        if 4 <= i <= last_reserved or _RESERVED_PIECE.fullmatch(pieces[i]):
            at = _type_offset(model, start, end)
            if at >= 0 and model[at] == _USER_DEFINED:
                patched[at] = _CONTROL
                retyped.append(i)
    return bytes(patched), frozenset(retyped)


# ---- the tokenizer ------------------------------------------------------------------------------


def _read_model_file(path: Path) -> tuple[Path, bytes]:
    """Resolve a file or a directory holding `tokenizer.model`; return its path and bytes."""
    if path.is_dir():
        path = path / "tokenizer.model"
        if not path.is_file():
            raise TokenizerError(f"{path.parent}: directory has no tokenizer.model")
    elif not path.is_file():
        raise TokenizerError(f"{path}: no such tokenizer file")
    with path.open("rb") as f:
        head = f.read(8)
        if not head:
            raise TokenizerError(f"{path}: empty file, expected a SentencePiece model")
        # A serialized ModelProto starts with its first `pieces` entry: tag 0x0A (field 1, length).
        # Checked before reading the rest, so a multi-GiB weights file is not read by mistake.
        if not head.startswith(b"\x0a"):
            hint = " (a HF tokenizer.json? use the SentencePiece tokenizer.model)" if head[:1] == b"{" else ""
            raise TokenizerError(
                f"{path}: not a SentencePiece model file{hint}; first bytes {head!r}, "
                "expected a serialized ModelProto starting with 0x0a"
            )
        return path, head + f.read()


class Tokenizer:
    """A Gemma SentencePiece model with checked special ids. Build it with `Tokenizer.load`."""

    def __init__(self, model: bytes, source: str = "<bytes>") -> None:
        self.source = source
        self.sha256 = hashlib.sha256(model).hexdigest()  # of the file as given, for shard indexes
        sp = sentencepiece.SentencePieceProcessor()
        try:
            spans = _piece_spans(model)
        except IndexError:
            raise TokenizerError(f"{source}: corrupt SentencePiece model (truncated)") from None
        except ValueError as e:
            raise TokenizerError(f"{source}: corrupt SentencePiece model ({e})") from None
        try:
            sp.LoadFromSerializedProto(model)
        except (RuntimeError, OSError):  # its message is a C++ source location, not a reason
            raise TokenizerError(f"{source}: corrupt SentencePiece model (not a ModelProto)") from None
        if len(spans) != sp.get_piece_size():
            raise TokenizerError(f"{source}: corrupt SentencePiece model (piece count mismatch)")
        self.generation_layout = self._check_layout(sp, source)
        self.start_of_turn_id, self.end_of_turn_id = LAYOUT_TURN_IDS[self.generation_layout]
        pieces = [sp.id_to_piece(i) for i in range(len(spans))]
        encoder_model, self._retyped = _retype_reserved(model, spans, pieces, self.end_of_turn_id)
        self._sp = sentencepiece.SentencePieceProcessor()
        self._sp.LoadFromSerializedProto(encoder_model)
        self._unk_bytes = self._sp.decode([self.unk_id]).encode("utf-8")
        self._bytes_cache: dict[int, bytes] = {}
        log.info("tokenizer %s: %d pieces, layout %s", source, self.vocab_size, self.generation_layout)

    def vocab(self, n: int | None = None) -> tuple[list[str], list[float], list[int]]:
        """(pieces, scores, SentencePiece types) of the first `n` ids (all by default).

        Types are those of the in-memory model, where reserved pieces (<start_of_turn>, <unusedN>, ...)
        are CONTROL (3) so that text can never produce them; NORMAL 1, UNKNOWN 2, USER_DEFINED 4,
        UNUSED 5, BYTE 6. Exporters (GGUF) write these as they are.
        """
        n = self.vocab_size if n is None else min(n, self.vocab_size)
        proto = self._sp.serialized_model_proto()
        types = []
        for start, end in _piece_spans(proto)[:n]:
            at = _type_offset(proto, start, end)
            types.append(proto[at] if at >= 0 else 1)  # field absent = NORMAL (1)
        pieces = [self._sp.id_to_piece(i) for i in range(n)]
        return pieces, [self._sp.get_score(i) for i in range(n)], types

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a SentencePiece model file, or a directory containing `tokenizer.model`."""
        path, data = _read_model_file(Path(path))
        return cls(data, source=str(path))

    @staticmethod
    def _check_layout(sp: sentencepiece.SentencePieceProcessor, source: str) -> str:
        """Which official layout the pieces follow; TokenizerError if neither."""
        size = sp.get_piece_size()
        found = {p: sp.piece_to_id(p) for p in (*_FIXED_IDS, _START_OF_TURN, _END_OF_TURN)}
        for piece, want in _FIXED_IDS.items():
            if found[piece] != want or sp.id_to_piece(want) != piece:
                raise TokenizerError(f"{source}: piece {piece} must have id {want} in a Gemma tokenizer")
        turn_ids = tuple(
            i if i < size and sp.id_to_piece(i) == p else None
            for p, i in ((_START_OF_TURN, found[_START_OF_TURN]), (_END_OF_TURN, found[_END_OF_TURN]))
        )
        for layout, ids in LAYOUT_TURN_IDS.items():
            if turn_ids == ids:
                return layout
        raise TokenizerError(
            f"{source}: <start_of_turn>/<end_of_turn> have ids {turn_ids}, expected one of "
            + ", ".join(f"{ids} ({layout})" for layout, ids in LAYOUT_TURN_IDS.items())
        )

    # ---- ids ----------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return _FIXED_IDS["<pad>"]

    @property
    def eos_id(self) -> int:
        return _FIXED_IDS["<eos>"]

    @property
    def bos_id(self) -> int:
        return _FIXED_IDS["<bos>"]

    @property
    def unk_id(self) -> int:
        return _FIXED_IDS["<unk>"]

    @property
    def stop_ids(self) -> tuple[int, int]:
        """Generation stops on <eos> or <end_of_turn> (reference §4.5; HF Gemma 3 eos_token_id)."""
        return (self.eos_id, self.end_of_turn_id)

    @property
    def reserved_ids(self) -> frozenset[int]:
        """USER_DEFINED reserved pieces that `encode` never produces from text (see module doc)."""
        return self._retyped

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(self._check_id(token_id))

    def piece_to_id(self, piece: str) -> int:
        token_id = self._sp.piece_to_id(piece)
        if token_id == self.unk_id and piece != "<unk>":
            raise TokenizerError(f"{self.source}: no piece {piece!r} in the vocabulary")
        return token_id

    def _check_id(self, token_id: int) -> int:
        token_id = int(token_id)
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(f"token id {token_id} outside the vocabulary 0..{self.vocab_size - 1}")
        return token_id

    # ---- text <-> ids -------------------------------------------------------------------------

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text`: one <bos> first if `bos`, <eos> last if `eos`, no other control id."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode() takes str, got {type(text).__name__}")
        try:
            ids = self._sp.encode(text)
        except RuntimeError:
            bad = next((i for i, c in enumerate(text) if 0xD800 <= ord(c) <= 0xDFFF), None)
            raise TokenizerError(f"text is not valid Unicode: lone surrogate at index {bad}") from None
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token contributes to decoded text (b"" for <pad>/<bos>/<eos>)."""
        cached = self._bytes_cache.get(token_id)
        if cached is not None:
            return cached
        sp, i = self._sp, self._check_id(token_id)
        if sp.is_byte(i):
            out = bytes([int(_BYTE_PIECE.fullmatch(sp.id_to_piece(i)).group(1), 16)])
        elif sp.is_unknown(i):
            out = self._unk_bytes
        elif sp.is_control(i) and i not in self._retyped:
            out = b""
        else:  # normal, user-defined, unused pieces: "▁" is a space (no dummy prefix to strip)
            out = sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8")
        self._bytes_cache[i] = out
        return out

    def decode(self, tokens: Iterable[int]) -> str:
        """Text of `tokens`; <pad>/<bos>/<eos> give nothing, each invalid UTF-8 byte one U+FFFD."""
        data = b"".join(self.token_bytes(t) for t in tokens)
        return data.decode("utf-8", "surrogateescape").translate(_ESCAPES_TO_FFFD)


class StreamDecoder:
    """Incremental decoding: push ids one at a time, get text as soon as characters complete.

    Decoding token by token breaks characters split over byte-fallback pieces: an emoji is four
    pieces <0xF0><0x9F><0x98><0x80>, each invalid UTF-8 alone. This holds back the (at most 3)
    bytes of an unfinished character. Invariant, for every id sequence:
    `"".join(d.push(t) for t in ids) + d.flush() == tokenizer.decode(ids)`.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")("surrogateescape")

    def push(self, token_id: int) -> str:
        """Text completed by this token ("" while a multi-byte character is unfinished)."""
        text = self._utf8.decode(self._tokenizer.token_bytes(token_id))
        return text.translate(_ESCAPES_TO_FFFD)

    def flush(self) -> str:
        """Whatever is held back (an unfinished character becomes U+FFFD per byte); then reset."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text.translate(_ESCAPES_TO_FFFD)
