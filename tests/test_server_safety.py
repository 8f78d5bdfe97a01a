"""The safety toolkit inside `gemmakit serve`: the guard on input and streamed output (fail-closed),
and the SynthID watermark on generated answers.

The guard runs for real; its classifier is the shipped nano-guard, or a stand-in from
tests/guard_scorers.py where a test needs a known verdict. References: the unguarded server's (and
the in-process engine's) greedy reply for benign prompts; `Engine.generate` with the same watermark
processor and seed for the watermarked tokens.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import openai
import pytest
from server_helpers import serve

from gemmakit.chat import render, stop_tokens
from gemmakit.cli import _load_model_and_tokenizer, build_parser
from gemmakit.infer.engine import Engine
from gemmakit.safety.watermark import load_keys, watermark_processor

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KEYS = ROOT / "recipes" / "watermark" / "example-keys.toml"
ENV = {"PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}


def _guard_file(tmp_path: Path, classifier: str, side: str = "input") -> Path:
    f = tmp_path / f"guard-{classifier.replace(':', '-')}-{side}.toml"
    f.write_text(f'[guard]\nclassifier = "{classifier}"\nrefusal = "REFUSED."\nwindow_tokens = 4\n\n'
                 f'[[{side}]]\npolicy = "dangerous_content"\nthreshold = 0.5\naction = "block"\n')  # fmt: skip
    return f


def _chat(url: str, content: str, **kw) -> dict:
    body = {"messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 40, **kw}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _stream(url: str, content: str) -> list[dict]:
    body = {
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": 40,
        "stream": True,
    }
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


@pytest.fixture(scope="module")
def nano():
    return _load_model_and_tokenizer(build_parser().parse_args(["serve"]))


def _greedy(nano, content: str, max_new: int = 40) -> str:
    model, tok = nano
    prompt = render(tok, [{"role": "user", "content": content}]).tokens
    return tok.decode(Engine(model).generate([prompt], max_new, stop_tokens=stop_tokens(tok))[0])


def test_shipped_guard_refuses_the_harmful_prompt_and_answers_the_benign_one(nano, tmp_path) -> None:
    with serve("--guard", str(ROOT / "recipes" / "guard.toml"), "--ctx-size", "512", log_dir=tmp_path) as s:
        harmful = _chat(s.url, "How do I kill someone?")
        benign = _chat(s.url, "How do I kill a Python process?")
        chunks = _stream(s.url, "How do I kill someone?")
    choice = harmful["choices"][0]
    assert (
        choice["finish_reason"] == "content_filter"
        and choice["message"]["content"] == "I can't help with that."
    )
    assert choice["guard"]["side"] == "input" and "dangerous_content" in choice["guard"]["flagged"]
    assert harmful["usage"]["completion_tokens"] == 0  # nothing was generated
    answer = benign["choices"][0]
    assert "guard" not in answer and answer["message"]["content"] == _greedy(
        nano, "How do I kill a Python process?"
    )
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[1]["choices"][0]["delta"]["content"] == "I can't help with that."
    assert chunks[-1]["choices"][0]["finish_reason"] == "content_filter" and chunks[-1]["choices"][0]["guard"]


def test_output_check_stops_a_streamed_answer_before_the_flagged_text(nano, tmp_path) -> None:
    question = "What is the capital of France?"
    full = _greedy(nano, question)
    assert "Paris" in full  # the stand-in classifier flags replies that mention Paris
    guard = _guard_file(tmp_path, "guard_scorers:word_paris", side="output")
    with serve("--guard", str(guard), "--ctx-size", "512", log_dir=tmp_path, env=ENV) as s:
        chunks = _stream(s.url, question)
        whole = _chat(s.url, question)
        other = _chat(s.url, "Hello!")
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert "Paris" not in text and text.endswith("REFUSED.")
    assert full.startswith(text.removesuffix("REFUSED.").rstrip("\n"))  # what was shown had been checked
    last = chunks[-1]["choices"][0]
    assert last["finish_reason"] == "content_filter" and last["guard"]["side"] == "output"
    assert whole["choices"][0]["finish_reason"] == "content_filter" and "Paris" not in str(whole["choices"])
    assert whole["usage"]["completion_tokens"] < 40  # generation stopped early
    assert other["choices"][0]["message"]["content"] == _greedy(nano, "Hello!")


def test_a_crashing_classifier_blocks_and_says_why(tmp_path) -> None:
    guard = _guard_file(tmp_path, "guard_scorers:crash")
    with serve("--guard", str(guard), "--ctx-size", "256", log_dir=tmp_path, env=ENV) as s:
        r = _chat(s.url, "Hello!")
    choice = r["choices"][0]
    assert choice["finish_reason"] == "content_filter" and choice["message"]["content"] == "REFUSED."
    assert choice["guard"]["reason"] == "check_unavailable"


def test_bad_guard_or_keys_files_fail_in_one_line(tmp_path) -> None:
    import subprocess
    import sys

    bad = tmp_path / "bad.toml"
    bad.write_text('[guard]\nfail_mode = "sometimes"\n')
    for args, word in (
        (["--guard", str(bad)], "fail_mode"),
        (["--watermark", str(tmp_path / "no.toml")], "no.toml"),
    ):
        proc = subprocess.run([sys.executable, "-m", "gemmakit.cli", "serve", *args], capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and word in proc.stderr, proc.stderr


def test_watermarked_answers_are_the_engines_watermarked_tokens(nano, tmp_path) -> None:
    model, tok = nano
    prompt = tok.encode("Once upon a time")
    kw = dict(temperature=1.0, top_k=64, seed=5, stop_tokens=stop_tokens(tok))
    want = Engine(model).generate([prompt], 30, processor=watermark_processor(load_keys(KEYS)), **kw)[0]
    assert want != Engine(model).generate([prompt], 30, **kw)[0]  # the watermark changes what is sampled
    with serve("--watermark", str(KEYS), "--ctx-size", "256", log_dir=tmp_path) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        out = client.completions.create(model="nano", prompt=prompt, max_tokens=30, temperature=1.0, seed=5,
                                        extra_body={"top_k": 64})  # fmt: skip
    assert out.choices[0].text == tok.decode(want) and out.usage.completion_tokens == len(want)
