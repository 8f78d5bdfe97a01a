"""The guard: safety checks on the user's prompt and on the model's answer, around generation.

Where it sits: `gemmakit chat --guard FILE` (and the server later) asks `Guard.check_input` before
generating and feeds every streamed piece of the answer through an `OutputMonitor`; the checks call a
`classifier.Classifier` (the shipped nano-guard by default, a ShieldGemma checkpoint, or a user
function). Configuration is a TOML file (recipes/guard.toml): per-policy thresholds and actions for
input and output, the failure mode, the time budget and the streaming window.

Actions, most severe first: "block" (input: the prompt never reaches the model; output: the stream
stops, `finish_reason` "content_filter", nothing more is released), "redact" (the flagged sentences of
the prompt, or the flagged window of the answer, are replaced by a marker and the rest goes on),
"warn" (the text passes with a warning). Several checks firing take the most severe action.

Streaming: answer text is held back until the window holding it has been checked, every
`window_tokens` pieces, so a blocked answer stops within one window and no unchecked text is shown;
each check judges the answer's last `context_chars` characters (so a phrase cut by a window boundary
is still seen whole) as a prompt-response pair with the user's prompt.

Failure (reference reliability-tests §7): fail-CLOSED by default. A classifier that raises, or does
not answer within `timeout_s` (its late verdict is ignored), blocks and says "safety check
unavailable", counted in `stats` and logged at error level; `fail_mode = "open"` lets the text through
instead, logged at critical level and marked on the verdict (`fail_open`). An answer that is not one
probability in [0, 1] per policy is treated as unsafe in both modes (G3): never as safe.
`GEMMAKIT_GUARD_FAIL_MODE` and `GEMMAKIT_GUARD_TIMEOUT_S` override the file; `effective()` reports
the values in force (G5).

Key trade-off: checking in windows adds the classifier's latency to every window (measured on the
2-core Xeon with nano-guard: see README "Guarded chat") and delays the visible text by up to one
window, in exchange for never showing text that has not been checked.
"""

from __future__ import annotations

import concurrent.futures
import importlib
import logging
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from gemmakit.config import read_toml
from gemmakit.data.safety_filters import split_chunks
from gemmakit.errors import UserError
from gemmakit.safety.classifier import Item, load_classifier
from gemmakit.safety.policy import HARMS, Policy, get_policy, parse_policies

log = logging.getLogger(__name__)

ACTIONS = ("block", "redact", "warn")  # most severe first
FAIL_MODES = ("closed", "open")
ENV_FAIL_MODE, ENV_TIMEOUT = "GEMMAKIT_GUARD_FAIL_MODE", "GEMMAKIT_GUARD_TIMEOUT_S"

Scorer = Callable[[list[Item], list[Policy]], list[dict[str, float]]]


class GuardError(UserError):
    """A guard file or setting is invalid; the message names the file, key and what was expected."""


class _ClassifierFailure(Exception):
    """The classifier raised or timed out (handled per fail_mode); never raised to the caller."""


class _UnsafeAnswer(Exception):
    """The classifier's answer is unusable (not a probability per policy): treated as unsafe."""


@dataclass(frozen=True)
class Check:
    """One policy checked on one side (input or output)."""

    policy: str  # a harm type of policy.HARMS or a [policies.NAME] of the guard file
    threshold: float = 0.5  # fires when P(violation) > threshold
    action: str = "block"  # "block", "redact" or "warn"


def _all_harms() -> tuple[Check, ...]:
    return tuple(Check(name) for name in HARMS)


@dataclass(frozen=True)
class GuardConfig:
    """The guard file's [guard] table plus its [[input]] and [[output]] checks and [policies.NAME]."""

    # "" = the shipped nano-guard; a model directory (a ShieldGemma checkpoint, or any Gemma with the
    # "Yes"/"No" pieces); or "package.module:function" with the Classifier.score signature, trusted like code.
    classifier: str = ""
    fail_mode: str = "closed"  # "closed": classifier errors and timeouts block; "open": they pass, logged
    # Seconds one check may take. 10: nano-guard judges 4 policies in ~0.3 s on 2 cores; a
    # ShieldGemma 2B in bf16 on CPU needs a few seconds for a long answer.
    timeout_s: float = 10.0
    window_tokens: int = 16  # streamed answer pieces per output check (also the most text held back)
    context_chars: int = 1200  # the answer's tail each output check judges, about 300 tokens
    refusal: str = "I can't help with that."  # what the user sees instead of a blocked prompt or answer
    redaction: str = "[redacted]"  # replaces a redacted sentence or answer window
    input: tuple[Check, ...] = field(default_factory=_all_harms)  # checks on the user's prompt
    output: tuple[Check, ...] = field(default_factory=_all_harms)  # checks on the model's answer
    policies: dict[str, Policy] = field(default_factory=dict)  # user policies the checks may name

    def __post_init__(self) -> None:
        if self.fail_mode not in FAIL_MODES:
            raise GuardError(f"fail_mode: {self.fail_mode!r}; expected one of {', '.join(FAIL_MODES)}")
        if not (
            isinstance(self.timeout_s, int | float) and math.isfinite(self.timeout_s) and self.timeout_s > 0
        ):
            raise GuardError(f"timeout_s: {self.timeout_s!r}; expected a number of seconds > 0")
        for name in ("window_tokens", "context_chars"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GuardError(f"{name}: {value!r}; expected an integer >= 1")
        for side in ("input", "output"):
            for i, c in enumerate(getattr(self, side)):
                at = f"{side}[{i}]"
                if c.action not in ACTIONS:
                    raise GuardError(f"{at}.action: {c.action!r}; expected one of {', '.join(ACTIONS)}")
                if not (isinstance(c.threshold, int | float) and 0.0 <= c.threshold < 1.0):
                    raise GuardError(f"{at}.threshold: {c.threshold!r}; expected a probability in [0, 1)")
                try:
                    get_policy(c.policy, self.policies)
                except UserError as e:
                    raise GuardError(f"{at}.policy: {e}") from None

    def effective(self) -> dict[str, Any]:
        """The settings in force, as JSON-ready data (what `gemmakit guard show` prints)."""
        d = asdict(self)
        d["policies"] = {k: {"title": p.title, "definition": p.definition} for k, p in self.policies.items()}
        return d


_GUARD_KEYS = {
    "classifier",
    "fail_mode",
    "timeout_s",
    "window_tokens",
    "context_chars",
    "refusal",
    "redaction",
}
_CHECK_KEYS = {"policy", "threshold", "action"}


def _checks(rows: Any, where: str) -> tuple[Check, ...]:
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise GuardError(
            f"{where}: expected [[{where.rsplit(' ', 1)[-1]}]] tables with policy, threshold, action"
        )
    out = []
    for i, r in enumerate(rows):
        unknown = sorted(set(r) - _CHECK_KEYS)
        if unknown:
            raise GuardError(
                f"{where}[{i}]: unknown key {unknown[0]!r}; expected {', '.join(sorted(_CHECK_KEYS))}"
            )
        if not isinstance(r.get("policy"), str):
            raise GuardError(f"{where}[{i}].policy: expected a policy name, got {r.get('policy')!r}")
        threshold = r.get("threshold", 0.5)
        if isinstance(threshold, bool) or not isinstance(threshold, int | float):
            raise GuardError(f"{where}[{i}].threshold: expected a number, got {threshold!r}")
        out.append(Check(r["policy"], float(threshold), r.get("action", "block")))
    return tuple(out)


def load_guard_config(path: str | Path, env: dict[str, str] | None = None) -> GuardConfig:
    """The guard file at `path`, with the environment's overrides (`env`: os.environ by default)."""
    data = read_toml(path, GuardError)
    unknown = sorted(set(data) - {"guard", "input", "output", "policies"})
    if unknown:
        raise GuardError(f"{path}: unknown top-level key {unknown[0]!r}; expected [guard], [[input]], "
                         "[[output]], [policies.NAME]")  # fmt: skip
    table = data.get("guard", {})
    if not isinstance(table, dict):
        raise GuardError(f"{path}: [guard] must be a table")
    bad = sorted(set(table) - _GUARD_KEYS)
    if bad:
        raise GuardError(
            f"{path}: guard.{bad[0]}: unknown key; expected one of {', '.join(sorted(_GUARD_KEYS))}"
        )
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        want = int if key in ("window_tokens", "context_chars") else float if key == "timeout_s" else str
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not want:
            raise GuardError(f"{path}: guard.{key}: expected {want.__name__}, got {value!r}")
        kwargs[key] = value
    env = os.environ if env is None else env
    if env.get(ENV_FAIL_MODE):
        kwargs["fail_mode"] = env[ENV_FAIL_MODE]
    if env.get(ENV_TIMEOUT):
        try:
            kwargs["timeout_s"] = float(env[ENV_TIMEOUT])
        except ValueError:
            raise GuardError(f"{ENV_TIMEOUT}={env[ENV_TIMEOUT]!r}: expected a number of seconds") from None
    if "input" in data:
        kwargs["input"] = _checks(data["input"], f"{path}: input")
    if "output" in data:
        kwargs["output"] = _checks(data["output"], f"{path}: output")
    kwargs["policies"] = parse_policies(data.get("policies", {}), f"{path}: policies")
    try:
        return GuardConfig(**kwargs)
    except GuardError as e:
        raise GuardError(f"{path}: {e}") from None


@dataclass(frozen=True)
class Verdict:
    """The outcome of one check: what to do, the scores, and why."""

    action: str  # "allow", "warn", "redact" or "block"
    scores: dict[str, float] = field(default_factory=dict)  # policy -> P(violation) (empty on failure)
    flagged: tuple[str, ...] = ()  # policies over their threshold
    error: str = ""  # why the classifier gave no usable answer ("" when it did)
    fail_open: bool = False  # the classifier failed and fail_mode "open" let the text through
    text: str | None = None  # the redacted text, for action "redact"

    @property
    def blocked(self) -> bool:
        return self.action == "block"

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's finish_reason for a stopped answer: "content_filter" when blocked."""
        return "content_filter" if self.blocked else None

    def describe(self) -> str:
        """One line for logs and the chat's stderr."""
        if self.error:
            return f"{'passed (fail-open)' if self.fail_open else 'blocked'}: {self.error}"
        hits = ", ".join(f"{p} {self.scores[p]:.2f}" for p in self.flagged)
        return f"{self.action}: {hits}" if hits else "allow"


def _import_scorer(spec: str) -> Scorer:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # the module failed to import or raised while importing
        raise GuardError(
            f"classifier: {spec!r}: cannot import {module_name!r} ({type(e).__name__}: {e})"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise GuardError(f"classifier: {spec!r}: {module_name} has no callable {attr!r}")
    return fn


class Guard:
    """Input and output checks under one `GuardConfig`; `scorer` replaces the configured classifier."""

    def __init__(self, config: GuardConfig, scorer: Scorer | None = None) -> None:
        self.config = config
        if scorer is None:
            spec = config.classifier
            if ":" in spec and not Path(spec).exists():
                scorer = _import_scorer(spec)
            else:
                scorer = load_classifier(spec or None).score
        self._scorer = scorer
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="guard")
        self._lock = threading.Lock()
        self.stats = {"checks": 0, "blocked": 0, "redacted": 0, "warned": 0, "errors": 0, "timeouts": 0,
                      "unsafe_answers": 0, "fail_open": 0}  # fmt: skip

    # ---- scoring --------------------------------------------------------------------------------
    def _policies(self, checks: Sequence[Check]) -> list[Policy]:
        return [get_policy(c.policy, self.config.policies) for c in checks]

    def _score(self, items: list[Item], checks: Sequence[Check]) -> list[dict[str, float]]:
        """Scores per item, or _ClassifierFailure (raised / timed out) or _UnsafeAnswer (unusable)."""
        policies = self._policies(checks)
        future = self._pool.submit(self._scorer, items, policies)
        try:
            rows = future.result(timeout=self.config.timeout_s)
        except concurrent.futures.TimeoutError:
            self.stats["timeouts"] += 1
            # the worker may still be running: give later checks a fresh one, drop this verdict
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="guard")
            raise _ClassifierFailure(
                f"safety check unavailable: classifier exceeded {self.config.timeout_s:g} s"
            ) from None
        except Exception as e:  # any classifier failure is handled per fail_mode, never passed silently
            raise _ClassifierFailure(
                f"safety check unavailable: classifier failed ({type(e).__name__}: {e})"
            ) from None
        names = [p.name for p in policies]
        if not isinstance(rows, list | tuple) or len(rows) != len(items):
            raise _UnsafeAnswer(f"classifier answered {type(rows).__name__} for {len(items)} texts")
        for row in rows:
            for name in names:
                p = row.get(name) if isinstance(row, dict) else None
                if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p <= 1.0:
                    raise _UnsafeAnswer(f"classifier answered {p!r} for {name}; expected a probability")
        return [{n: float(r[n]) for n in names} for r in rows]

    def _judge(self, items: list[Item], checks: Sequence[Check]) -> Verdict | list[dict[str, float]]:
        """Scores, or the Verdict of a failed check (blocked, or fail-open)."""
        with self._lock:
            self.stats["checks"] += 1
        try:
            return self._score(items, checks)
        except _UnsafeAnswer as e:
            self.stats["unsafe_answers"] += 1
            self.stats["blocked"] += 1
            log.error("guard: unusable classifier answer, treated as unsafe: %s", e)
            return Verdict("block", error=f"unusable classifier answer, treated as unsafe: {e}")
        except _ClassifierFailure as e:
            self.stats["errors"] += 1
            if self.config.fail_mode == "open":
                self.stats["fail_open"] += 1
                log.critical("guard: %s; fail_mode is 'open', so the text passes UNCHECKED", e)
                return Verdict("allow", error=str(e), fail_open=True)
            self.stats["blocked"] += 1
            log.error("guard: %s; blocked (fail_mode 'closed')", e)
            return Verdict("block", error=str(e))

    def _verdict(self, scores: dict[str, float], checks: Sequence[Check]) -> Verdict:
        fired = [c for c in checks if scores[c.policy] > c.threshold]
        action = next((a for a in ACTIONS if any(c.action == a for c in fired)), "allow")
        flagged = tuple(dict.fromkeys(c.policy for c in fired))
        key = {"block": "blocked", "redact": "redacted", "warn": "warned"}.get(action)
        if key:
            self.stats[key] += 1
        return Verdict(action, scores, flagged)

    # ---- the two sides --------------------------------------------------------------------------
    def check_input(self, prompt: str) -> Verdict:
        """The verdict on a user prompt; for "redact", `text` holds the prompt with its flagged
        sentences replaced by the marker (each sentence judged alone)."""
        checks = self.config.input
        if not checks:
            return Verdict("allow")
        got = self._judge([Item(prompt)], checks)
        if isinstance(got, Verdict):
            return got
        verdict = self._verdict(got[0], checks)
        if verdict.action != "redact":
            return verdict
        redacting = [c for c in checks if c.action == "redact"]
        pieces = split_chunks(prompt, 400)
        per = self._judge([Item(p) for p in pieces], redacting)
        if isinstance(per, Verdict):
            return per
        kept = [self.config.redaction if any(s[c.policy] > c.threshold for c in redacting) else p
                for p, s in zip(pieces, per, strict=True)]  # fmt: skip
        if all(k == self.config.redaction for k in kept):  # nothing left to answer
            return replace(verdict, action="block")
        return replace(verdict, text=" ".join(kept))

    def check_output(self, prompt: str, response: str) -> Verdict:
        """The verdict on a whole (non-streamed) answer to `prompt`."""
        checks = self.config.output
        if not checks:
            return Verdict("allow")
        got = self._judge([Item(prompt, response[-self.config.context_chars :])], checks)
        return got if isinstance(got, Verdict) else self._verdict(got[0], checks)

    def monitor(self, prompt: str) -> OutputMonitor:
        """A fresh monitor for one streamed answer to `prompt`."""
        return OutputMonitor(self, prompt)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class OutputMonitor:
    """Holds streamed answer text back until it has been checked; see the module docstring.

    `push(piece)` returns the text now safe to show (often ""); `finish()` checks what is left and
    returns it. Once `stopped`, the answer was blocked: stop generating, `verdict` says why.
    """

    def __init__(self, guard: Guard, prompt: str) -> None:
        self.guard, self.prompt = guard, prompt
        self.released = ""  # text shown so far (with redaction markers)
        self._raw = ""  # the model's text since the last redaction, judged as context
        self._pending: list[str] = []
        self.verdict = Verdict("allow")
        self.warnings: list[Verdict] = []
        self.stopped = False

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        self._pending.append(piece)
        if len(self._pending) < self.guard.config.window_tokens:
            return ""
        return self._check()

    def finish(self) -> str:
        return self._check() if self._pending and not self.stopped else ""

    def _check(self) -> str:
        window = "".join(self._pending)
        self._pending = []
        cfg = self.guard.config
        if not cfg.output:
            self.released += window
            return window
        judged = (self._raw + window)[-cfg.context_chars :]
        got = self.guard._judge([Item(self.prompt, judged)], cfg.output)
        verdict = got if isinstance(got, Verdict) else self.guard._verdict(got[0], cfg.output)
        self.verdict = verdict
        if verdict.blocked:
            self.stopped = True
            return ""
        if verdict.action == "redact":
            self._raw = ""
            out = cfg.redaction
        else:
            if verdict.action == "warn" or verdict.fail_open:
                self.warnings.append(verdict)
            self._raw += window
            out = window
        self.released += out
        return out


def load_guard(path: str | Path, scorer: Scorer | None = None) -> Guard:
    """A `Guard` for the file at `path` (environment overrides applied)."""
    return Guard(load_guard_config(path), scorer)
