"""Validating GGUF reader: header, metadata and tensor table checked before anything is trusted.

Where it sits: inside `gemmakit.export_gguf`; `writer.export_gguf` re-reads every file it writes with
`read_gguf` before renaming it into place, and users can check any GGUF with it. Pure Python (struct +
mmap), no `gguf` package needed, so it stays an independent check of what gguf-py writes.

Key trade-off: hostile files over speed. Every count and length is compared with the bytes left in
the file *before* anything is allocated for it (a 2**40-element array claim fails in microseconds
instead of exhausting memory, the ollama#17042 lesson), and every fault is one `GGUFError` naming the
file, the problem and the byte offset. A 262144-token vocabulary parses in ~0.25 s (gguf-py's
GGUFReader: ~10 s).
Cases covered: reference reliability-tests.md §2.3 L3 (llama.cpp #18674, #25969, #26318, #26690).
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemmakit.errors import UserError


class GGUFError(UserError):
    """A GGUF file is malformed, or a model cannot be exported faithfully; one line naming file and problem."""


GGUF_MAGIC = b"GGUF"
# ggml type id -> (name, elements per block, bytes per block); ggml.c type_traits, gguf-py constants.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8),
    28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}  # fmt: skip
# Metadata value types: scalar struct formats; 8 = string, 9 = array.
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY, _U32, _I32, _F32, _BOOL = 8, 9, 4, 5, 6, 7
_VALUE_NAMES = {0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32", 6: "float32",
                7: "bool", 8: "string", 9: "array", 10: "uint64", 11: "int64", 12: "float64"}  # fmt: skip
_MAX_NAME = 63  # GGML_MAX_NAME 64 including the NUL
_INT64_MAX = 2**63 - 1
# Keys llama.cpp reads with a strict type check; `{arch}` is general.architecture.
_KEY_TYPES: dict[str, tuple[int, int | None]] = {
    "general.architecture": (_STRING, None), "general.alignment": (_U32, None), "general.name": (_STRING, None),
    "general.file_type": (_U32, None), "tokenizer.ggml.model": (_STRING, None),
    "tokenizer.chat_template": (_STRING, None), "tokenizer.ggml.tokens": (_ARRAY, _STRING),
    "tokenizer.ggml.scores": (_ARRAY, _F32), "tokenizer.ggml.token_type": (_ARRAY, _I32),
    **{f"tokenizer.ggml.{k}_token_id": (_U32, None) for k in ("bos", "eos", "unknown", "padding", "eot")},
    **{f"tokenizer.ggml.{k}": (_BOOL, None) for k in ("add_bos_token", "add_eos_token", "add_space_prefix")},
    **{f"{{arch}}.{k}": (_U32, None) for k in ("context_length", "embedding_length", "block_count",
                                               "attention.key_length", "attention.value_length",
                                               "attention.sliding_window")},
    **{f"{{arch}}.{k}": (_F32, None) for k in ("attention.layer_norm_rms_epsilon", "rope.freq_base",
                                               "rope.freq_base_swa", "rope.scaling.factor",
                                               "attn_logit_softcapping", "final_logit_softcapping")},
}  # fmt: skip
_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # outermost first, as numpy / torch (GGUF stores the reverse)
    ggml_type: str
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass
class GGUFFile:
    path: str
    version: int
    alignment: int
    metadata: dict[str, Any] = field(repr=False)
    tensors: list[GGUFTensor] = field(repr=False)


class _Reader:
    """Bounds-checked little-endian cursor: every length is compared with the bytes left before use."""

    def __init__(self, buf: Any, path: str) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def error(self, problem: str) -> GGUFError:
        return GGUFError(f"{self.path}: {problem} (at byte {self.pos})")

    def take(self, n: int, what: str) -> int:
        left = len(self.buf) - self.pos
        if n > left:
            raise self.error(f"truncated: {what} needs {n} bytes, only {left} remain")
        self.pos += n
        return self.pos - n

    def scalar(self, fmt: str, what: str) -> Any:
        return struct.unpack_from("<" + fmt, self.buf, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("Q", f"length of {what}")
        start = self.take(n, what)
        try:
            return self.buf[start : start + n].decode("utf-8")
        except UnicodeDecodeError:
            raise self.error(f"{what} is not valid UTF-8") from None

    def value(self, vtype: int, what: str, nested: bool = False) -> Any:
        if vtype in _SCALAR:
            if vtype == _BOOL and self.buf[self.pos : self.pos + 1] not in (b"\x00", b"\x01"):
                raise self.error(f"{what}: bool byte is not 0 or 1")
            return self.scalar(_SCALAR[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype != _ARRAY or nested:
            raise self.error(f"{what}: unknown or nested value type {vtype}")
        etype, n = self.scalar("I", f"{what} element type"), self.scalar("Q", f"{what} length")
        if etype not in _SCALAR and etype != _STRING:
            raise self.error(f"{what}: array element type {etype} is not a scalar or string")
        least = 8 if etype == _STRING else struct.calcsize(_SCALAR[etype])
        if n * least > len(self.buf) - self.pos:  # before allocating anything for n elements
            raise self.error(f"truncated: {what} claims {n} elements, at least {n * least} bytes, only "
                             f"{len(self.buf) - self.pos} remain")  # fmt: skip
        if etype == _STRING:
            return [self.string(f"{what}[{i}]") for i in range(n)]
        if etype == _BOOL:
            return [self.value(_BOOL, f"{what}[{i}]") for i in range(n)]
        return list(struct.unpack_from(f"<{n}{_SCALAR[etype]}", self.buf, self.take(n * least, what)))


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse and validate a GGUF file's header, metadata and tensor table; raise GGUFError on any fault.

    Checks: magic, version 2 or 3, every count and length against the remaining bytes before use,
    value and element types, types of the keys llama.cpp reads, alignment (u32 power of two), tensor
    names (unique, < 64 bytes), at most 4 dims without int64 overflow, known ggml types, rows a
    multiple of the block size, offsets aligned and inside the file, no overlaps, and the vocabulary
    (equal-length token arrays, well-formed byte tokens, special ids in range, as many embedding rows
    as tokens). Tensor data is not read. The file is memory-mapped, so a huge file costs no memory.
    """
    p = Path(path)
    try:
        with open(p, "rb") as f:
            head, size = f.read(4), os.fstat(f.fileno()).st_size
            if head != GGUF_MAGIC:
                if GGUF_MAGIC.startswith(head):
                    raise GGUFError(f"{p}: truncated: {size} bytes, a GGUF header needs 24")
                raise GGUFError(f"{p}: not a GGUF file: magic {head!r}, expected {GGUF_MAGIC!r}")
            if size < 24:
                raise GGUFError(f"{p}: truncated: {size} bytes, a GGUF header needs 24")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return _parse(_Reader(mm, str(p)))
    except OSError as e:
        raise GGUFError(f"{p}: cannot read ({e.strerror or e})") from None


def _parse(r: _Reader) -> GGUFFile:
    r.pos = 4  # after the magic
    version = r.scalar("I", "version")
    if version not in (2, 3):
        raise r.error(f"unsupported GGUF version {version}, expected 2 or 3")
    n_tensors, n_kv = r.scalar("Q", "tensor count"), r.scalar("Q", "metadata count")
    if n_kv * 13 > len(r.buf) - r.pos:  # key length 8 + type 4 + at least 1 value byte
        raise r.error(f"truncated: metadata count {n_kv} needs at least {n_kv * 13} bytes")
    meta, types = {}, {}
    for _ in range(n_kv):
        key = r.string("metadata key")
        if key in meta:
            raise r.error(f"duplicate metadata key {key!r}")
        vtype = r.scalar("I", f"type of {key!r}")
        before = r.pos
        meta[key] = r.value(vtype, repr(key))
        types[key] = (vtype, struct.unpack_from("<I", r.buf, before)[0] if vtype == _ARRAY else None)
    _check_key_types(r, meta, types)
    alignment = meta.get("general.alignment", 32)
    if alignment == 0 or alignment & (alignment - 1):
        raise r.error(f"general.alignment {alignment} is not a power of two")
    if n_tensors * 24 > len(r.buf) - r.pos:  # name length 8 + n_dims 4 + type 4 + offset 8
        raise r.error(f"truncated: tensor count {n_tensors} needs at least {n_tensors * 24} bytes")
    infos = [_tensor_info(r) for _ in range(n_tensors)]
    data_start = -(-r.pos // alignment) * alignment
    tensors = _place(r, infos, data_start, alignment)
    _check_vocab(r, meta, tensors)
    return GGUFFile(r.path, version, alignment, meta, tensors)


def _check_key_types(r: _Reader, meta: dict[str, Any], types: dict[str, tuple[int, int | None]]) -> None:
    arch = meta.get("general.architecture")
    for pattern, want in _KEY_TYPES.items():
        key = pattern.format(arch=arch) if isinstance(arch, str) else pattern
        if key in types and types[key] != want:
            raise r.error(f"metadata {key!r} is {_type_name(*types[key])}, expected {_type_name(*want)}")


def _type_name(vtype: int, etype: int | None) -> str:
    name = _VALUE_NAMES.get(vtype, str(vtype))
    return f"{name}[{_VALUE_NAMES.get(etype, str(etype))}]" if vtype == _ARRAY else name


def _tensor_info(r: _Reader) -> tuple[str, tuple[int, ...], int, int, int]:
    name = r.string("tensor name")
    if not name or len(name.encode()) > _MAX_NAME:
        raise r.error(f"tensor name {name[:80]!r} is empty or longer than {_MAX_NAME} bytes")
    n_dims = r.scalar("I", f"n_dims of {name!r}")
    if n_dims > 4:
        raise r.error(f"tensor {name!r} has {n_dims} dimensions, at most 4 are allowed")
    dims = [r.scalar("Q", f"dims of {name!r}") for _ in range(n_dims)]  # innermost first
    n = 1
    for d in dims:
        n *= d
    if any(d > _INT64_MAX for d in dims) or n > _INT64_MAX:
        raise r.error(f"tensor {name!r} shape {dims} overflows int64")
    ggml_type = r.scalar("I", f"type of {name!r}")
    if ggml_type not in GGML_TYPES:
        raise r.error(f"tensor {name!r} has unknown ggml type {ggml_type}")
    type_name, block, size = GGML_TYPES[ggml_type]
    if dims and dims[0] % block:
        raise r.error(f"tensor {name!r}: row of {dims[0]} is not a multiple of the {type_name} block {block}")
    offset = r.scalar("Q", f"offset of {name!r}")
    return name, tuple(reversed(dims)), ggml_type, offset, n // block * size


def _place(r: _Reader, infos: list[tuple], data_start: int, alignment: int) -> list[GGUFTensor]:
    """Check names, alignment, bounds and overlaps of the tensor data; return absolute positions."""
    tensors, seen, file_size = [], set(), len(r.buf)
    for name, shape, ggml_type, offset, nbytes in infos:
        if name in seen:
            raise r.error(f"duplicate tensor name {name!r}")
        seen.add(name)
        if offset % alignment:
            raise r.error(f"tensor {name!r} offset {offset} is not a multiple of the alignment {alignment}")
        if data_start + offset + nbytes > file_size:
            raise r.error(f"truncated: tensor {name!r} needs bytes {data_start + offset}.."
                          f"{data_start + offset + nbytes}, the file has {file_size}")  # fmt: skip
        tensors.append(GGUFTensor(name, shape, GGML_TYPES[ggml_type][0], data_start + offset, nbytes))
    by_offset = sorted(tensors, key=lambda t: t.offset)
    for a, b in zip(by_offset, by_offset[1:], strict=False):
        if a.offset + a.nbytes > b.offset:
            raise r.error(f"tensors {a.name!r} and {b.name!r} overlap")
    return tensors


def _check_vocab(r: _Reader, meta: dict[str, Any], tensors: list[GGUFTensor]) -> None:
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is None:
        return
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        if key in meta and len(meta[key]) != len(tokens):
            raise r.error(f"{key} has {len(meta[key])} entries, tokenizer.ggml.tokens {len(tokens)}")
    for i, t in enumerate(meta.get("tokenizer.ggml.token_type", [])):
        if not 0 <= t <= 6:
            raise r.error(f"token {i} has unknown token type {t}")
        if t == 6 and not _BYTE_TOKEN.fullmatch(tokens[i]):
            raise r.error(f"byte token {i} is {tokens[i][:20]!r}, expected <0xNN> with two hex digits")
    for key in ("bos", "eos", "unknown", "padding", "eot"):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and token_id >= len(tokens):
            raise r.error(f"tokenizer.ggml.{key}_token_id {token_id} is outside the {len(tokens)} tokens")
    embd = next((t for t in tensors if t.name == "token_embd.weight"), None)
    if embd is not None and embd.shape[0] != len(tokens):
        raise r.error(f"token_embd.weight has {embd.shape[0]} rows but there are {len(tokens)} tokens")
