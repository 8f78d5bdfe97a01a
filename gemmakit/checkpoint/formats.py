"""Weight files: content-based format detection, safetensors header validation, weights-only unpickling.

Where it sits: under `load` (and `save`, which shares the error type and dtype table); hashing
is `gemmakit.artifact.sha256_file`.
Formats are told apart by content, never by file name (`detect_format`): safetensors is an 8-byte
little-endian header length followed by a JSON object; a PyTorch zip pickle starts `PK\\x03\\x04`;
a legacy pickle starts with the protocol byte `\\x80`. Pickles are only opened with
`torch.load(weights_only=True)` and never from a slot that must hold safetensors. The safetensors
header is validated here before the library sees it, so a header length of 2**40 is refused before
anything is allocated. Problems are reported as ONE `CheckpointError` line naming the file.

Key trade-off: tensors are opened lazily and memory-mapped (safetensors via `safe_open`, zip
pickles via `torch.load(mmap=True)`), so opening a checkpoint reads only headers; legacy pickles
cannot be mapped and are read into memory whole.
"""

from __future__ import annotations

import json
import math
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gemmakit.errors import UserError

_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit on header bytes
_USABLE = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class CheckpointError(UserError):
    """A checkpoint cannot be read or written; the message is one line naming the file and problems."""


def checkpoint_error(where: Path | str, problems: str | list[str]) -> CheckpointError:
    """The one-line CheckpointError `WHERE: problem` (or `WHERE: N problems: a; b`), whitespace folded."""
    items = [problems] if isinstance(problems, str) else problems
    items = [" ".join(p.split()) for p in items]  # one line, always
    body = items[0] if len(items) == 1 else f"{len(items)} problems: " + "; ".join(items)
    return CheckpointError(f"{where}: {body}")


_err = checkpoint_error  # the short name this package's modules use


# ---- format detection and safetensors header validation ------------------------------------------


def detect_format(path: str | Path) -> str:
    """'safetensors', 'torch_zip' or 'pickle' from the first bytes; anything else is a CheckpointError."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise _err(path, e.strerror or str(e)) from None
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        return "torch_zip"
    if head.startswith(b"\x80"):
        return "pickle"
    what = "empty file" if not head else f"first bytes {head.hex()} ({path.stat().st_size} bytes in all)"
    raise _err(path, f"unknown format: not safetensors, a PyTorch zip or a pickle ({what})")


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


@dataclass
class _Info:
    """One stored tensor, known from its header before any data is read."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    stored_name: str  # the name in the file (multimodal prefixes included), used in messages


def _header_entry(name: str, e: Any) -> tuple[torch.dtype | None, list[int], int, str | None]:
    """(dtype, shape, end offset, problem) for one safetensors header entry."""
    if not (
        isinstance(e, dict) and isinstance(e.get("shape"), list) and isinstance(e.get("data_offsets"), list)
    ):
        return None, [], 0, f"{name}: malformed header entry {json.dumps(e)[:80]}"
    shape, offs, dt = e["shape"], e["data_offsets"], _ST_DTYPES.get(e.get("dtype"))
    if not all(isinstance(x, int) and x >= 0 for x in shape + offs) or len(offs) != 2 or offs[0] > offs[1]:
        return None, [], 0, f"{name}: malformed shape {shape} or data_offsets {offs}"
    if dt is None:
        return None, [], 0, f"{name}: unknown dtype {e.get('dtype')!r}"
    need = math.prod(shape) * dt.itemsize
    if offs[1] - offs[0] != need:
        return (
            None,
            [],
            0,
            f"{name}: data_offsets {offs} hold {offs[1] - offs[0]} bytes, {e['dtype']} x {shape} needs {need}",
        )
    return dt, shape, offs[1], None


def read_safetensors_header(path: str | Path) -> dict[str, _Info]:
    """Validate a safetensors header against the file size and return its tensors, reading no data."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _err(path, f"truncated: expected at least 8 bytes, got {size}")
        (n,) = struct.unpack("<Q", head)
        if n >= _MAX_HEADER:
            raise _err(path, f"safetensors header length {n} exceeds the {_MAX_HEADER} byte limit")
        if n > size - 8:
            raise _err(path, f"truncated: header length {n} needs {n + 8} bytes, got {size}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _err(path, f"safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise _err(path, f"safetensors header is a JSON {type(header).__name__}, expected an object")
    problems, infos, ends, data_len = [], {}, {}, size - 8 - n
    for name, e in header.items():
        if name == "__metadata__":
            continue
        dt, shape, end, problem = _header_entry(name, e)
        if problem:
            problems.append(problem)
        else:
            infos[name], ends[name] = _Info(dt, tuple(shape), path, name), end
    past = [k for k, end in ends.items() if end > data_len]
    if past:
        expected = 8 + n + max(ends.values())
        problems.insert(
            0,
            f"truncated: expected {expected} bytes, got {size} (data of {', '.join(past)} lies past the end)",
        )
    if problems:
        raise _err(path, problems)
    return infos


# ---- opening weight files --------------------------------------------------------------------


@dataclass
class _Store:
    """The tensors of one checkpoint (one or more files), by stored name; data is read lazily."""

    infos: dict[str, _Info] = field(default_factory=dict)
    loaded: dict[str, torch.Tensor] = field(default_factory=dict)  # torch files: mmap-backed already
    handles: dict[Path, Any] = field(default_factory=dict)  # open safetensors files (tensors outlive them)

    def fetch(self, name: str) -> torch.Tensor:
        if name in self.loaded:
            return self.loaded[name]
        from safetensors import SafetensorError, safe_open

        info = self.infos[name]
        try:
            if info.file not in self.handles:
                self.handles[info.file] = safe_open(str(info.file), framework="pt")
            return self.handles[info.file].get_tensor(name)
        except SafetensorError as e:
            raise _err(info.file, f"corrupt safetensors file ({e})") from None

    def release(self, name: str) -> None:
        """Unmap the safetensors file holding `name` once no view into it is kept (cast loads).

        Touched pages of a mapped file count in RSS while mapped: a bf16 -> fp32 load of a 5 GB file
        would otherwise peak at 15 GB (10 GB of copies + 5 GB of mapped source) instead of ~11 GB.
        The next `fetch` reopens the file (a header parse: ~1 ms).
        """
        self.handles.pop(self.infos[name].file, None)


def _torch_load(path: Path, fmt: str) -> dict[str, torch.Tensor]:
    """A state dict from a zip or legacy pickle, through the weights-only unpickler only."""
    try:  # mmap needs the zip layout; legacy pickles are read into memory
        with warnings.catch_warnings():  # torch warns about protocol-4 pickles: noise beside our one line
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=fmt == "torch_zip")
    except Exception as e:  # the unpickler raises many types; all mean "not a weights file we accept"
        lines = [ln.strip() for ln in str(e).splitlines() if "WeightsUnpickler error" in ln]
        why = lines[0] if lines else (str(e).splitlines() or [type(e).__name__])[0]
        raise _err(path, f"refused or failed to load as weights-only {fmt} ({why})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model_state_dict"), dict):
        obj = obj["model_state_dict"]
    if not isinstance(obj, dict):
        raise _err(path, f"expected a state dict, found a {type(obj).__name__}")
    bad = [str(k) for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise _err(path, f"expected name -> tensor entries, found non-tensor entries {bad}")
    return obj


def open_store(files: list[Path], safetensors_only: bool, where: Path) -> _Store:
    """The tensors of `files` (names, dtypes, shapes; data fetched lazily), told apart by content.

    `safetensors_only` refuses any pickle; a tensor stored twice, like any other problem, is one
    CheckpointError naming `where`.
    """
    store, problems = _Store(), []
    for path in files:
        fmt = detect_format(path)
        if safetensors_only and fmt != "safetensors":
            raise _err(path, f"not a safetensors file (its content is a {fmt}); refusing to unpickle it")
        if fmt == "safetensors":
            infos = read_safetensors_header(path)
        else:
            tensors = _torch_load(path, fmt)
            infos = {k: _Info(t.dtype, tuple(t.shape), path, k) for k, t in tensors.items()}
            store.loaded.update(tensors)
        for k, info in infos.items():
            if k in store.infos:
                problems.append(f"tensor {k} is stored twice ({store.infos[k].file.name}, {path.name})")
            store.infos[k] = info
    if problems:
        raise _err(where, problems)
    return store
