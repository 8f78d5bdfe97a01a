"""The OpenAI wire format: request bodies checked into `Job`s, generated tokens turned into choices.

Where it sits: between `server.app` (HTTP, SSE) and `infer.batching` (tokens); it knows the chat
template (`chat.render`) and the tokenizer, nothing about HTTP. Every check raises `ApiError` with the
field (`param`) and what was expected, which the app answers as OpenAI's error object with status 400
(or 404 for an unknown model): clients see `{"error": {"message", "type", "param", "code"}}`.

Choices made where OpenAI's API is loose or servers differ (see README, Serving):
- Unknown fields are errors, not ignored (vLLM and llama.cpp ignore them): a misspelt `max_token`
  would otherwise silently generate the default length. Fields OpenAI defines that this server does
  not implement (tools, penalties other than 0) are errors too.
- NaN, Infinity and duplicate keys in the JSON are errors (Python's json module accepts them).
- `top_k` (not in OpenAI's API) is accepted as vLLM and llama.cpp do; 0 or -1 means off.
- Text prompts get <bos> as the first token (llama.cpp, HF); token-id prompts are used as given.
- A prompt plus `max_tokens` longer than the context is a 400 naming both numbers; nothing is ever
  truncated. Without `max_tokens`, chat generates up to the context's end, completions 16 tokens.

Key trade-off: a hand-written checker instead of pydantic models: every message names the field and
the expected value in one line, and 422-vs-400 mapping, NaN and duplicate keys are under our control.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from gemmakit.chat import ChatError, render
from gemmakit.errors import UserError
from gemmakit.tokenizer import StreamDecoder, Tokenizer

MAX_N = 8  # choices per request
MAX_STOP = 16  # stop strings per request
MAX_TOP_LOGPROBS = 20  # as OpenAI's chat API
MAX_BATCH_PROMPTS = 64  # prompts in one /v1/completions request
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class ApiError(UserError):
    """A request the server rejects: HTTP `status`, OpenAI error `type`, the offending `param`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object; ApiError for invalid UTF-8 or JSON, NaN, duplicate keys."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
        out = {}
        for k, v in pairs:
            if k in out:
                raise ApiError(f"invalid JSON: duplicate key {k!r}")
            out[k] = v
        return out

    def no_constants(name: str) -> None:
        raise ApiError(f"invalid JSON: {name} is not a JSON number")

    try:
        text = raw.decode("utf-8")
        body = json.loads(text, object_pairs_hook=no_duplicates, parse_constant=no_constants)
    except UnicodeDecodeError:
        raise ApiError("the request body is not valid UTF-8") from None
    except RecursionError:
        raise ApiError("invalid JSON: nested too deeply") from None
    except ValueError as e:
        raise ApiError(f"invalid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(f"the request body must be a JSON object, got {_kind(body)}")
    return body


def _as_int(value: Any) -> int | None:
    """`value` as an int if JSON Schema calls it an integer (8 or 8.0, as the OpenAPI document says;
    found by Schemathesis), else None. Booleans are not integers."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


@dataclass
class Job:
    """One checked request: the prompts (token ids) and how to generate from them."""

    chat: bool
    model: str
    prompts: list[list[int]]
    max_tokens: int
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: none; k: the chosen token's and the top k
    logit_bias: dict[int, float] | None = None
    echo: bool = False
    messages: list[dict] | None = None  # chat: the conversation as {role, content} text (for the guard)
    response_format: Any = None  # chat: as sent; server.structured checks it and builds the grammar
    grammar: str | None = None  # the llguidance grammar of response_format (None: free text)
    texts: list[str | None] = field(default_factory=list)  # completions: each prompt's text (None: ids)

    @property
    def user_text(self) -> str:
        """What the guard's input check judges: the last user message, or the (first) prompt text."""
        if self.messages is not None:
            return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")
        return next((t for t in self.texts if t is not None), "")


class _Fields:
    """Typed access to a request object's fields; every error names the field."""

    def __init__(self, body: dict, known: set[str]) -> None:
        unknown = sorted(set(body) - known)
        if unknown:
            raise ApiError(f"unknown field {unknown[0]!r}; this server accepts: {', '.join(sorted(known))}",
                           unknown[0])  # fmt: skip
        self.body = body

    def get(self, name: str, default: Any = None) -> Any:
        value = self.body.get(name)
        return default if value is None else value

    def boolean(self, name: str, default: bool = False) -> bool:
        value = self.get(name, default)
        if not isinstance(value, bool):
            raise ApiError(f"{name}: expected true or false, got {json.dumps(value)[:60]}", name)
        return value

    def integer(self, name: str, default: int | None, lo: int, hi: int) -> int | None:
        value = self.get(name, default)
        if value is None:
            return None
        number = _as_int(value)
        if number is None or not lo <= number <= hi:
            raise ApiError(f"{name}: expected an integer in [{lo}, {hi}], got {json.dumps(value)[:60]}", name)
        return number

    def number(
        self, name: str, default: float | None, lo: float, hi: float, open_lo: bool = False
    ) -> float | None:
        value = self.get(name, default)
        if value is None:
            return None
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or not (lo < value if open_lo else lo <= value) or value > hi:
            lo_s = f"({lo}" if open_lo else f"[{lo}"
            raise ApiError(f"{name}: expected a number in {lo_s}, {hi}], got {json.dumps(value)[:60]}", name)
        return float(value)


CHAT_FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "n", "stream", "stream_options",
               "temperature", "top_p", "top_k", "seed", "stop", "logprobs", "top_logprobs", "logit_bias",
               "response_format", "frequency_penalty", "presence_penalty", "user", "tools", "tool_choice"}  # fmt: skip
COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "n", "stream", "stream_options", "temperature", "top_p",
                     "top_k", "seed", "stop", "logprobs", "logit_bias", "echo", "frequency_penalty",
                     "presence_penalty", "user"}  # fmt: skip


def parse_chat(body: dict, tokenizer: Tokenizer, context: int, model_id: str) -> Job:
    """Check a /v1/chat/completions body and render its messages with Gemma's chat template."""
    f = _Fields(body, CHAT_FIELDS)
    messages = f.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError("messages: expected a non-empty array of {role, content} objects", "messages")
    if f.get("tools") or f.get("tool_choice") not in (None, "none"):
        raise ApiError("tools: tool calling is not supported by this server", "tools")
    texts = [_message(m, i) for i, m in enumerate(messages)]
    job = Job(chat=True, model=_model(f, model_id), prompts=[render_messages(tokenizer, texts)], max_tokens=0,
              messages=texts, response_format=f.get("response_format"))  # fmt: skip
    # the newer name wins when both are given; a null one counts as absent (found by Schemathesis: a
    # null max_completion_tokens beside max_tokens was a 500)
    name = "max_completion_tokens" if f.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = f.get(name)
    _common(f, job, context, max_tokens, name, default_max=None)
    if f.boolean("logprobs"):
        job.logprobs = f.integer("top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
    elif f.get("top_logprobs") is not None:
        raise ApiError("top_logprobs: requires logprobs: true", "top_logprobs")
    return job


def render_messages(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
    """Gemma's chat prompt for checked {role, content} messages; ApiError if the roles do not alternate."""
    try:
        return render(tokenizer, messages, add_generation_prompt=True).tokens
    except ChatError as e:
        raise ApiError(f"messages: {e}", "messages") from None


def _message(m: Any, i: int) -> dict:
    """One OpenAI message as {role, content} text: content parts of type "text" are joined."""
    if not isinstance(m, dict):
        raise ApiError(f"messages[{i}]: expected an object with role and content, got {_kind(m)}", "messages")
    unknown = sorted(set(m) - {"role", "content", "name"})
    if unknown:
        raise ApiError(f"messages[{i}]: unknown field {unknown[0]!r}", "messages")
    role, content = m.get("role"), m.get("content")
    if role == "developer":  # OpenAI's newer name for the system message
        role = "system"
    if role not in ("system", "user", "assistant"):
        raise ApiError(f"messages[{i}].role: expected system, user or assistant, got {json.dumps(role)[:40]}",
                       "messages")  # fmt: skip
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise ApiError(f"messages[{i}].content[{j}]: only {{\"type\": \"text\", \"text\": ...}} parts are "
                               "supported (text-only model)", "messages")  # fmt: skip
            parts.append(part["text"])
        content = "".join(parts)
    if not isinstance(content, str):
        raise ApiError(
            f"messages[{i}].content: expected a string or text parts, got {_kind(content)}", "messages"
        )
    return {"role": role, "content": content}


def parse_completion(body: dict, tokenizer: Tokenizer, context: int, model_id: str) -> Job:
    """Check a /v1/completions body; prompts may be text, token ids, or arrays of either."""
    f = _Fields(body, COMPLETION_FIELDS)
    vocab = tokenizer.vocab_size
    prompt = f.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and _is_ids(prompt)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt or len(prompt) > MAX_BATCH_PROMPTS:
        raise ApiError(f"prompt: expected a string, an array of token ids, or an array of up to "
                       f"{MAX_BATCH_PROMPTS} of those", "prompt")  # fmt: skip
    prompts, texts = [], []
    for i, p in enumerate(prompt):
        texts.append(p if isinstance(p, str) else None)
        if isinstance(p, str):
            prompts.append(tokenizer.encode(p, bos=True))
        elif isinstance(p, list) and p and _is_ids(p):
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise ApiError(f"prompt[{i}]: token ids must be in [0, {vocab}), got {bad[0]}", "prompt")
            prompts.append([_as_int(t) for t in p])
        else:
            raise ApiError(f"prompt[{i}]: expected a non-empty string or array of token ids", "prompt")
    job = Job(chat=False, model=_model(f, model_id), prompts=prompts, max_tokens=0, texts=texts)
    job.echo = f.boolean("echo")
    _common(f, job, context, f.get("max_tokens"), "max_tokens", default_max=COMPLETION_DEFAULT_MAX_TOKENS)
    job.logprobs = f.integer("logprobs", None, 0, MAX_TOP_LOGPROBS)
    if job.stream and job.echo:
        raise ApiError("echo: not supported with stream", "echo")
    return job


def _is_ids(values: list) -> bool:
    return all(_as_int(t) is not None for t in values)


def _model(f: _Fields, model_id: str) -> str:
    name = f.get("model", model_id)
    if not isinstance(name, str):
        raise ApiError("model: expected a string", "model")
    if name not in (model_id, "default", ""):
        raise ApiError(f"model {name!r} not found; this server serves {model_id!r}", "model", 404,
                       "not_found_error", "model_not_found")  # fmt: skip
    return model_id


def _common(f: _Fields, job: Job, context: int, max_tokens: Any, name: str, default_max: int | None) -> None:
    """Sampling fields shared by both endpoints, and the context check (400 with both numbers)."""
    job.n = f.integer("n", 1, 1, MAX_N)
    job.stream = f.boolean("stream")
    options = f.get("stream_options")
    if options is not None:
        if not job.stream:
            raise ApiError("stream_options: only allowed with stream: true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise ApiError('stream_options: expected {"include_usage": true|false}', "stream_options")
        job.include_usage = _Fields(options, {"include_usage"}).boolean("include_usage")
    job.temperature = f.number("temperature", 1.0, 0.0, 100.0)
    top_p = f.number("top_p", None, 0.0, 1.0, open_lo=True)
    job.top_p = None if top_p is None or top_p >= 1.0 else top_p
    top_k = f.integer("top_k", None, -1, 2**31 - 1)
    job.top_k = None if top_k is None or top_k <= 0 else top_k
    job.seed = f.integer("seed", None, -(2**63), 2**63 - 1)
    for penalty in ("frequency_penalty", "presence_penalty"):
        if f.number(penalty, 0.0, -2.0, 2.0) != 0.0:
            raise ApiError(f"{penalty}: only 0 is supported by this server", penalty)
    if f.get("user") is not None and not isinstance(f.get("user"), str):
        raise ApiError("user: expected a string", "user")
    stop = f.get("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(f"stop: expected a non-empty string or an array of up to {MAX_STOP} of them", "stop")
    job.stop = stop
    bias = f.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise ApiError("logit_bias: expected an object of token id -> bias in [-100, 100]", "logit_bias")
        job.logit_bias = {}
        for key, value in bias.items():
            ok_key = key.isdigit() and int(key) < 2**31
            ok_value = (
                isinstance(value, (int, float)) and not isinstance(value, bool) and -100 <= value <= 100
            )
            if not (ok_key and ok_value):
                raise ApiError(
                    f"logit_bias: {key!r}: expected a token id -> a bias in [-100, 100]", "logit_bias"
                )
            job.logit_bias[int(key)] = float(value)
    longest = max(len(p) for p in job.prompts)
    if max_tokens is None:
        job.max_tokens = default_max if default_max is not None else context - longest
    else:
        job.max_tokens = f.integer(name, None, 0 if job.echo else 1, 2**31 - 1)
    if job.max_tokens < (0 if job.echo else 1) or longest + job.max_tokens > context:
        raise ApiError(
            f"the prompt has {longest} tokens and {name} is {job.max_tokens}: {longest} + {max(job.max_tokens, 1)} = "
            f"{longest + max(job.max_tokens, 1)} exceeds the context size of {context} tokens",
            "messages" if job.chat else "prompt", code="context_length_exceeded",
        )  # fmt: skip


class TextStream:
    """Generated tokens -> text, cut at the first stop string even when it spans tokens.

    Text that could still be the start of a stop string is held back until the next token decides;
    `push` returns what may be sent now, `finish` the rest. After a stop string, `stopped` is True
    and nothing more is returned.
    """

    def __init__(self, tokenizer: Tokenizer, stops: list[str]) -> None:
        self._decoder = StreamDecoder(tokenizer)
        self._stops = stops
        self._held = ""
        self.text = ""  # everything returned so far
        self.stopped = False

    def push(self, token_id: int) -> str:
        return self._release(self._decoder.push(token_id), final=False)

    def finish(self) -> str:
        return self._release(self._decoder.flush(), final=True)

    def _release(self, piece: str, final: bool) -> str:
        if self.stopped:
            return ""
        held = self._held + piece
        cut = min((i for i in (held.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self._held = True, ""
            out = held[:cut]
        elif final:
            out, self._held = held, ""
        else:  # keep the longest tail that is a proper prefix of some stop string
            keep = 0
            for s in self._stops:
                for k in range(min(len(s) - 1, len(held)), keep, -1):
                    if held.endswith(s[:k]):
                        keep = k
                        break
            out, self._held = held[: len(held) - keep], held[len(held) - keep :]
        self.text += out
        return out
