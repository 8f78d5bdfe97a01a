"""The server's API as OpenAPI 3.1: what each route accepts and every status and body it answers.

Where it sits: beside `server.protocol`, read by `server.app` when it declares its routes; FastAPI
serves the result at /openapi.json. Clients generate code from it, and tests/test_server_schema.py
runs Schemathesis over it against a real server: every body this schema rejects must get a 4xx
from the checker, no answer may be a 5xx, and every status code and body must be the documented one.

Key trade-off: the checker in `server.protocol` stays the authority (its messages name the field);
this schema is written next to it from the same limits (MAX_N, MAX_STOP, ...) and kept honest by
Schemathesis rather than generated from pydantic models. It describes shapes and ranges only: limits
that depend on the loaded model (context size, vocabulary, alternating roles) are 400s it cannot
state, so a body it accepts may still be refused.
"""

from __future__ import annotations

from typing import Any

from gemmakit.server.protocol import MAX_BATCH_PROMPTS, MAX_N, MAX_STOP, MAX_TOP_LOGPROBS

INT32 = 2**31 - 1


def _opt(schema: dict) -> dict:
    """`schema` or null: the checker treats a null field as absent."""
    kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    return {**schema, "type": [*kinds, "null"]}


def _sampling(max_tokens_min: int) -> dict[str, dict]:
    """The fields both generation routes share (protocol._common)."""
    stop = {"type": "string", "minLength": 1}
    return {
        "model": _opt({"type": "string", "description": "the served model's id, 'default' or ''"}),
        "max_tokens": _opt({"type": "integer", "minimum": max_tokens_min, "maximum": INT32}),
        "n": _opt({"type": "integer", "minimum": 1, "maximum": MAX_N}),
        "stream": _opt({"type": "boolean"}),
        "stream_options": _opt(
            {
                "type": "object",
                "additionalProperties": False,
                "properties": {"include_usage": _opt({"type": "boolean"})},
            }
        ),  # fmt: skip
        "temperature": _opt({"type": "number", "minimum": 0, "maximum": 100}),
        "top_p": _opt({"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
        "top_k": _opt({"type": "integer", "minimum": -1, "maximum": INT32, "description": "0 or -1: off"}),
        "seed": _opt({"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1}),
        "stop": {"anyOf": [stop, {"type": "array", "items": stop, "maxItems": MAX_STOP}, {"type": "null"}]},
        "logit_bias": _opt(
            {
                "type": "object",
                "propertyNames": {"pattern": "^[0-9]{1,9}$"},
                "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
                "description": "token id -> bias added to its logit",
            }
        ),  # fmt: skip
        "frequency_penalty": _opt({"type": "number", "minimum": -2, "maximum": 2, "description": "only 0"}),
        "presence_penalty": _opt({"type": "number", "minimum": -2, "maximum": 2, "description": "only 0"}),
        "user": _opt({"type": "string"}),
    }


_PART = {"type": "object", "required": ["type", "text"],
         "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}  # fmt: skip
_MESSAGE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["role", "content"],
    "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant"]},
        "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": _PART}]},
        "name": {"type": "string"},
    },
}
_RESPONSE_FORMAT = {
    "type": ["object", "null"],
    "required": ["type"],
    "properties": {
        "type": {"enum": ["text", "json_object", "json_schema"]},
        "json_schema": {
            "type": "object",
            "required": ["schema"],
            "properties": {"schema": {"type": "object"}},
        },
    },
}
CHAT_REQUEST = {
    "type": "object",
    "additionalProperties": False,
    "required": ["messages"],
    "properties": {
        "messages": {"type": "array", "minItems": 1, "items": _MESSAGE},
        **_sampling(1),
        "max_completion_tokens": _opt({"type": "integer", "minimum": 1, "maximum": INT32}),
        "logprobs": _opt({"type": "boolean"}),
        "top_logprobs": _opt({"type": "integer", "minimum": 0, "maximum": MAX_TOP_LOGPROBS}),
        "response_format": _RESPONSE_FORMAT,
        "tools": _opt({"type": "array", "maxItems": 0, "description": "tool calling is not supported"}),
        "tool_choice": {"enum": ["none", None]},
    },
}
_IDS = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
COMPLETION_REQUEST = {
    "type": "object",
    "additionalProperties": False,
    "required": ["prompt"],
    "properties": {
        "prompt": {
            "anyOf": [
                {"type": "string"},
                _IDS,
                {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": MAX_BATCH_PROMPTS,
                    "items": {"anyOf": [{"type": "string"}, _IDS]},
                },
            ]
        },  # fmt: skip
        **_sampling(0),
        "logprobs": _opt({"type": "integer", "minimum": 0, "maximum": MAX_TOP_LOGPROBS}),
        "echo": _opt({"type": "boolean"}),
    },
}

# ---- responses ------------------------------------------------------------------------------------
ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },  # fmt: skip
        }
    },
}
_USAGE = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {k: {"type": "integer", "minimum": 0} for k in ("prompt_tokens", "completion_tokens", "total_tokens")},
}  # fmt: skip
_FINISH = {"enum": ["stop", "length", "content_filter"]}
_GUARD = {"type": "object", "description": "why the guard blocked this choice"}
_BASE = {
    "id": {"type": "string"},
    "created": {"type": "integer"},
    "model": {"type": "string"},
    "usage": _USAGE,
}
CHAT_RESPONSE = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices", "usage"],
    "properties": {
        **_BASE,
        "object": {"const": "chat.completion"},
        "choices": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["index", "message", "logprobs", "finish_reason"],
            "properties": {"index": {"type": "integer"}, "finish_reason": _FINISH, "guard": _GUARD,
                           "logprobs": {"type": ["object", "null"]},
                           "message": {"type": "object", "required": ["role", "content"],
                                       "properties": {"role": {"const": "assistant"}, "content": {"type": "string"}}}},
        }},
    },
}  # fmt: skip
COMPLETION_RESPONSE = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices", "usage"],
    "properties": {
        **_BASE,
        "object": {"const": "text_completion"},
        "choices": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["index", "text", "logprobs", "finish_reason"],
            "properties": {"index": {"type": "integer"}, "text": {"type": "string"}, "finish_reason": _FINISH,
                           "guard": _GUARD, "logprobs": {"type": ["object", "null"]}},
        }},
    },
}  # fmt: skip
_CHUNK_BASE = {"id": {"type": "string"}, "created": {"type": "integer"}, "model": {"type": "string"},
               "usage": {"anyOf": [_USAGE, {"type": "null"}]}}  # fmt: skip
_CHUNK_FINISH = {"enum": ["stop", "length", "content_filter", None]}
CHAT_CHUNK = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices"],
    "properties": {
        **_CHUNK_BASE,
        "object": {"const": "chat.completion.chunk"},
        "choices": {"type": "array", "items": {  # empty in the usage chunk
            "type": "object", "required": ["index", "delta", "finish_reason"],
            "properties": {"index": {"type": "integer"}, "finish_reason": _CHUNK_FINISH, "guard": _GUARD,
                           "logprobs": {"type": ["object", "null"]},
                           "delta": {"type": "object", "additionalProperties": False,
                                     "properties": {"role": {"const": "assistant"}, "content": {"type": "string"}}}},
        }},
    },
}  # fmt: skip
COMPLETION_CHUNK = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices"],
    "properties": {
        **_CHUNK_BASE,
        "object": {"const": "text_completion"},
        "choices": {"type": "array", "items": {
            "type": "object", "required": ["index", "text", "finish_reason"],
            "properties": {"index": {"type": "integer"}, "text": {"type": "string"}, "finish_reason": _CHUNK_FINISH,
                           "guard": _GUARD, "logprobs": {"type": ["object", "null"]}},
        }},
    },
}  # fmt: skip


def _events(chunk: dict) -> dict:
    """One SSE event (the OpenAPI 3.1 reading of a text/event-stream schema): its data is a JSON chunk,
    an error object after a failure mid-stream, or the closing [DONE]."""
    return {"type": "object", "required": ["data"], "properties": {"data": {"anyOf": [
        {"const": "[DONE]"},
        {"type": "string", "contentMediaType": "application/json", "contentSchema": {"anyOf": [chunk, ERROR]}},
    ]}}}  # fmt: skip


MODELS = {
    "type": "object",
    "required": ["object", "data"],
    "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": {
        "type": "object", "required": ["id", "object", "created", "owned_by"],
        "properties": {"id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
                       "owned_by": {"type": "string"}, "context_length": {"type": "integer"}}}}},
}  # fmt: skip
STATUS = {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"},
                                                                    "error": {"type": "string"}}}  # fmt: skip


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[int, dict]:
    """Error answers (OpenAI's error object). Every route can also get the guard layer's 401 (API
    key), 403 (Host header) and 431 (headers); routes with a body 413 and 415."""
    reasons = {400: "a field is invalid (the message names it) or the prompt does not fit the context",
               401: "the API key is missing or wrong", 403: "the Host header is not allowed",
               404: "the model is not the served one", 405: "the method is not allowed here",
               413: "the body is larger than the limit", 415: "the body is not application/json",
               429: "the queue is full (Retry-After)", 431: "too many or too large headers",
               500: "the engine failed", 501: "the feature needs an extra that is not installed",
               503: "the model is loading, failed, or the server is shutting down (Retry-After)"}  # fmt: skip
    return {c: _json(ERROR, reasons[c]) for c in (401, 403, 405, 431, *codes)}


def generation(request: dict, response: dict, chunk: dict) -> dict[str, Any]:
    """FastAPI route arguments for a generation route: its request body and its answers."""
    ok = _json(response, "the answer; with stream: true, SSE events of chunks, then [DONE]")
    ok["content"]["text/event-stream"] = {"schema": _events(chunk)}
    return {
        "openapi_extra": {
            "requestBody": {"required": True, "content": {"application/json": {"schema": request}}}
        },
        "responses": {200: ok, **_errors(400, 404, 413, 415, 429, 500, 501, 503)},
    }


def probe(ok: dict, description: str, busy: bool = True) -> dict[str, Any]:
    responses = {200: _json(ok, description), **_errors()}
    if busy:  # the probe's own status object, or the error object of a route that needs the model
        responses[503] = _json({"anyOf": [STATUS, ERROR]}, "loading, failed or unhealthy")
    return {"responses": responses}


METRICS = {
    "responses": {
        200: {"description": "Prometheus text format 0.0.4", "content": {"text/plain": {"schema": {"type": "string"}}}},
        **_errors(),
    }
}  # fmt: skip
