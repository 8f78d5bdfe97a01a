"""Fuzz targets: one function per input surface, bytes in, any non-user error out (reliability F2).

Where it sits: outside the package, driven by fuzz/run.py (atheris, coverage-guided, 10^5+ runs a
target, nightly) and by tests/test_fuzz.py (every checked-in seed, plus Hypothesis-made inputs, in
CI). A target returns normally or raises one of the errors the surface documents (`ApiError`,
`SourceError`); anything else, or a broken invariant (AssertionError), is a crasher, which
fuzz/run.py writes to fuzz/seeds/TARGET/ so it becomes a regression seed.

Targets:
- request: an HTTP body for /v1/chat/completions or /v1/completions (first byte picks the route,
  and whether the rest is the raw body or choices a body is built from), through the
  server's JSON reader, field checker, chat template and response_format grammar builder (an invalid
  schema crashed vLLM's API server twice: #17248, #19270).
- text_stream: token ids and stop strings through the SSE text cutter: the text it releases never
  holds a stop string and, without one, is the whole decoded text.
- jsonl: a file for the data pipeline's JSONL reader (plain, chat and preference modes): every line
  is counted once, as a document, a blank or a malformed category.

Key trade-off: the targets run the real code with the nano tokenizer (no mocks), so a run costs
~0.1-1 ms; atheris still reaches ~10^3-10^4 runs a second.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from pathlib import Path

from gemmakit.data.sources import SourceError, SourceStats, read_jsonl
from gemmakit.server.protocol import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    ApiError,
    TextStream,
    parse_chat,
    parse_completion,
    parse_json,
)
from gemmakit.server.structured import grammar_for
from gemmakit.tokenizer import Tokenizer

CONTEXT = 512  # tokens, as a small `gemmakit serve --ctx-size`


@functools.cache
def _tokenizer() -> Tokenizer:
    from gemmakit.cli import NANO_DIR

    return Tokenizer.load(NANO_DIR)


class _Bytes:
    """Reads fuzz bytes as choices: how a structured target turns mutations into JSON values."""

    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def byte(self) -> int:
        self.at += 1
        return self.data[self.at - 1] if self.at <= len(self.data) else 0

    def pick(self, options: list):
        return options[self.byte() % len(options)]

    def text(self) -> str:
        n = self.byte() % 12
        raw = self.data[self.at : self.at + n]
        self.at += n
        return raw.decode("utf-8", "replace")


_EDGES = [0, 1, -1, 2, 8, 9, 20, 21, 100, 101, 511, 512, 2**31 - 1, 2**31, 2**63 - 1, 2**63, -(2**63) - 1,
          0.0, 0.5, 1.0, 1.0000001, -0.0, 5e-324, 1e308, 2.5, 8.0]  # fmt: skip
_NAMES = sorted(CHAT_FIELDS | COMPLETION_FIELDS | {"role", "content", "type", "text", "json_schema", "schema",
                "include_usage", "name", "0", "99999"})  # fmt: skip


def _value(b: _Bytes, depth: int = 0):
    kind = b.byte() % (9 if depth < 3 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return bool(b.byte() % 2)
    if kind == 2:
        return b.pick(_EDGES)
    if kind == 3:
        return b.text()
    if kind == 4:
        return b.pick(
            ["user", "assistant", "system", "developer", "text", "json_object", "json_schema", "none"]
        )
    if kind in (5, 6):
        return [_value(b, depth + 1) for _ in range(b.byte() % 4)]
    if kind == 7:
        return {"role": b.pick(["user", "assistant", "system"]), "content": _value(b, depth + 1)}
    return {b.pick(_NAMES): _value(b, depth + 1) for _ in range(b.byte() % 4)}


def _structured(data: bytes, fields: set[str]) -> bytes:
    """A request body built field by field from the bytes (deeper than mutating raw JSON, which
    mostly fails json.loads: ~10^5 runs a second that never reach the field checks)."""
    b = _Bytes(data)
    names = sorted(fields) + ["bogus"]
    body = {b.pick(names): _value(b) for _ in range(b.byte() % 6)}
    if b.byte() % 2:
        body["messages"] = [_value(b, 2) if b.byte() % 4 == 0 else
                            {"role": b.pick(["user", "assistant", "system"]), "content": b.text()}
                            for _ in range(1 + b.byte() % 3)]  # fmt: skip
    if b.byte() % 2:
        body["prompt"] = b.text() if b.byte() % 2 else [b.pick(_EDGES) for _ in range(1 + b.byte() % 4)]
    return json.dumps(body).encode()


def request(data: bytes) -> None:
    if not data:
        return
    chat = data[0] % 2 == 0
    parse = parse_chat if chat else parse_completion
    fields = CHAT_FIELDS if chat else COMPLETION_FIELDS
    body = data[1:] if data[0] % 4 < 2 else _structured(data[1:], fields)  # raw JSON, or built from bytes
    try:
        job = parse(parse_json(body), _tokenizer(), CONTEXT, "nano")
        grammar_for(job.response_format)
    except ApiError as e:
        assert e.message and 400 <= e.status < 600, e.status
        return
    assert job.prompts and all(job.prompts) and job.max_tokens >= 0 and job.n >= 1


def text_stream(data: bytes) -> None:
    if len(data) < 2:
        return
    tok = _tokenizer()
    n_stops = data[0] % 4
    words = data[1:].split(b"\xff")
    stops = [w.decode("utf-8", "replace")[:8] for w in words[:n_stops] if w]
    body = b"".join(words[n_stops:])
    ids = [int.from_bytes(body[i : i + 2], "little") % tok.vocab_size for i in range(0, len(body) - 1, 2)]
    stream = TextStream(tok, stops)
    out = "".join(stream.push(t) for t in ids) + stream.finish()
    assert out == stream.text
    assert not any(s in out for s in stops), (stops, out)
    if not stream.stopped:
        assert out == tok.decode(ids), (out, tok.decode(ids))


_DIR = Path(tempfile.gettempdir()) / f"gemmakit-fuzz-{os.getpid()}"


def jsonl(data: bytes) -> None:
    if not data:
        return
    _DIR.mkdir(exist_ok=True)
    path = _DIR / "input.jsonl"
    path.write_bytes(data[1:])
    mode = data[0] % 3
    stats = SourceStats()
    kwargs = (
        {"chat": True, "text_field": "messages"} if mode == 1 else {"preference": True} if mode == 2 else {}
    )
    try:
        for doc in read_jsonl(path, stats=stats, max_line_bytes=4096, **kwargs):
            assert isinstance(doc.text, str) and isinstance(doc.id, str)
    except SourceError:
        return
    assert stats.lines == stats.docs + stats.blank + sum(stats.malformed.values()), stats


TARGETS = {"request": request, "text_stream": text_stream, "jsonl": jsonl}


def seeds(target: str) -> list[Path]:
    """The checked-in corpus of `target`: starting inputs and every crasher found so far."""
    return sorted((Path(__file__).parent / "seeds" / target).glob("*"))


def _write_initial_seeds() -> None:
    """The hand-made starting corpus (python fuzz/targets.py rewrites it)."""
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            "max_tokens": 8, "temperature": 0.7, "top_p": 0.9, "top_k": 40, "seed": 1, "stop": ["\n"],
            "logprobs": True, "top_logprobs": 2, "logit_bias": {"5": -100}, "n": 2, "stream": True,
            "stream_options": {"include_usage": True},
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
                "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}}  # fmt: skip
    completion = {"prompt": ["a b", [2, 5, 9]], "max_tokens": 0, "echo": True, "logprobs": 3}
    out = {
        "request": {"chat": b"\x00" + json.dumps(chat).encode(), "completion": b"\x01" + json.dumps(completion).encode(),
                    "bad_schema": b"\x00" + json.dumps({"messages": [{"role": "user", "content": "x"}],
                                  "response_format": {"type": "json_schema", "json_schema": {"schema":
                                  {"type": "string", "pattern": "foo**"}}}}).encode()},  # fmt: skip
        "text_stream": {"stop": b"\x01</s>\xff" + bytes(range(40, 120)), "plain": b"\x00" + bytes(range(200))},
        "jsonl": {"plain": b'\x00{"text": "a", "id": 1}\n\n{"text": 5}\nnot json\n{"text": "\xff"}',
                  "chat": b'\x01{"messages": [{"role": "user", "content": "hi"}]}\n[1]\n',
                  "preference": b'\x02{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"chosen": 1}\n'},
    }  # fmt: skip
    for target, files in out.items():
        for name, content in files.items():
            (Path(__file__).parent / "seeds" / target / name).write_bytes(content)


if __name__ == "__main__":
    _write_initial_seeds()
