"""Structured output: `response_format` JSON schema / JSON object as a token mask at every step.

Where it sits: `server.app` builds one `JsonConstraint` per choice from the request's
`response_format` and hands it to the batcher as the request's score processor
(`infer.sampler.ScoreProcessor`), so the engine, which knows nothing about grammars, samples only
tokens the grammar allows; once the JSON value is complete only the end-of-turn / EOS ids remain.
The grammar engine is llguidance (the one llama.cpp and vLLM use; Rust, no dependencies): schema ->
grammar -> a matcher that advances token by token over our SentencePiece vocabulary.

Key trade-off: the mask is computed for every token over the whole vocabulary (~0.1-1 ms on 2 cores
at 256k pieces, measured by llguidance's own slicer) instead of constraining only when the model
strays; exact by construction, and the output always parses and validates against the schema
unless it is cut by max_tokens.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import torch

from gemmakit.server.protocol import ApiError
from gemmakit.tokenizer import Tokenizer

_CONTROL, _UNKNOWN = 3, 2  # SentencePiece piece types
_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class _Vocab:
    """What llguidance's TokenizerWrapper reads: every id's bytes (control pieces marked with 0xFF, as
    its llama.cpp bridge does), EOS/BOS, and an encoder for the text it needs to tokenize."""

    def __init__(self, tok: Tokenizer, n_vocab: int) -> None:
        pieces, _, types = tok.vocab()
        special = set(tok.reserved_ids) | {tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id}
        self.tokens = []
        for i in range(n_vocab):
            if i >= len(pieces):
                self.tokens.append(b"")  # embedding rows past the tokenizer: never sampled
            elif i in special or types[i] in (_CONTROL, _UNKNOWN):
                self.tokens.append(b"\xff" + pieces[i].encode("utf-8"))
            else:
                self.tokens.append(tok.token_bytes(i))
        self.eos_token_id, self.bos_token_id = tok.eos_id, tok.bos_id
        self.special_token_ids = sorted(special)
        self._tok = tok

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return self._tok.encode(text, bos=False)


@functools.lru_cache(maxsize=4)
def _lltokenizer(tok: Tokenizer, n_vocab: int, stops: tuple[int, ...]) -> Any:
    import llguidance

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocab(tok, n_vocab)), n_vocab=n_vocab,
                                  eos_token=list(stops))  # fmt: skip


def grammar_for(response_format: Any) -> str | None:
    """The llguidance grammar of a request's response_format (None for plain text); ApiError if invalid."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise ApiError("response_format: expected an object with a type", "response_format")
    kind = response_format.get("type")
    if kind == "text":
        return None
    try:
        import llguidance
    except ImportError:
        raise ApiError("response_format: structured output needs llguidance (pip install -e '.[serve]')",
                       "response_format", 501, "not_implemented_error") from None  # fmt: skip
    if kind == "json_object":
        schema: Any = {"type": "object"}
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise ApiError(
                "response_format.json_schema.schema: expected a JSON schema object", "response_format"
            )
        schema = spec["schema"]
    else:
        raise ApiError(f"response_format.type: expected text, json_object or json_schema, got {json.dumps(kind)[:40]}",
                       "response_format")  # fmt: skip
    try:
        # one fixed layout, `{"a": 1, "b": [2, 3]}`: with free whitespace a small model can emit
        # newlines forever and never close the object
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=_LAYOUT)
    except (ValueError, TypeError) as e:
        raise ApiError(f"response_format: invalid JSON schema: {_one_line(e)}", "response_format") from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error and not error.startswith("WARNING"):
        raise ApiError(f"response_format: invalid JSON schema: {_one_line(error)}", "response_format")
    return grammar


def _one_line(e: object) -> str:
    return " ".join(str(e).split())[:300]


class JsonConstraint:
    """A score processor for one choice: tokens the grammar does not allow next get -inf.

    Called before each sampling step with the previous step's token (the first call sees the prompt's
    last token, which is not part of the answer), it first advances the matcher by that token, then
    masks the scores. Stateful: one per choice.
    """

    def __init__(self, grammar: str, tok: Tokenizer, n_vocab: int, stops: tuple[int, ...]) -> None:
        import llguidance

        self.matcher = llguidance.LLMatcher(_lltokenizer(tok, n_vocab, stops), grammar, log_level=0)
        self.stops = torch.tensor(stops)
        self._started = False

    def __call__(self, last_tokens: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        m = self.matcher
        if self._started:
            m.consume_token(int(last_tokens[0]))
        self._started = True
        if m.is_error() or m.is_stopped():  # cannot continue: only a stop token is left to sample
            allowed = torch.zeros(scores.shape[-1], dtype=torch.bool)
            allowed[self.stops] = True
        else:
            mask = torch.frombuffer(bytearray(m.compute_logit_bias()), dtype=torch.uint8)
            allowed = torch.zeros(scores.shape[-1], dtype=torch.bool)
            n = min(mask.numel(), scores.shape[-1])
            allowed[:n] = mask[:n] > 0
        return scores.masked_fill(~allowed.to(scores.device), float("-inf"))
