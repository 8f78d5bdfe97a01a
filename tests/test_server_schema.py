"""Schemathesis over the server's own /openapi.json, against a real uvicorn process (reliability case F1).

Every documented operation gets at least 100 generated requests, valid and invalid by the schema
(Schemathesis' positive and negative modes). Checks: no 5xx; every status code, content type,
header and JSON body is the documented one; every body the schema rejects gets a 4xx (the checker in
server.protocol is at least as strict as the published schema); 405 carries Allow. Valid bodies may
still get a 400: the schema cannot state limits of the loaded model (context size, vocabulary,
alternating roles), so `positive_data_acceptance` is not among the checks. The context is 96
tokens so that any accepted request generates at most a few dozen tokens.
"""

from __future__ import annotations

import copy
import os

import pytest
from server_helpers import serve

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402 (schemathesis brings hypothesis)
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.config import SchemathesisConfig  # noqa: E402

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance, negative_data_rejection]  # fmt: skip
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "100"))  # per operation and pass; more when hunting bugs
SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with serve("--ctx-size", "512", "--parallel", "4", "--queue", "256",
               log_dir=tmp_path_factory.mktemp("serve")) as s:  # fmt: skip
        yield s


def _document() -> dict:
    from gemmakit.server import ServeConfig, create_app

    return create_app(lambda: (None, None), ServeConfig()).app.openapi()


def _narrowed(document: dict) -> dict:
    """The generation routes' bodies, narrowed to requests that fit the nano model and the 512-token
    context, which the published schema cannot state: one user message, short texts, ids in the
    vocabulary, at most 8 new tokens, no combinations the checker refuses (top_logprobs without
    logprobs, echo with stream, stream_options without stream, penalties other than 0)."""
    doc = copy.deepcopy(document)
    for path, gone in (("/v1/chat/completions", ("top_logprobs", "stream_options")),
                       ("/v1/completions", ("stream", "stream_options"))):  # fmt: skip
        schema = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        props = schema["properties"]
        for name in gone:
            del props[name]
        for name in ("max_tokens", "max_completion_tokens"):
            if name in props:
                props[name] = {"type": ["integer", "null"], "minimum": 1, "maximum": 8}
        if "messages" in props:  # without a max, chat generates to the context's end: 8 x 500 tokens
            props["max_tokens"]["type"] = "integer"
            schema["required"] = [*schema["required"], "max_tokens"]
        props["model"] = {"enum": ["nano", "default", "", None]}
        props["seed"] = {"type": ["integer", "null"], "minimum": -(2**53), "maximum": 2**53}  # float-exact
        props["frequency_penalty"] = props["presence_penalty"] = {"enum": [0, None]}
        props["logit_bias"]["propertyNames"] = {"pattern": "^[0-9]{1,3}$"}  # the vocabulary has 8192
        text = {"type": "string", "maxLength": 50}  # <= 200 tokens, even as byte fallbacks
        ids = {
            "type": "array",
            "minItems": 1,
            "maxItems": 20,
            "items": {"type": "integer", "minimum": 0, "maximum": 999},
        }
        if "messages" in props:
            parts = {
                "type": "array",
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "required": ["type", "text"],
                    "properties": {"type": {"const": "text"}, "text": {"type": "string", "maxLength": 30}},
                },
            }
            props["messages"] = {
                "type": "array",
                "minItems": 1,
                "maxItems": 1,
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["role", "content"],
                    "properties": {
                        "role": {"const": "user"},
                        "content": {"anyOf": [text, parts]},
                        "name": {"type": "string"},
                    },
                },
            }
            props["response_format"] = {
                "anyOf": [
                    {"type": "null"},
                    {
                        "type": "object",
                        "required": ["type"],
                        "additionalProperties": False,
                        "properties": {"type": {"enum": ["text", "json_object"]}},
                    },
                ]
            }
        else:
            props["prompt"] = {"anyOf": [text, ids, {"type": "array", "minItems": 1, "maxItems": 4,
                                                     "items": {"anyOf": [text, ids]}}]}  # fmt: skip
    return doc


published = schemathesis.openapi.from_dict(_document())
narrowed = schemathesis.openapi.from_dict(
    _narrowed(_document()), config=SchemathesisConfig.from_dict({"generation": {"mode": "positive"}})
).include(method="POST")


def test_the_served_document_is_the_one_tested(served) -> None:
    import httpx

    assert httpx.get(served.url + "/openapi.json").json() == _document()


@published.parametrize()
@SETTINGS
def test_every_operation_answers_as_documented(case, served) -> None:
    case.call_and_validate(base_url=served.url, checks=CHECKS, timeout=60)


@narrowed.parametrize()
@SETTINGS
def test_every_request_that_fits_the_model_is_answered(case, served) -> None:
    case.call_and_validate(base_url=served.url, checks=[*CHECKS[:-1], positive_data_acceptance], timeout=60)


def test_the_fuzzed_server_logged_no_traceback(served) -> None:
    # runs after the generated cases (same file, same process): an answer may be a clean 4xx while
    # the server logged an exception behind it
    assert "Traceback" not in served.output()
