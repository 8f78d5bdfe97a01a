"""`OpenAICompatibleLM`: the LM protocol over any server with the OpenAI /v1/completions API (vLLM,
llama.cpp's server, TGI, `gemmakit serve`), with the standard library's urllib only.

Where it sits: an adapter beside `eval.lm.GemmaLM`; tasks talk to it through `eval.lm.LM`. Semantics
are lm-eval 0.4.13's local-completions: log-likelihoods come from an echo request (`echo=True,
logprobs=1, max_tokens=1`: the prompt's own token log-probs), generation from a plain completion with
`stop`. With a local `tokenizer` the prompts are sent as token ids, so the context/continuation split
is exactly GemmaLM's; without one, the split follows the server's text offsets.

Key trade-off: connection errors, 429 and 5xx are retried with exponential backoff (0.5 s, 1 s, 2 s...),
other HTTP errors fail at once with the server's message, so a long evaluation survives a restarting
server but a wrong URL or model name fails in the first second.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

from gemmakit.eval.lm import (
    LM,
    GenerateRequest,
    LMError,
    LoglikelihoodRequest,
    RollingRequest,
    check_max_tokens,
    cut_at_stop,
    encode_pair,
    move_trailing_space,
    rolling_loglikelihoods,
)
from gemmakit.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class OpenAICompatibleLM(LM):
    """A model behind the OpenAI /v1/completions API, queried as lm-eval's `local-completions` does.

    Log-likelihoods come from `echo=True, logprobs=1`: the server returns the log-prob of every prompt
    token (None for the first) plus one new token (`max_tokens=1` as lm-eval sends, since not every
    server accepts 0; that entry is ignored). A token is greedy if its log-prob is the top one.
    Generation is `temperature=0` with `stop`; the text is cut at the stop strings again here, in
    case a server ignores them.

    With `tokenizer` (the served model's), prompts go as token ids split exactly as GemmaLM splits
    them (lm-eval's tokenized requests). Without one they go as text, the server adds <bos>, and the
    continuation is every token whose `text_offset` lies in the continuation's characters.
    """

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout: float = 120.0,
                 tokenizer: Tokenizer | None = None, batch_size: int = 8, max_length: int = 2048,
                 attempts: int = 3) -> None:  # fmt: skip
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise LMError(f"base_url: expected an http:// or https:// URL, got {base_url!r}")
        for field, value in (("batch_size", batch_size), ("max_length", max_length), ("attempts", attempts)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LMError(f"{field}: expected an integer >= 1, got {value!r}")
        base = base_url.rstrip("/")
        self.url = base if base.endswith("/completions") else base + "/completions"
        self.model, self.api_key, self.timeout, self.tokenizer = model, api_key, timeout, tokenizer
        self.batch_size, self.max_length, self.attempts = batch_size, max_length, attempts
        self.name = f"openai:{model}"

    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest]) -> list[tuple[float, bool]]:
        if self.tokenizer is not None:
            return self._score_ids([encode_pair(self.tokenizer, r.context, r.continuation) for r in requests])
        split = [move_trailing_space(r.context, r.continuation) for r in requests]
        answers = self._echo([context + continuation for context, continuation in split])
        out = []
        for i, ((context, continuation), lp) in enumerate(zip(split, answers, strict=True)):
            start, end = len(context), len(context) + len(continuation)
            picked = [k for k in _prompt_tokens(lp, end) if lp["text_offset"][k] >= start]
            if not picked:
                raise LMError(
                    f"{self.url}: loglikelihood request {i}: no scored token inside the continuation"
                )
            out.append(_sum_logprobs(lp, picked))
        return out

    def loglikelihood_rolling(self, requests: Sequence[RollingRequest]) -> list[float]:
        if self.tokenizer is not None:
            return rolling_loglikelihoods(self.tokenizer, requests, self.max_length, self._score_ids)
        answers = iter(self._echo([r.text for r in requests if r.text]))
        totals = []
        for request in requests:
            lp = next(answers) if request.text else None
            totals.append(_sum_logprobs(lp, _prompt_tokens(lp, len(request.text)))[0] if lp else 0.0)
        return totals

    def generate_until(self, requests: Sequence[GenerateRequest]) -> list[str]:
        groups: dict[tuple[tuple[str, ...], int], list[int]] = {}
        for i, request in enumerate(requests):
            check_max_tokens(request, i)
            groups.setdefault((tuple(request.until), request.max_tokens), []).append(i)
        results = [""] * len(requests)
        for (until, max_tokens), indices in groups.items():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                prompts = [self._prompt(requests[i].prompt) for i in chunk]
                payload = {"model": self.model, "prompt": prompts, "max_tokens": max_tokens, "temperature": 0}
                if until:
                    payload["stop"] = list(until)
                for i, choice in zip(chunk, self._post(payload, len(chunk)), strict=True):
                    if not isinstance(choice.get("text"), str):
                        raise LMError(f"{self.url}: a completion choice has no 'text' string")
                    results[i] = cut_at_stop(choice["text"], (*until, "<eos>"))
        return results

    def token_count(self, text: str) -> int:
        if self.tokenizer is not None:
            return len(self.tokenizer.encode(text, bos=False))
        return len(_prompt_tokens(self._echo([text])[0], len(text))) if text else 0

    # ---- plumbing -------------------------------------------------------------------------------

    def _prompt(self, text: str) -> str | list[int]:
        return self.tokenizer.encode(text) if self.tokenizer is not None else text

    def _score_ids(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        answers = self._echo([context + continuation for context, continuation in pairs])
        out = []
        for (context, continuation), lp in zip(pairs, answers, strict=True):
            end = len(context) + len(continuation)
            if len(lp["token_logprobs"]) < end or not continuation:
                got = len(lp["token_logprobs"])
                raise LMError(f"{self.url}: echo returned {got} log-probs for a {end}-token prompt")
            out.append(_sum_logprobs(lp, range(len(context), end)))
        return out

    def _echo(self, prompts: list[str] | list[list[int]]) -> list[dict]:
        """The `logprobs` object of each prompt, scored with echo=True."""
        out = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            payload = {"model": self.model, "prompt": chunk, "max_tokens": 1, "temperature": 0,
                       "logprobs": 1, "echo": True}  # fmt: skip
            for choice in self._post(payload, len(chunk)):
                lp = choice.get("logprobs")
                if not isinstance(lp, dict) or not all(
                    isinstance(lp.get(k), list) for k in ("token_logprobs", "top_logprobs", "text_offset")
                ):
                    raise LMError(
                        f"{self.url}: a choice lacks logprobs.token_logprobs/top_logprobs/text_offset; "
                        "does the server support echo=True with logprobs?"
                    )
                out.append(lp)
        return out

    def _post(self, payload: dict, n_choices: int) -> list[dict]:
        """POST `payload`; its `choices` in prompt order. Connection errors, 429 and 5xx are retried."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(payload).encode("utf-8")
        for attempt in range(self.attempts):
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    body = response.read()
                break
            except urllib.error.HTTPError as e:
                error = LMError(f"{self.url}: HTTP {e.code}: {_one_line(e.read()[:300])}")
                if e.code != 429 and e.code < 500:
                    raise error from None
            except (urllib.error.URLError, OSError) as e:
                error = LMError(f"{self.url}: no answer ({_one_line(getattr(e, 'reason', e))})")
            if attempt + 1 < self.attempts:
                logger.warning("%s; retrying", error)
                time.sleep(min(8.0, 0.5 * 2**attempt))  # 0.5 s, 1 s, 2 s ...
        else:
            raise error
        try:
            choices = json.loads(body)["choices"]
            choices = sorted(choices, key=lambda c: c.get("index", 0))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise LMError(
                f"{self.url}: the answer is not a completions object: {_one_line(body[:300])}"
            ) from None
        if len(choices) != n_choices:
            raise LMError(f"{self.url}: sent {n_choices} prompts, got {len(choices)} choices")
        return choices


def _one_line(value: object) -> str:
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return " ".join(text.split())


def _prompt_tokens(lp: dict, n_chars: int) -> list[int]:
    """Indices of scored prompt tokens: inside the prompt's characters and with a log-prob (not <bos>)."""
    return [
        k for k, at in enumerate(lp["text_offset"]) if at < n_chars and lp["token_logprobs"][k] is not None
    ]


def _sum_logprobs(lp: dict, picked: Sequence[int]) -> tuple[float, bool]:
    """(sum of the picked tokens' log-probs, whether each was the top-1 token), as lm-eval's parser."""
    values, tops = lp["token_logprobs"], lp["top_logprobs"]
    greedy = all(tops[k] and values[k] >= max(tops[k].values()) for k in picked)
    return float(sum(values[k] for k in picked)), bool(greedy)
