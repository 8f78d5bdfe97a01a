"""GemmaLM and OpenAICompatibleLM against independent references.

References: lm-eval 0.4.13's HFLM on the transformers twin of the same random model (edge cases of
the LM protocol: empty context, trailing spaces, left truncation, rolling windows, stop strings),
lm-eval's own rolling-window functions, and, for the HTTP adapter, a real http.server speaking
/v1/completions (tests/eval_helpers.py) whose numbers come from a plain one-sequence forward.
"""

from __future__ import annotations

import math
import socket

import pytest

pytest.importorskip("lm_eval")

from eval_helpers import (  # noqa: E402
    TIE_GAP,
    CompletionsServer,
    continuation_gaps,
    greedy_gap,
    hflm,
    intra_op_threads,
    is_greedy_settled,
    tiny_pair,
)

from gemmakit.eval.lm import (  # noqa: E402
    GemmaLM,
    GenerateRequest,
    LMError,
    LoglikelihoodRequest,
    RollingRequest,
    rolling_windows,
)
from gemmakit.eval.lm_http import OpenAICompatibleLM

_TEXT = "the a of and to in is it that was for on with as he she they you we this be at by not"
WORDS = _TEXT.split()
LONG = " ".join(WORDS[i % len(WORDS)] for i in range(90))  # ~170 tokens: beyond max_length 48
REQUESTS = [
    LoglikelihoodRequest("Question: hello world\nAnswer:", " the data"),
    LoglikelihoodRequest("", "hello world"),  # empty context: <bos> only
    LoglikelihoodRequest("the a of ", "and to"),  # trailing space moves to the continuation
    LoglikelihoodRequest("   ", " x y"),  # all spaces: the context becomes <bos>
    LoglikelihoodRequest(LONG, " is it that"),  # left truncation at max_length
    LoglikelihoodRequest("foo", "bar"),  # no boundary space: tokens may straddle
    LoglikelihoodRequest("Question: x", "\n\n"),
    LoglikelihoodRequest("He said", " " + " ".join(WORDS[:30])),
]
# Log-likelihoods are float32 sums (as lm-eval's); a rolling total over ~350 tokens is ~-1250, where
# one float32 ulp is 1.2e-4, so totals are compared relatively.
ROLLING_RTOL = 1e-6
TEXTS = ["", "hello", "the data model", " ".join(WORDS[:20]), LONG, LONG + " " + LONG]
# Stop strings avoid letters of special pieces' names ("e" of "<unused3>"): HF's stopping criterion
# also matches those, gemmakit only the text (eval/lm.py).
PROMPTS = [
    GenerateRequest("Question: hello world\nAnswer:", ("h",), 12),
    GenerateRequest("the a of", (), 12),
    GenerateRequest(LONG, (" ", "Question:"), 12),  # left-truncated prompt
    GenerateRequest("foo bar", ("y", "."), 5),
    GenerateRequest("x", ("zz",), 12),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for this module (why, with numbers: eval_helpers.intra_op_threads)."""
    with intra_op_threads(1):
        yield


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return tiny_pair(tmp_path_factory.mktemp("lm"))


def _instances(kind: str, args: list[tuple]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in args]


def _settled(pair, requests, max_length=None) -> list[bool]:
    """Per request: whether no near-tie can flip its is_greedy flag (eval_helpers.TIE_GAP)."""
    _, model, tok = pair
    return [
        is_greedy_settled(continuation_gaps(model, tok, r.context, r.continuation, max_length))
        for r in requests
    ]


def _assert_scores_close(ours, theirs, settled, tol=1e-5):
    """Log-likelihoods within `tol` or ROLLING_RTOL (float32 sums: one ulp of the 45-token continuation's
    -297 is 3.1e-5; with AVX2 GEMMs the server's one-row forward and GemmaLM's batch differ by 2.7e-5
    there); is_greedy equal wherever `settled` (all requests here; smallest |gap| measured: 0.039)."""
    assert len(ours) == len(theirs) == len(settled) and sum(settled) >= 0.9 * len(settled)
    for i, ((ll, greedy), (ref_ll, ref_greedy)) in enumerate(zip(ours, theirs, strict=True)):
        assert math.isclose(ll, ref_ll, rel_tol=ROLLING_RTOL, abs_tol=tol), f"request {i}: {ll} vs {ref_ll}"
        assert greedy == ref_greedy or not settled[i], f"request {i}: is_greedy {greedy} vs {ref_greedy}"


def _assert_same_text(ours, theirs, pair, requests, max_length=None):
    """Greedy generations equal wherever gemmakit's path has no near-tie (measured: smallest gap 5.7e-4)."""
    _, model, tok = pair
    settled = [greedy_gap(model, tok, r.prompt, r.max_tokens, max_length) > TIE_GAP for r in requests]
    assert len(ours) == len(theirs) == len(settled) and sum(settled) >= 0.8 * len(settled)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a == b or not settled[i], f"request {i}: {a!r} vs {b!r}"


# ---- GemmaLM against lm-eval's HFLM ----------------------------------------------------------------


def test_loglikelihood_matches_hflm(pair):
    hf_dir, model, tok = pair
    # a continuation that IS the greedy one, so is_greedy is exercised in both directions; it must
    # be plain text that re-tokenizes to the same ids (reserved pieces' names do not)
    engine = GemmaLM(model, tok).engine
    greedy = None
    for word in WORDS:
        context = f"Question: {word}\nAnswer:"
        new = engine.generate([tok.encode(context)], 2)[0]
        if tok.encode(context + tok.decode(new)) == tok.encode(context) + new:
            greedy = LoglikelihoodRequest(context, tok.decode(new))
            break
    assert greedy is not None
    requests = [*REQUESTS, greedy]
    theirs = hflm(hf_dir, max_length=48).loglikelihood(
        _instances("loglikelihood", [(r.context, r.continuation) for r in requests])
    )
    ours = GemmaLM(model, tok, batch_size=3, max_length=48).loglikelihood(requests)
    _assert_scores_close(ours, theirs, _settled(pair, requests, 48))
    assert ours[-1][1] and not all(g for _, g in ours)


def test_rolling_matches_hflm(pair):
    hf_dir, model, tok = pair
    # add_bos_token=False: the text is scored after a <bos> prefix, not after two (see eval/lm.py)
    ref = hflm(hf_dir, max_length=48, add_bos_token=False)
    theirs = ref.loglikelihood_rolling(_instances("loglikelihood_rolling", [(t,) for t in TEXTS]))
    ours = GemmaLM(model, tok, batch_size=4, max_length=48).loglikelihood_rolling(
        [RollingRequest(t) for t in TEXTS]
    )
    assert ours[0] == theirs[0] == 0.0
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert math.isclose(a, b, rel_tol=ROLLING_RTOL, abs_tol=1e-5), f"text {i}: {a} vs {b}"
    assert GemmaLM(model, tok).token_count(LONG) == len(tok.encode(LONG, bos=False))


def test_generate_until_matches_hflm(pair):
    hf_dir, model, tok = pair
    args = [
        (p.prompt, {"until": list(p.until), "max_gen_toks": p.max_tokens, "do_sample": False})
        for p in PROMPTS
    ]
    theirs = hflm(hf_dir, max_length=64).generate_until(_instances("generate_until", args))
    for batch_size in (1, 4):
        ours = GemmaLM(model, tok, batch_size=batch_size, max_length=64).generate_until(PROMPTS)
        _assert_same_text(ours, theirs, pair, PROMPTS, 64)
    assert len({t for t in theirs if t}) >= 3, theirs  # not a degenerate model


def test_generated_text_decodes_like_hf_tokenizers(pair):
    import random

    import transformers

    hf_dir, model, tok = pair
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    lm = GemmaLM(model, tok)
    rng = random.Random(0)
    byte_ids = [i for i in range(tok.vocab_size) if tok.id_to_piece(i).startswith("<0x")]
    for _ in range(300):  # byte pieces are over-represented: invalid UTF-8 runs are the hard case
        ids = [
            rng.choice(byte_ids) if rng.random() < 0.5 else rng.randrange(tok.vocab_size) for _ in range(12)
        ]
        assert lm._text(ids) == hf_tok.decode(ids, skip_special_tokens=True), ids


def test_rolling_windows_match_lm_eval():
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    for n in range(0, 23):
        for max_len in range(1, 8):
            tokens = list(range(10, 10 + n))
            reference = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(tokens, prefix_token=2, max_seq_len=max_len, context_len=1)
            ]
            assert rolling_windows(tokens, 2, max_len) == reference, (n, max_len)


def test_scores_do_not_depend_on_batch_mates(pair):
    _, model, tok = pair
    requests = REQUESTS * 2 + [LoglikelihoodRequest("a", " b")]
    alone = GemmaLM(model, tok, batch_size=1).loglikelihood(requests)
    settled = _settled(pair, requests)  # batch mates change padding and GEMM shapes: rounding only
    for batch_size in (3, 8, 32):
        _assert_scores_close(
            GemmaLM(model, tok, batch_size=batch_size).loglikelihood(requests), alone, settled
        )


def test_bad_arguments_are_one_line_errors(pair):
    _, model, tok = pair
    cases = [
        (lambda: GemmaLM(model, tok, batch_size=0), "batch_size"),
        (lambda: GemmaLM(model, tok, max_length=10**6), "max_length"),
        (
            lambda: GemmaLM(model, tok).loglikelihood([LoglikelihoodRequest("a", "")]),
            "continuation has 0 tokens",
        ),
        (lambda: GemmaLM(model, tok).generate_until([GenerateRequest("a", (), 0)]), "max_tokens"),
        (lambda: GemmaLM(model, tok).generate_until([GenerateRequest("a", (), 2.5)]), "max_tokens"),
    ]
    for call, words in cases:
        with pytest.raises(LMError) as info:
            call()
        assert words in str(info.value) and "\n" not in str(info.value)
    # A budget as large as the context is fitted (the prompt keeps up to half of it), not refused.
    small = GemmaLM(model, tok, max_length=8)
    prompt = "the data of the model"
    fitted = small._fit(GenerateRequest(prompt, (), 8), 0)
    assert fitted.max_tokens == 8 - min(len(tok.encode(prompt)), 4)
    assert isinstance(small.generate_until([GenerateRequest(prompt, (), 8)])[0], str)


# ---- OpenAICompatibleLM against a real HTTP server --------------------------------------------------


@pytest.mark.parametrize("tokenized", [False, True], ids=["text", "token-ids"])
def test_openai_adapter_matches_gemma_lm(pair, tokenized):
    hf_dir, model, tok = pair
    reference = GemmaLM(model, tok, batch_size=4)
    server = CompletionsServer(model, tok, hf_dir)
    with server as url:
        client = OpenAICompatibleLM(url, "tiny", tokenizer=tok if tokenized else None, batch_size=3)
        # in text mode a token straddling the context end counts as context: skip "foo" + "bar"
        requests = [r for r in REQUESTS if tokenized or r.context != "foo"]
        _assert_scores_close(
            client.loglikelihood(requests), reference.loglikelihood(requests), _settled(pair, requests)
        )
        texts = TEXTS[:4]
        texts = [RollingRequest(t) for t in texts]
        for a, b in zip(
            client.loglikelihood_rolling(texts), reference.loglikelihood_rolling(texts), strict=True
        ):
            assert math.isclose(a, b, rel_tol=ROLLING_RTOL, abs_tol=1e-5), (a, b)
        prompts = [p for p in PROMPTS if p.prompt != LONG]
        _assert_same_text(client.generate_until(prompts), reference.generate_until(prompts), pair, prompts)
        assert client.token_count(LONG) == reference.token_count(LONG)
    echo = next(body for body in server.requests if body.get("echo"))
    assert (echo["logprobs"], echo["max_tokens"], echo["temperature"]) == (1, 1, 0)
    assert all(isinstance(p, list) == tokenized for p in echo["prompt"])


def test_openai_adapter_rolling_windows_with_tokenizer(pair):
    _, model, tok = pair
    texts = [RollingRequest(t) for t in TEXTS]
    with CompletionsServer(model, tok) as url:
        ours = OpenAICompatibleLM(url, "tiny", tokenizer=tok, max_length=48).loglikelihood_rolling(texts)
    reference = GemmaLM(model, tok, max_length=48).loglikelihood_rolling(texts)
    for a, b in zip(ours, reference, strict=True):
        assert math.isclose(a, b, rel_tol=ROLLING_RTOL, abs_tol=1e-5), (a, b)


def test_openai_adapter_errors(pair):
    _, model, tok = pair
    with CompletionsServer(model, tok, fail_with=500) as url, pytest.raises(LMError) as info:
        OpenAICompatibleLM(url, "tiny", attempts=1).generate_until([GenerateRequest("a")])
    message = str(info.value)
    assert "HTTP 500" in message and "/v1/completions" in message and "\n" not in message
    with CompletionsServer(model, tok) as url, pytest.raises(LMError, match="HTTP 404"):
        OpenAICompatibleLM(url + "/nothing", "tiny", attempts=1).generate_until([GenerateRequest("a")])
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(LMError, match="no answer"):
        OpenAICompatibleLM(f"http://127.0.0.1:{port}/v1", "tiny", attempts=1, timeout=5).token_count("a")
    with pytest.raises(LMError, match="base_url"):
        OpenAICompatibleLM("localhost:8000", "tiny")
