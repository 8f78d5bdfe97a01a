"""Reading JSONL input files: one JSON value per line, every failure one line naming file:line.

Where it sits: at the bottom with `config` and `artifact`; the chat (SFT), preference, prompt and
answer-file readers of `train`, `data` and `eval` parse their rows from what `read_jsonl` returns and
raise their own error class, so a user sees the same messages whichever command read the file.

Key trade-off: the whole file is read into memory before parsing (these are training and evaluation
sets of at most some hundred MB); streaming would let a bad last line surface only after the first
rows were used, and these readers validate everything before any compute starts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gemmakit.errors import UserError


def read_jsonl(path: str | Path, error: type[UserError], what: str) -> list[tuple[Any, str]]:
    """(parsed value, "file:line") for every non-blank line of `path` (UTF-8, a BOM accepted).

    A directory, a missing or unreadable file, text that is not UTF-8, a line that is not JSON (or is
    nested too deeply to parse) and a file without rows raise `error` with one line; `what` names the
    expected content in messages ("chat", "preference pairs", ...)."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{path}: is a directory; expected a {what} JSONL file")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise error(f"{path}:{i}: not valid JSON ({e})") from None
        except RecursionError:
            raise error(f"{path}:{i}: JSON nested too deeply") from None
        out.append((obj, f"{path}:{i}"))
    if not out:
        raise error(f"{path}: no rows (the file is empty or blank); expected {what} JSONL")
    return out
