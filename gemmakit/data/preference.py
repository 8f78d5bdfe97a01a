"""Preference and prompt-only data in TRL's formats: JSONL rows -> `PreferencePair` / `PromptRow`.

Where it sits: read by the reward, DPO and RL trainers (`train.*`) and by the data pipeline's
`format = "preference"` sources (`data.sources`), so a pair is parsed and checked the same way
wherever it is read. Formats (TRL `docs/source/dataset_formats.md`):
- preference, explicit prompt: `{"prompt", "chosen", "rejected"}`, all strings ("standard") or all
  lists of {"role", "content"} messages ("conversational"). A string prompt becomes one user message
  and each string answer one assistant message, as `train.sft` reads {"prompt", "completion"};
- preference, implicit prompt: `{"chosen", "rejected"}` holding whole conversations; the prompt is
  their longest common message prefix (TRL's `extract_prompt`), the answers what follows it. Text
  rows need an explicit prompt: there is no message boundary to split a string at;
- an optional finite numeric `"margin"` (the reward model's per-pair margin); other keys are ignored;
- prompt-only (RLOO / GRPO): `{"messages": [...]}`, `{"prompt": "text"}` or `{"prompt": [...]}`; every
  other key is kept in `PromptRow.extra` (e.g. `"answer": 7` for a verifiable reward).
Every prompt ends with a user turn and every answer is a non-empty list ending with an assistant or
model turn; roles are kept as given. Messages are normalised to exactly {"role", "content"}.

Key trade-off: files are read whole and the first bad row raises (a `PreferenceDataError` naming
file:line, the field and what was expected), unlike the pipeline's sources, which quarantine bad
lines and go on: a training set is small next to a corpus, and a silently shorter one would change
the run. The pipeline calls `parse_preference` per line and quarantines what it rejects.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gemmakit.errors import UserError
from gemmakit.jsonl import read_jsonl

ROLES = ("user", "assistant", "model", "system")
ANSWER_ROLES = ("assistant", "model")  # the speaker a chosen / rejected answer must end with
_PAIR_KEYS = ("prompt", "chosen", "rejected")


class PreferenceDataError(UserError):
    """A preference or prompt JSONL file or row is unusable; names file:line, the field, what was expected."""


@dataclass(frozen=True)
class PreferencePair:
    """One preference pair, conversational: the prompt, then each answer's messages after it."""

    prompt: tuple[dict, ...]  # messages {"role", "content"}, ending with a user turn
    chosen: tuple[dict, ...]  # the preferred completion (usually one assistant message)
    rejected: tuple[dict, ...]  # the dispreferred completion
    margin: float | None = None  # optional per-pair margin (TRL's RewardTrainer `margin` column)


@dataclass(frozen=True)
class PromptRow:
    """One prompt for RL: the conversation so far and the row's other fields (answers, metadata)."""

    messages: tuple[dict, ...]  # ends with a user turn
    extra: dict  # the row's other fields, JSON values


def _message(m: object, where: str, field: str, i: int) -> dict:
    if not isinstance(m, dict):
        raise PreferenceDataError(f"{where}: {field}[{i}]: expected a {{role, content}} object, got "
                                  f"{type(m).__name__}")  # fmt: skip
    role, content = m.get("role"), m.get("content")
    if not isinstance(role, str) or role not in ROLES:
        raise PreferenceDataError(f"{where}: {field}[{i}].role: expected one of {', '.join(ROLES)}, "
                                  f"got {role!r}")  # fmt: skip
    if not isinstance(content, str):
        raise PreferenceDataError(f"{where}: {field}[{i}].content: expected a string, got "
                                  f"{type(content).__name__}")  # fmt: skip
    return {"role": role, "content": content}


def _messages(value: object, where: str, field: str) -> tuple[dict, ...]:
    if not isinstance(value, list):
        raise PreferenceDataError(f"{where}: {field}: expected a list of {{role, content}} messages, got "
                                  f"{type(value).__name__}")  # fmt: skip
    if not value:
        raise PreferenceDataError(f"{where}: {field}: expected at least one message, got an empty list")
    return tuple(_message(m, where, field, i) for i, m in enumerate(value))


def _check_prompt(msgs: tuple[dict, ...], where: str, field: str) -> None:
    if not msgs:
        raise PreferenceDataError(f"{where}: {field}: expected at least one message, got none")
    if msgs[-1]["role"] != "user":
        raise PreferenceDataError(f"{where}: {field}: must end with a user turn, ends with "
                                  f"{msgs[-1]['role']!r}")  # fmt: skip


def _check_answer(msgs: tuple[dict, ...], where: str, field: str) -> None:
    if not msgs:
        raise PreferenceDataError(f"{where}: {field}: no messages after the prompt")
    if msgs[-1]["role"] not in ANSWER_ROLES:
        raise PreferenceDataError(f"{where}: {field}: must end with an assistant or model turn, ends "
                                  f"with {msgs[-1]['role']!r}")  # fmt: skip


def _margin(obj: dict, where: str) -> float | None:
    if "margin" not in obj or obj["margin"] is None:
        return None
    m = obj["margin"]
    if isinstance(m, bool) or not isinstance(m, int | float) or not math.isfinite(m):
        raise PreferenceDataError(f"{where}: margin: expected a finite number, got {m!r}")
    return float(m)


def _implicit(obj: dict, where: str) -> tuple[tuple[dict, ...], tuple[dict, ...], tuple[dict, ...]]:
    """(prompt, chosen, rejected) of a row without "prompt": the longest common message prefix."""
    chosen, rejected = obj["chosen"], obj["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):
        raise PreferenceDataError(f"{where}: prompt: missing; text rows need a prompt (only message lists "
                                  "can be split into prompt and answer)")  # fmt: skip
    c, r = _messages(chosen, where, "chosen"), _messages(rejected, where, "rejected")
    n = 0
    while n < min(len(c), len(r)) and c[n] == r[n]:
        n += 1
    if n == 0:
        raise PreferenceDataError(f"{where}: prompt: missing, and chosen and rejected share no first "
                                  "message to take it from")  # fmt: skip
    for key, rest in (("chosen", c[n:]), ("rejected", r[n:])):
        if not rest:
            raise PreferenceDataError(f"{where}: {key}: no messages after the prompt (the prompt is missing "
                                      "and taken as the messages chosen and rejected share)")  # fmt: skip
    return c[:n], c[n:], r[n:]


def parse_preference(obj: object, where: str) -> PreferencePair:
    """A PreferencePair from one parsed JSON row (`where` = "file:line" for messages)."""
    if not isinstance(obj, dict):
        raise PreferenceDataError(f'{where}: expected a JSON object {{"prompt", "chosen", "rejected"}}, '
                                  f"got {type(obj).__name__}")  # fmt: skip
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise PreferenceDataError(f"{where}: {key}: missing (a preference row needs chosen and rejected)")
    if "prompt" not in obj:
        prompt, chosen, rejected = _implicit(obj, where)
    else:
        values = [obj[k] for k in _PAIR_KEYS]
        for key, v in zip(_PAIR_KEYS, values, strict=True):
            if not isinstance(v, str | list):
                raise PreferenceDataError(f"{where}: {key}: expected a string or a list of messages, got "
                                          f"{type(v).__name__}")  # fmt: skip
        if all(isinstance(v, str) for v in values):
            prompt = ({"role": "user", "content": obj["prompt"]},)
            chosen = ({"role": "assistant", "content": obj["chosen"]},)
            rejected = ({"role": "assistant", "content": obj["rejected"]},)
        elif any(isinstance(v, str) for v in values):
            kinds = ", ".join(f"{k} {'string' if isinstance(v, str) else 'list'}"
                              for k, v in zip(_PAIR_KEYS, values, strict=True))  # fmt: skip
            raise PreferenceDataError(f"{where}: prompt, chosen and rejected must be all strings or all "
                                      f"message lists, got {kinds}")  # fmt: skip
        else:
            prompt, chosen, rejected = (_messages(obj[k], where, k) for k in _PAIR_KEYS)
    _check_prompt(prompt, where, "prompt")
    _check_answer(chosen, where, "chosen")
    _check_answer(rejected, where, "rejected")
    return PreferencePair(prompt, chosen, rejected, _margin(obj, where))


def parse_prompt(obj: object, where: str) -> PromptRow:
    """A PromptRow from one parsed JSON row: {"messages": [...]} or {"prompt": str | [...]}, plus extras."""
    if not isinstance(obj, dict):
        raise PreferenceDataError(f'{where}: expected a JSON object {{"messages": [...]}} or '
                                  f'{{"prompt": ...}}, got {type(obj).__name__}')  # fmt: skip
    if "messages" in obj and "prompt" in obj:
        raise PreferenceDataError(f"{where}: expected one of messages or prompt, got both")
    if "messages" in obj:
        key = "messages"
        msgs = _messages(obj[key], where, key)
    elif "prompt" in obj:
        key, value = "prompt", obj["prompt"]
        if isinstance(value, str):
            msgs = ({"role": "user", "content": value},)
        elif isinstance(value, list):
            msgs = _messages(value, where, key)
        else:
            raise PreferenceDataError(f"{where}: prompt: expected a string or a list of messages, got "
                                      f"{type(value).__name__}")  # fmt: skip
    else:
        raise PreferenceDataError(f'{where}: expected {{"messages": [...]}} or {{"prompt": ...}}, got keys '
                                  f"{sorted(obj)}")  # fmt: skip
    _check_prompt(msgs, where, key)
    extra = {k: v for k, v in obj.items() if k != key}
    for k, v in extra.items():
        try:
            json.dumps(v, allow_nan=False)
        except (TypeError, ValueError):
            raise PreferenceDataError(f"{where}: {k}: expected a JSON value (no NaN or infinity), got "
                                      f"{type(v).__name__}") from None  # fmt: skip
    return PromptRow(msgs, extra)


def _rows(path: str | Path, what: str) -> list[tuple[Any, str]]:
    """(parsed JSON, "file:line") for every non-blank line; one-line errors for unreadable files."""
    return read_jsonl(path, PreferenceDataError, what)


def read_preference_jsonl(path: str | Path) -> list[PreferencePair]:
    """Every preference pair of a JSONL file; the first bad row raises PreferenceDataError (file:line)."""
    return [parse_preference(obj, where) for obj, where in _rows(path, "preference")]


def read_prompt_jsonl(path: str | Path) -> list[PromptRow]:
    """Every prompt row of a JSONL file; the first bad row raises PreferenceDataError (file:line)."""
    return [parse_prompt(obj, where) for obj, where in _rows(path, "prompt")]


def pair_record(pair: PreferencePair) -> dict[str, Any]:
    """The normalised JSONL row of a pair (conversational, explicit prompt, margin when present):
    what the data pipeline writes and `parse_preference` reads back to an equal pair."""
    row: dict[str, Any] = {k: [dict(m) for m in getattr(pair, k)] for k in _PAIR_KEYS}
    if pair.margin is not None:
        row["margin"] = pair.margin
    return row
