"""`gemmakit serve` as a real uvicorn process, driven by the official `openai` client and raw HTTP.

References: the same model loaded in this process (the CLI's own loader) for greedy replies and
log-probabilities; OpenAI's stream shape as the anchor servers test it (reference serving §5.1);
`GemmaLM` in-process for `gemmakit eval --endpoint`.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import re
from pathlib import Path

import httpx
import openai
import pytest
import torch
from eval_helpers import tiny_pair, write_samples
from server_helpers import serve

from gemmakit.chat import render, stop_tokens
from gemmakit.cli import _load_model_and_tokenizer, build_parser
from gemmakit.eval.lm import GemmaLM
from gemmakit.eval.lm_http import OpenAICompatibleLM
from gemmakit.eval.tasks import run_task
from gemmakit.infer.engine import Engine

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def nano(tmp_path_factory):
    """(server, in-process model, tokenizer): the shipped nano model, loaded as `gemmakit serve` loads it."""
    model, tok = _load_model_and_tokenizer(build_parser().parse_args(["serve"]))
    with serve("--parallel", "4", "--ctx-size", "512", log_dir=tmp_path_factory.mktemp("serve")) as s:
        yield s, model, tok


def _client(served, **kw) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=served.url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw
    )


def _greedy(model, tok, messages, max_new: int) -> tuple[str, list[int]]:
    prompt = render(tok, messages).tokens
    ids = Engine(model).generate([prompt], max_new, stop_tokens=stop_tokens(tok))[0]
    return tok.decode(ids), prompt


def test_openai_client_chats_and_streams_the_in_process_greedy_reply(nano) -> None:
    served, model, tok = nano
    client = _client(served)
    want, prompt = _greedy(model, tok, MESSAGES, 40)
    reply = client.chat.completions.create(model="nano", messages=MESSAGES, temperature=0, max_tokens=40)
    assert reply.choices[0].message.content == want and want.strip()
    assert reply.choices[0].message.role == "assistant" and reply.object == "chat.completion"
    assert reply.usage.prompt_tokens == len(prompt)  # the rendered Gemma prompt, never truncated
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

    chunks = list(client.chat.completions.create(model="nano", messages=MESSAGES, temperature=0, max_tokens=40,
                                                 stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content is None
    assert len({c.id for c in chunks}) == 1 and "cmpl" in chunks[0].id
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [reply.choices[0].finish_reason]  # exactly one chunk carries it
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want


def test_stream_ends_with_done_and_usage_absent_without_include_usage(nano) -> None:
    served, _, _ = nano
    body = {"messages": MESSAGES, "max_tokens": 5, "stream": True}
    with httpx.stream("POST", served.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all("usage" in c and c["usage"] is None for c in chunks)
    assert "content" not in chunks[-1]["choices"][0]["delta"]  # the finish chunk has no content


def test_chat_logprobs_join_to_the_text_and_equal_the_model(nano) -> None:
    served, model, tok = nano
    reply = _client(served).chat.completions.create(model="nano", messages=MESSAGES, temperature=0, max_tokens=8,
                                                    logprobs=True, top_logprobs=3)  # fmt: skip
    content = reply.choices[0].logprobs.content
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    prompt = render(tok, MESSAGES).tokens
    ids = [tok.encode(t.token, bos=False) for t in content]
    assert all(len(i) == 1 for i in ids)  # every generated token here is one whole piece
    ids = [i[0] for i in ids]
    with torch.inference_mode():
        logp = torch.log_softmax(model(torch.tensor([prompt + ids]))[0, len(prompt) - 1 : -1].float(), -1)
    for k, t in enumerate(content):
        # batched bf16-weight decode vs one uncached forward: float32 summation order, |logp| < 30
        assert t.logprob == pytest.approx(float(logp[k, ids[k]]), abs=1e-3)
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token
        assert bytes(t.bytes) == tok.token_bytes(ids[k])


def test_completions_echo_scores_every_prompt_token(nano) -> None:
    served, model, tok = nano
    text = "The capital of France is Paris."
    out = _client(served).completions.create(model="nano", prompt=text, max_tokens=1, temperature=0, echo=True,
                                             logprobs=2)  # fmt: skip
    lp = out.choices[0].logprobs
    ids = tok.encode(text)
    assert out.choices[0].text.startswith(text) and len(lp.tokens) == len(ids) + out.usage.completion_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    with torch.inference_mode():
        want = torch.log_softmax(model(torch.tensor([ids]))[0, :-1].float(), -1)
    for k in range(1, len(ids)):
        assert lp.token_logprobs[k] == pytest.approx(float(want[k - 1, ids[k]]), abs=1e-4)
    assert "".join(lp.tokens[: len(ids)]) == text
    assert [lp.text_offset[k] for k in range(len(ids))] == [
        len("".join(lp.tokens[:k])) for k in range(len(ids))
    ]


def test_concurrent_clients_each_get_their_own_greedy_reply(nano) -> None:
    served, model, tok = nano
    questions = ["Hello!", "What is 3 + 4?", "Tell me a story.", "Who are you?", "What color is the sky?",
                 "Name a fruit.", "How are you?", "What is the capital of Italy?"]  # fmt: skip
    conversations = [[{"role": "user", "content": q}] for q in questions]
    client = _client(served)

    def ask(messages):
        r = client.chat.completions.create(model="nano", messages=messages, temperature=0, max_tokens=24)
        return r.choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # 8 clients, 4 rows: half of them queue
        got = list(pool.map(ask, conversations))
    assert got == [_greedy(model, tok, m, 24)[0] for m in conversations]


def test_stop_strings_cut_the_reply_across_tokens_and_n_choices(nano) -> None:
    served, model, tok = nano
    full, _ = _greedy(model, tok, MESSAGES, 40)
    stop = full[5:9]  # four characters that may span two tokens
    client = _client(served)
    for stream in (False, True):
        kw = dict(model="nano", messages=MESSAGES, temperature=0, max_tokens=40, stop=[stop], n=2)
        if stream:
            texts = ["", ""]
            for c in client.chat.completions.create(stream=True, **kw):
                for choice in c.choices:
                    texts[choice.index] += choice.delta.content or ""
        else:
            r = client.chat.completions.create(**kw)
            texts = [c.message.content for c in r.choices]
            assert [c.finish_reason for c in r.choices] == ["stop", "stop"]
        assert texts == [full[: full.index(stop)]] * 2


def test_a_second_turn_reuses_the_first_turns_cache(nano) -> None:
    served, _, tok = nano
    client = _client(served)
    first = [{"role": "user", "content": "Tell me about cats."}]
    r1 = client.chat.completions.create(model="nano", messages=first, temperature=0, max_tokens=20)
    second = first + [{"role": "assistant", "content": r1.choices[0].message.content},
                      {"role": "user", "content": "And dogs?"}]  # fmt: skip
    r2 = client.chat.completions.create(model="nano", messages=second, temperature=0, max_tokens=20)
    # at least the first turn's prompt is not prefilled again
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens


def _post(served, path: str, body, **kw) -> httpx.Response:
    return httpx.post(served.url + path, content=body if isinstance(body, (bytes, str)) else json.dumps(body),
                      headers={"content-type": "application/json", **kw.pop("headers", {})}, timeout=60, **kw)  # fmt: skip


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, ["invalid JSON"]),
    (b'"just a string"', 400, ["JSON object", "a string"]),
    (b"[1, 2]", 400, ["JSON object", "an array"]),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, ["NaN"]),
    (b'{"messages": [], "messages": []}', 400, ["duplicate key"]),
    (b"\xff\xfe", 400, ["UTF-8"]),
    ({"messages": "hi"}, 400, ["messages"]),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, ["messages[0].role", "robot"]),
    ({"messages": [{"role": "user", "content": 5}]}, 400, ["messages[0].content"]),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, ["message 0", "user"]),
    ({"messages": [{"role": "user", "content": "hi"}], "max_token": 5}, 400, ["max_token"]),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, ["temperature"]),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "1"}, 400, ["temperature"]),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1e-9}, 400, ["temperature"]),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, ["top_p"]),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": -0.1}, 400, ["top_p"]),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 1.000000001}, 400, ["top_p"]),
    ({"messages": [{"role": "user", "content": "hi"}], "top_k": -2}, 400, ["top_k"]),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, 400, ["max_tokens"]),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1.5}, 400, ["max_tokens"]),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "10"}, 400, ["max_tokens"]),
    ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"99999": 1}}, 400, ["logit_bias"]),
    ({"messages": [{"role": "user", "content": "hi"}], "top_k": 1.5}, 400, ["top_k"]),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, ["max_tokens"]),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2**31}, 400, ["max_tokens"]),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 99}, 400, ["n:"]),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a"] * 17}, 400, ["stop"]),
    ({"messages": [{"role": "user", "content": "hi"}], "seed": 2**63}, 400, ["seed"]),
    ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"x": 1}}, 400, ["logit_bias"]),
    ({"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}}, 400,
     ["stream_options"]),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "xml"}}, 400,
     ["response_format.type", "xml"]),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema",
      "json_schema": {"schema": {"type": "nonsense"}}}}, 400, ["invalid JSON schema", "nonsense"]),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4"}, 404, ["gpt-4", "nano"]),
])  # fmt: skip
def test_bad_requests_get_openai_errors_naming_the_field(nano, body, status, words) -> None:
    served, _, _ = nano
    r = _post(served, "/v1/chat/completions", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["type"], str)
    assert all(w in error["message"] for w in words), error["message"]
    assert "Traceback" not in r.text and not re.search(r"(?<!\w)/[\w.-]+/", r.text)  # no paths
    assert _post(served, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1}).status_code == 200


def test_sampling_edges_that_are_accepted_and_greedy_repeats(nano) -> None:
    served, _, _ = nano
    r = _post(served, "/v1/completions", {"prompt": [2, -1, 5], "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"  # negative token id
    for top_p in (1, 1e-9):
        assert (
            _post(
                served, "/v1/chat/completions", {"messages": MESSAGES, "top_p": top_p, "max_tokens": 3}
            ).status_code
            == 200
        )
    greedy = [_post(served, "/v1/chat/completions", {"messages": MESSAGES, "temperature": 0, "max_tokens": 12})
              .json()["choices"][0]["message"]["content"] for _ in range(2)]  # fmt: skip
    assert greedy[0] == greedy[1] and greedy[0]


def test_context_limit_is_a_400_with_both_numbers_and_never_truncates(nano) -> None:
    served, _, tok = nano
    ids = [tok.bos_id] + [tok.encode(" a", bos=False)[0]] * 510
    ok = _post(served, "/v1/completions", {"prompt": ids, "max_tokens": 1})  # 511 + 1 = the context
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == 511
    r = _post(served, "/v1/completions", {"prompt": ids + ids[1:2], "max_tokens": 1})
    assert r.status_code == 400 and all(w in r.json()["error"]["message"] for w in ("512", "513"))
    assert r.json()["error"]["code"] == "context_length_exceeded"


def test_guardrails_content_type_body_size_host_and_routes(nano) -> None:
    served, _, _ = nano
    r = httpx.post(
        served.url + "/v1/completions", content=b'{"prompt": "a"}', headers={"content-type": "text/plain"}
    )
    assert r.status_code == 415
    r = _post(served, "/v1/completions", b'{"prompt": "' + b"a" * (3 * 2**20) + b'"}')
    assert r.status_code == 413 and "exceeds" in r.json()["error"]["message"]
    r = httpx.get(served.url + "/v1/models", headers={"host": "attacker.example"})  # DNS rebinding
    assert r.status_code == 403
    assert httpx.get(served.url + "/v1/models", headers={"host": "localhost:1234"}).status_code == 200
    r = httpx.get(served.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    evil = {"origin": "http://attacker.example", "access-control-request-method": "POST"}
    for method in ("GET", "OPTIONS"):  # CORS is off: no page elsewhere may read the answers (S9)
        r = httpx.request(method, served.url + "/v1/models", headers=evil)
        assert not any(h.startswith("access-control-") for h in r.headers), dict(r.headers)
    models = httpx.get(served.url + "/v1/models").json()
    assert models["data"][0]["id"] == "nano" and models["data"][0]["context_length"] == 512
    assert httpx.get(served.url + "/ready").status_code == 200
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(httpx.get(served.url + "/metrics").text)}
    assert families["gemmakit_generated_tokens"].type == "counter"  # the parser drops _total
    assert families["gemmakit_generated_tokens"].samples[0].value > 0
    assert families["gemmakit_requests_running"].samples[0].value == 0
    ttft = {
        s.name: s for s in families["gemmakit_time_to_first_token_seconds"].samples if "le" not in s.labels
    }
    inf = [
        s for s in families["gemmakit_time_to_first_token_seconds"].samples if s.labels.get("le") == "+Inf"
    ]
    assert ttft["gemmakit_time_to_first_token_seconds_count"].value == inf[0].value > 0
    assert families["gemmakit_inter_token_seconds"].type == "histogram"


def test_api_key_is_required_everywhere_but_health(tmp_path) -> None:
    with serve("--api-key", "s3cret", "--ctx-size", "256", log_dir=tmp_path) as served:
        for path in ("/v1/models", "/metrics"):
            for headers in ({}, {"authorization": "Bearer wrong"}):
                r = httpx.get(served.url + path, headers=headers)
                assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        for path in ("/health", "/ready", "/", "/static/chat.js"):  # probes and the page itself
            assert httpx.get(served.url + path).status_code == 200, path
        r = httpx.post(served.url + "/v1/completions", json={"prompt": "a"}, headers={"x-api-key": "s3cret"})
        assert r.status_code == 200
        r = _client(served, api_key="s3cret").chat.completions.create(
            model="nano", messages=MESSAGES, max_tokens=3
        )
        assert r.choices[0].message.content
        with pytest.raises(openai.AuthenticationError):
            _client(served, api_key="nope").models.list()
    assert "s3cret" not in served.output()


def test_binding_every_interface_without_a_key_warns(tmp_path) -> None:
    with serve("--host", "0.0.0.0", "--ctx-size", "256", log_dir=tmp_path) as served:
        # not loopback-bound: a proxy's Host names are fine; the open port is logged at every start (S9)
        assert httpx.get(served.url + "/v1/models", headers={"host": "llm.example"}).status_code == 200
    assert "without an API key" in served.output()


def test_eval_through_the_server_equals_in_process(tmp_path) -> None:
    hf_dir, model, tok = tiny_pair(tmp_path / "m")
    data = tmp_path / "data"
    write_samples(data)
    local = GemmaLM(model, tok, batch_size=4)
    with serve("--model", str(hf_dir), "--tokenizer", str(tok.source), "--attn", "eager", "--model-id", "tiny",
               log_dir=tmp_path) as served:  # fmt: skip
        remote = OpenAICompatibleLM(served.url + "/v1", "tiny", tokenizer=tok)
        for task in ("arc_easy", "boolq"):
            ours, theirs = (
                run_task(task, remote, data, "lm-eval", limit=8),
                run_task(task, local, data, "lm-eval", limit=8),
            )
            assert ours.metrics == theirs.metrics, task
            for a, b in zip(ours.samples, theirs.samples, strict=True):
                for x, y in zip(a.responses, b.responses, strict=True):  # batch mates move float32 sums ~1e-6
                    assert math.isclose(x[0], y[0], abs_tol=1e-4) and x[1] == y[1], (task, x, y)


def test_serve_flags_and_paths_fail_in_one_line(tmp_path) -> None:
    import subprocess
    import sys

    for args, words in ((["--model", str(tmp_path / "nope")], ["--model", "nope", "no such"]),
                        (["--port", "70000"], ["--port", "70000"]), (["--parallel", "0"], ["--parallel"])):  # fmt: skip
        proc = subprocess.run([sys.executable, "-m", "gemmakit.cli", "serve", *args], capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
        assert all(w in proc.stderr for w in words), proc.stderr


def _corpus() -> list[tuple[str, bytes]]:
    """>= 200 malformed requests (reliability S1, S2): bad JSON, wrong types, out-of-range sampling
    parameters, bad messages and prompts, unknown fields; (path, body)."""
    ok = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    raw = [b"", b"{", b"{}}", b"nul", b"[]", b"42", b"null", b'"s"', b"true", b"\xff", b"{\"a\": 1,}", b"{'a': 1}",
           b"[" * 10000 + b"]" * 10000, b'{"a":' * 10000 + b"1" + b"}" * 10000, b'{"messages": Infinity}',
           b'{"max_tokens": -Infinity}', b'{"x": 1, "x": 2}']  # fmt: skip
    out = [(path, body) for path in ("/v1/chat/completions", "/v1/completions") for body in raw]
    bad_values = {
        "temperature": [-1, -1e-9, "1", [1], {"a": 1}, True, 1e9],
        "top_p": [0, -0.1, 1 + 1e-9, "0.5", [0.5]],
        "top_k": [-2, 1.5, "3", 2**40],
        "max_tokens": [0, -1, 2**31, 1.5, "10", True],
        "n": [0, 9, 1.5, "2"],
        "stop": [["a"] * 17, 5, [""], [1], {"a": 1}],
        "seed": [2**63, -(2**63) - 1, 1.5, "7"],
        "logit_bias": [{"-1": 1}, {"999999999999": 1}, {"5": 101}, {"5": "x"}, [1], "x"],
        "stream": ["yes", 1],
        "logprobs": ["yes", 2],
        "top_logprobs": [3, -1, 21],
        "messages": [
            None,
            "string",
            [123],
            [{}],
            [{"role": 123}],
            [{"role": "system", "content": 123}],
            [{"role": "user", "content": "a"}, {}],
            [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "assistant", "content": "c"},
            ],
            [{"content": "hello"}],
            [{"role": "tool", "content": "x"}],
            [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
            [{"role": "user", "content": "a", "extra": 1}],
            [],
        ],
        "chat_template": ["{{ ''.__class__.__mro__ }}"],  # a request-supplied template (S13): refused
        "tools": [[{"type": "function", "function": {"name": "f"}}]],
        "tool_choice": ["auto"],
        "response_format": [
            {"type": "json_schema"},
            {"type": "xml"},
            "json",
            {"type": "json_schema", "json_schema": {"schema": {"type": 5}}},
        ],
        "presence_penalty": [0.5, 3, "0"],
        "frequency_penalty": [-0.5],
        "model": [5, "gpt-4"],
        "stream_options": [{"include_usage": True}],
        "user": [5],
        "max_completion_tokens": [0, "5"],
        "unknown_field": [1],
    }
    for field, values in bad_values.items():
        for v in values:
            body = {**ok, field: v}
            if field == "top_logprobs" and v == 3:
                body["logprobs"] = False  # top_logprobs without logprobs
            out.append(("/v1/chat/completions", json.dumps(body).encode()))
    completion = {"prompt": "a", "max_tokens": 2}
    for v in [None, 5, [], [[]], [-1], [10**9], [1.5], [[1], "a", 3], {"a": 1}, ["a"] * 65, [True]]:
        out.append(("/v1/completions", json.dumps({**completion, "prompt": v}).encode()))
    for field, v in [("echo", "yes"), ("logprobs", 21), ("logprobs", True), ("stream", 1)]:
        out.append(("/v1/completions", json.dumps({**completion, field: v}).encode()))
    out.append(("/v1/completions", json.dumps({**completion, "echo": True, "stream": True}).encode()))
    for path in ("/v1/chat/completions", "/v1/completions"):
        for n in range(40):  # truncations of a valid body
            body = json.dumps(
                {**ok, "prompt": "a"} if path.endswith("/completions") and "chat" not in path else ok
            )
            out.append((path, body[: max(1, len(body) * n // 40)].encode()))
    return out


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_corpus_of_malformed_requests_gets_4xx_only(nano) -> None:
    served, _, _ = nano
    corpus = _corpus()
    assert len(corpus) >= 200
    before = _rss_kb(served.proc.pid)
    with httpx.Client(base_url=served.url, timeout=60) as client:
        for i, (path, body) in enumerate(corpus):
            r = client.post(path, content=body, headers={"content-type": "application/json"})
            assert 400 <= r.status_code < 500, (i, path, body[:200], r.status_code, r.text[:300])
            error = r.json()["error"]
            assert error["message"] and "Traceback" not in r.text, (i, r.text[:300])
            assert not re.search(r"(?<!\w)/[\w.-]+/", error["message"]), error["message"]  # no paths (S14)
            if i % 50 == 49:  # a valid request after each batch, and the probe
                assert (
                    client.post(
                        "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2}
                    ).status_code
                    == 200
                )
                assert client.get("/health").status_code == 200
    assert _rss_kb(served.proc.pid) - before < 50 * 1024  # < 50 MB of growth over the corpus


def test_with_an_api_key_every_route_needs_it_but_the_exempt_ones(tmp_path) -> None:
    from gemmakit.server import ServeConfig, create_app
    from gemmakit.server.app import _Guardrails

    app = create_app(lambda: (None, None), ServeConfig())
    routes = [(r.path, sorted(r.methods)[0]) for r in app.app.routes if hasattr(r, "methods")]
    assert len(routes) >= 8
    with serve("--api-key", "k", "--ctx-size", "256", log_dir=tmp_path) as served:
        for path, method in routes:  # enumerated from the app: a new route cannot be missed (S8)
            r = httpx.request(method, served.url + path, json={})
            if path in _Guardrails.EXEMPT:
                assert r.status_code != 401, path
            else:
                assert r.status_code == 401, (path, r.status_code)


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
          "age": {"type": "integer", "minimum": 0, "maximum": 150}, "tags": {"type": "array", "items":
          {"enum": ["a", "b"]}, "maxItems": 3}}, "required": ["name", "age", "tags"], "additionalProperties": False}  # fmt: skip


def test_response_format_json_schema_output_always_validates(nano) -> None:
    import jsonschema

    served, _, _ = nano
    client = _client(served)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    for seed in range(3):  # sampled: different objects, all valid
        r = client.chat.completions.create(model="nano", messages=[{"role": "user", "content": "A person, as JSON."}],
                                           temperature=1.0, seed=seed, max_tokens=120, response_format=fmt)  # fmt: skip
        assert r.choices[0].finish_reason == "stop"  # the grammar closed the object, then only EOS was left
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    chunks = list(client.chat.completions.create(model="nano", messages=MESSAGES, temperature=0, max_tokens=120,
                                                 response_format=fmt, stream=True))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)
    # any JSON object: nothing bounds its strings, so it may be cut by max_tokens, but never goes astray
    r = client.chat.completions.create(model="nano", messages=MESSAGES, temperature=0, max_tokens=60,
                                       response_format={"type": "json_object"})  # fmt: skip
    content, finish = r.choices[0].message.content, r.choices[0].finish_reason
    assert content.startswith("{") and (finish == "length" or isinstance(json.loads(content), dict))
