"""gemmakit.infer: KV cache, sampler and engine.

References: a single uncached forward of our model (itself bit-identical to HF eager, see
test_model) for the cache; HF transformers' `generate` for greedy continuations, left padding and
stop tokens; `torch.softmax` probabilities for the sampler's frequencies.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from conftest import GEN_STD, HF_CASES, VOCAB, generation_models, random_tokens, twin_of

from gemmakit.config import LOCAL
from gemmakit.infer import (
    CacheError,
    Engine,
    GenerationError,
    KVCache,
    SamplingError,
    StaticKVCache,
    kv_cache_bytes,
    sample,
)

EOS = 1  # Gemma's <eos>, used as the stop token on both sides of the HF comparison

models = generation_models  # (HF model, gemmakit twin) per case, built once; tests must not modify them


@functools.cache
def model64(case: str):
    """A float64 copy of the twin: the yardstick for float32 rounding error."""
    return copy.deepcopy(models(case)[1]).double()


def assert_matches_uncached(case: str, got: torch.Tensor, tokens: torch.Tensor, start: int) -> None:
    """`got` (cached logits at positions start..) equals an uncached forward up to float32 rounding.

    Both float32 paths are compared with float64: caching must not add error beyond what the
    uncached float32 forward already has (Gemma 1 at std 0.3 has logits ~10 and ~5e-5 of it).
    """
    with torch.inference_mode():
        full = models(case)[1](tokens)[:, start:]
        exact = model64(case)(tokens)[:, start:]
    err_cached, err_full = (got.double() - exact).abs().max(), (full.double() - exact).abs().max()
    assert err_cached <= 2 * err_full + 1e-6
    # Hence |got - full| <= 3 * err_full + 1e-6: the float32 forward's own error sets the tolerance, not a
    # constant (measured err_full / max |logit|: 6-9e-6 for Gemma 1 at std 0.3, 6-10e-7 for Gemma 2/3,
    # on every ISA path; |got - full| reached 1.65 * err_full).
    tol = 3 * float(err_full) + 1e-6
    torch.testing.assert_close(got, full, rtol=0, atol=tol)
    # Top-1 tokens agree wherever the top-2 gap exceeds 2 * tol: closer gaps are ties that the summation
    # order may break either way (every position clears it on these models).
    top2 = full.topk(2, dim=-1).values
    clear = top2[..., 0] - top2[..., 1] > 2 * tol
    assert clear.float().mean() >= 0.9 and torch.equal(got.argmax(-1)[clear], full.argmax(-1)[clear])


def window_of(model) -> int:
    return model.config.sliding_window or 5  # Gemma 1 has no local layers; any small chunk will do


def prompts_of(lengths: tuple[int, ...]) -> list[list[int]]:
    return [random_tokens(1, n, seed=10 + i)[0].tolist() for i, n in enumerate(lengths)]


def smallest_gap(model, prompts: list[list[int]], rows: list[list[int]], max_new: int) -> float:
    """The smallest top-1 minus top-2 logit gap, relative to max |logit|, over the greedy steps that
    produced `rows` (and the step that picked a stop token where a row is short), by uncached forwards.

    Two computations of the same greedy path (cache vs none, batched vs alone, compiled vs eager, ours
    vs transformers) agree to float32 rounding: within 3x the uncached forward's own error, at most
    3e-5 * max |logit| (assert_matches_uncached, Gemma 1 the worst). A gap above 1e-4 * max |logit|
    cannot flip a token, so their tokens must then be equal.
    """
    gaps = []
    with torch.inference_mode():
        for prompt, row in zip(prompts, rows, strict=True):
            logits = model(torch.tensor([prompt + row]))[0, len(prompt) - 1 :][:max_new]
            top2 = logits.topk(2, dim=-1).values
            gaps.append(float(((top2[:, 0] - top2[:, 1]) / logits.abs().max()).min()))
    return min(gaps)


def hf_generate(hf, prompts: list[list[int]], max_new: int, eos: int = EOS):
    """HF greedy continuations of a left-padded batch (new tokens only, cut before eos), plus raw logits."""
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
    out = hf.generate(
        ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=max_new,
        eos_token_id=eos,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    rows = []
    for seq in out.sequences[:, width:].tolist():
        rows.append(seq[: seq.index(eos)] if eos in seq else seq)
    return rows, torch.stack(out.logits, 1)  # (B, steps, V)


# ---- KV cache ---------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", ["1", "3", "w", "w+2", "all"])
def test_cache_chunks_match_uncached_forward(hf_case, chunk):
    _, model = models(hf_case)
    w = window_of(model)
    size = {"1": 1, "3": 3, "w": w, "w+2": w + 2, "all": 24}[chunk]
    tokens = random_tokens(2, 24, seed=3)  # 24 > window (5 or 7): the ring wraps several times
    cache = KVCache(model.config, 2, 24)
    with torch.inference_mode():
        parts = [
            model(tokens[:, s : s + size], torch.arange(s, min(s + size, 24)).expand(2, -1), cache=cache)
            for s in range(0, 24, size)
        ]
    assert_matches_uncached(hf_case, torch.cat(parts, dim=1), tokens, 0)
    assert cache.length == 24


@pytest.mark.parametrize("prefill_chunk", [None, "1", "3", "w", "w+2"])
def test_engine_prefill_then_decode_matches_uncached_forward(hf_case, prefill_chunk):
    _, model = models(hf_case)
    w = window_of(model)
    chunk = {None: None, "1": 1, "3": 3, "w": w, "w+2": w + 2}[prefill_chunk]
    engine = Engine(model, prefill_chunk=chunk)
    tokens, prompt_len = random_tokens(2, 24, seed=4), 11
    cache = engine.new_cache(2, 24)
    steps = [engine.prefill(tokens[:, :prompt_len], None, cache)]
    for t in range(prompt_len, 24):
        steps.append(engine.decode_one(tokens[:, t], torch.full((2,), t), cache))
    got = torch.stack(steps, dim=1)  # (B, 14, V): logits at positions 10 .. 23
    assert_matches_uncached(hf_case, got, tokens, prompt_len - 1)


@pytest.mark.parametrize("prefill_chunk", [None, "1"])
def test_static_cache_decode_matches_uncached_forward(hf_case, prefill_chunk):
    """The fixed-shape (compile-friendly) cache: same logits as an uncached forward, past the window."""
    _, model = models(hf_case)
    engine = Engine(model, prefill_chunk={None: None, "1": 1}[prefill_chunk])
    tokens, prompt_len = random_tokens(2, 24, seed=5), 9
    cache = StaticKVCache(model.config, 2, 30)  # larger than needed: unfilled slots must stay masked
    steps = [engine.prefill(tokens[:, :prompt_len], None, cache)]
    assert int(cache.slot) == cache.length == prompt_len
    for t in range(prompt_len, 24):
        steps.append(engine.decode_one(tokens[:, t], torch.full((2,), t), cache))
    assert cache.length == 24 and int(cache.slot) == 24
    assert_matches_uncached(hf_case, torch.stack(steps, dim=1), tokens, prompt_len - 1)


def test_compiled_decode_generates_the_same_tokens():
    """torch.compile of the one-token step (static cache) changes nothing but speed."""
    _, model = models("gemma3")
    prompts = prompts_of((3, 9))
    expected = Engine(model).generate(prompts, 12)
    compiled = Engine(model, compile=True)
    # the compiled step fuses and reorders float32 work: equal tokens only away from near-ties
    assert smallest_gap(model, prompts, expected, 12) > 1e-4  # measured 1.2e-3
    assert compiled.generate(prompts, 12) == expected
    assert compiled.generate(prompts, 12) == expected  # second request reuses the compiled step


def test_cache_memory():
    cfg = models("gemma3-mqa")[1].config  # 7 layers, window 7, one kv head of 16
    n_local = sum(t == LOCAL for t in cfg.layer_types)
    n_global = cfg.n_layers - n_local
    cache = KVCache(cfg, batch_size=3, max_len=40)
    # k + v per slot: 2 * B * n_kv * head_dim * 4 bytes; positions: int64 per row and slot
    expected = 2 * 3 * 1 * 16 * 4 * (n_global * 40 + n_local * 7) + 8 * 3 * (40 + n_local * 7)
    assert cache.nbytes == kv_cache_bytes(cfg, 3, 40, torch.float32) == expected
    assert cache.ring_len == 7 and KVCache(cfg, 1, 4).ring_len == 4  # min(window, max_len)
    assert kv_cache_bytes(cfg, 3, 40, torch.bfloat16) < expected


def test_cache_capacity_and_reset():
    _, model = models("gemma3-mqa")
    cache = KVCache(model.config, batch_size=3, max_len=40)
    tokens = random_tokens(3, 40, seed=5)
    with torch.inference_mode():
        first = model(tokens[:, :30], cache=cache)
        model(tokens[:, 30:], torch.arange(30, 40).expand(3, -1), cache=cache)  # 30 + 10 fits ...
        with pytest.raises(CacheError, match="max_len 40"):
            model(tokens[:, :1], torch.full((3, 1), 40), cache=cache)  # ... one more does not
        cache.reset()
        assert cache.length == 0
        again = model(tokens[:, :30], cache=cache)  # stale k/v after reset must stay invisible
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    # stale ring slots of a left-padded run hold positions smaller than their slot (here slot - 5),
    # so an unpadded run after reset would see them unless reset forgets positions too
    cache.reset()
    padded = torch.cat((torch.full((5,), -1), torch.arange(7))).expand(3, -1)
    other = random_tokens(3, 28, seed=6)
    with torch.inference_mode():
        model(tokens[:, :12], padded, cache=cache)
        cache.reset()
        steps = [model(other[:, t : t + 1], torch.full((3, 1), t), cache=cache) for t in range(28)]
    assert_matches_uncached("gemma3-mqa", torch.cat(steps, dim=1), other, 0)


def test_cache_rejects_mismatched_inputs():
    cfg = models("gemma3-mqa")[1].config
    cache = KVCache(cfg, batch_size=3, max_len=40)
    with pytest.raises(CacheError, match="batch 3"):
        cache.update(
            0, torch.zeros(2, 1, 1, 16), torch.zeros(2, 1, 1, 16), torch.zeros(2, 1, dtype=torch.long)
        )
    with pytest.raises(CacheError, match="bfloat16"):
        cache.update(
            0,
            torch.zeros(3, 1, 1, 16, dtype=torch.bfloat16),
            torch.zeros(3, 1, 1, 16, dtype=torch.bfloat16),
            torch.zeros(3, 1, dtype=torch.long),
        )
    with pytest.raises(CacheError, match="max_len"):
        KVCache(cfg, 1, 0)


# ---- engine against transformers --------------------------------------------------------------


def test_greedy_matches_transformers_generate(hf_case):
    hf, model = models(hf_case)
    prompts = prompts_of((3, 9, 14))
    ours = Engine(model).generate(prompts, 32, stop_tokens=[EOS])
    for prompt, got in zip(prompts, ours, strict=True):
        ref, logits = hf_generate(hf, [prompt], 32)
        # no near-ties (gaps > 1e-4 * max |logit|, see smallest_gap; measured >= 3.7e-4): a mismatch
        # would be a real bug, not rounding
        top2 = logits[0].topk(2, dim=-1).values
        assert (top2[:, 0] - top2[:, 1]).min() > 1e-4 * logits[0].abs().max()
        assert got == ref[0] and len(got) == 32  # no EOS met: all 32 tokens are compared
    # not a model that repeats one token whatever the prompt (the comparison could not fail)
    assert len(set().union(*ours)) >= 10


@pytest.mark.parametrize("case", ["gemma1-mqa", "gemma2", "gemma3"])
def test_left_padded_batch_matches_transformers_and_rows_alone(case):
    hf, model = models(case)
    engine = Engine(model, prefill_chunk=4)
    prompts = prompts_of((3, 14, 8, 1))
    batched = engine.generate(prompts, 24, stop_tokens=[EOS])
    alone = [engine.generate([p], 24, stop_tokens=[EOS])[0] for p in prompts]
    # padding and batch size change GEMM shapes (summation order): equal tokens only away from ties
    assert smallest_gap(model, prompts, alone, 24) > 1e-4  # measured >= 6.4e-4
    assert batched == alone
    assert batched == hf_generate(hf, prompts, 24)[0]
    assert sum(map(len, batched)) > 3 * 24  # mostly full-length rows: the check is not vacuous


def test_stop_tokens_end_rows_like_transformers():
    hf, model = models("gemma3")
    engine = Engine(model)
    prompts = prompts_of((5, 9))
    base = engine.generate(prompts, 24)
    # a token in row 0's continuation (not its first) that row 1 never produces: row 0 must stop
    # there while row 1 runs to max_new_tokens
    stop = next(t for t in base[0][3:] if t not in base[1])
    got = engine.generate(prompts, 24, stop_tokens=[stop, EOS])
    assert got[0] == base[0][: base[0].index(stop)] and len(got[0]) < 24
    assert got[1] == base[1] and len(got[1]) == 24
    assert smallest_gap(model, prompts[:1], got[:1], 24) > 1e-4  # HF runs row 0 alone: no near-ties
    assert got[0] == hf_generate(hf, prompts[:1], 24, eos=stop)[0][0]
    # a single row that stops: the stream ends at the stop token, which is never yielded
    steps = list(engine.stream(prompts[:1], 24, stop_tokens=[stop]))
    assert [s[0] for s in steps] == got[0] and all(len(s) == 1 for s in steps)


def test_stream_yields_same_tokens_as_generate():
    _, model = models("gemma2")
    engine = Engine(model)
    prompts = prompts_of((4, 11, 7))
    kwargs = dict(temperature=1.0, top_k=50, top_p=0.9, seed=7)
    ref = engine.generate(prompts, 20, **kwargs)
    stop = ref[1][2]  # row 1 stops after 2 tokens; the others may stop wherever they meet it
    ref = engine.generate(prompts, 20, stop_tokens=[stop], **kwargs)
    steps = list(engine.stream(prompts, 20, stop_tokens=[stop], **kwargs))
    rows = [[s[i] for s in steps if s[i] is not None] for i in range(3)]
    assert rows == ref and len(ref[1]) == 2
    for i in range(3):  # once a row shows None it stays None
        column = [s[i] for s in steps]
        assert column == ref[i] + [None] * (len(steps) - len(ref[i]))
    assert len(steps) == max(map(len, ref))


def test_seeded_sampling_is_reproducible():
    _, model = models("gemma3")
    engine = Engine(model)
    prompts = prompts_of((6, 2))
    a = engine.generate(prompts, 16, temperature=1.0, seed=1)
    assert a == engine.generate(prompts, 16, temperature=1.0, seed=1)
    assert a != engine.generate(prompts, 16, temperature=1.0, seed=2)
    assert all(len(row) == 16 for row in a)


def test_engine_runs_in_bfloat16():
    hf, _ = models("gemma3")
    model = twin_of(hf).to(torch.bfloat16)
    engine = Engine(model, prefill_chunk=3)
    assert engine.new_cache(1, 4).k_global.dtype == torch.bfloat16
    out = engine.generate(prompts_of((5, 12)), 16)
    assert [len(r) for r in out] == [16, 16]
    assert all(isinstance(t, int) and 0 <= t < VOCAB for r in out for t in r)


def test_generate_rejects_bad_requests():
    _, model = models("gemma1-mqa")  # max_seq_len 256
    engine = Engine(model)
    assert engine.generate([], 5) == []
    assert engine.generate([[2, 3]], 0) == [[]]
    with pytest.raises(GenerationError, match="max_seq_len 256"):
        engine.generate([[2] * 200], 57)
    assert len(engine.generate([[2] * 200], 56)[0]) <= 56  # exactly at the limit is fine
    with pytest.raises(GenerationError, match=r"prompts\[1\]"):
        engine.generate([[2], []], 4)
    with pytest.raises(GenerationError, match=r"prompts\[0\].*\[0, 320\).*320"):
        engine.generate([[2, VOCAB]], 4)
    with pytest.raises(GenerationError, match="stop_tokens"):
        engine.generate([[2]], 4, stop_tokens=[-1])
    with pytest.raises(GenerationError, match="max_new_tokens"):
        engine.generate([[2]], -1)
    with pytest.raises(GenerationError, match="^top_p: expected"):
        engine.stream([[2]], 4, temperature=1.0, top_p=0.0)  # raised before any step is requested
    with pytest.raises(GenerationError, match="prefill_chunk"):
        Engine(model, prefill_chunk=0)


# ---- sampler ----------------------------------------------------------------------------------


def test_sampler_greedy_and_degenerate_filters_are_argmax():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    best = logits.argmax(-1)
    assert torch.equal(sample(logits), best)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(sample(logits, temperature=1.0, top_k=1, generator=gen), best)
    assert torch.equal(sample(logits, temperature=1.0, top_p=1e-6, generator=gen), best)
    big = torch.randn(8, 262_144, generator=torch.Generator().manual_seed(1))  # Gemma 3's vocabulary
    for top_p in (5e-324, 1e-30):  # below float32's rounding of p - p
        assert torch.equal(sample(big, temperature=1.0, top_p=top_p, generator=gen), big.argmax(-1))
    for temperature in (5e-324, 1e-6):  # logits / 5e-324 would be inf, the softmax NaN
        assert torch.equal(sample(big, temperature=temperature, generator=gen), big.argmax(-1))
    assert sample(logits.to(torch.bfloat16)).dtype == torch.long


def test_sampler_seeds():
    logits = torch.zeros(64, 50)  # uniform: two seeds agreeing on 64 draws has chance 50**-64
    draw = lambda seed: sample(logits, 1.0, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# 99.9th percentiles of chi-square: 2 dof 13.8, 3 dof 16.3, 5 dof 20.5
@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p", "kept", "bound"),
    [
        (1.0, None, None, 6, 20.5),
        (0.5, None, None, 6, 20.5),
        (1.0, 4, None, 4, 16.3),
        (1.0, None, 0.75, 3, 13.8),
    ],
)
def test_sampler_frequencies_match_softmax(temperature, top_k, top_p, kept, bound):
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0])  # probs .420 .255 .154 .094 .057 .021
    n = 40_000
    ids = sample(logits.expand(n, -1), temperature, top_k, top_p, torch.Generator().manual_seed(11))
    counts = torch.bincount(ids, minlength=6).double()
    probs = torch.softmax(logits.double()[:kept] / temperature, dim=-1)  # top_p .75: .420+.255 < .75
    assert counts[kept:].sum() == 0
    assert chi_square(counts[:kept], probs) < bound


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=1.0, top_k=0), "top_k"),
        (dict(temperature=1.0, top_k=2.5), "top_k"),
        (dict(temperature=1.0, top_p=0.0), "top_p"),
        (dict(temperature=1.0, top_p=1.5), "top_p"),
    ],
)
def test_sampler_rejects_bad_arguments(kwargs, name):
    with pytest.raises(SamplingError, match=f"^{name}: expected"):
        sample(torch.zeros(2, 5), **kwargs)


def test_sampler_rejects_bad_logits():
    with pytest.raises(SamplingError, match="logits"):
        sample(torch.zeros(5))


def test_hf_cases_are_covered():
    assert set(GEN_STD) == set(HF_CASES)
