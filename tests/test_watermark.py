"""SynthID Text (gemmakit.safety.watermark) against HF transformers, bit for bit, and the detectors.

Reference test vectors: docs reference serving-alignment-safety.md §3.6 (torch 2.13 CPU). The HF
oracle is `SynthIDTextWatermarkLogitsProcessor` / `BayesianDetectorModel` / `generate()` with a
`SynthIDTextWatermarkingConfig`, on tiny random Gemma models twinned from conftest.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import make_hf_model, twin_of

from gemmakit.cli import main
from gemmakit.infer import Engine
from gemmakit.safety import watermark as wm

ROOT = Path(__file__).resolve().parents[1]
KEYS_FILE = ROOT / "recipes" / "watermark" / "example-keys.toml"
DEFAULT = wm.WatermarkConfig(wm.EXAMPLE_KEYS)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on the shared 2-core machine two threads fighting a neighbour's job made tiny
    ops 10x slower. HF and gemmakit run in this same process, so bit-equality checks are unaffected."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def hf_processor(cfg: wm.WatermarkConfig):
    from transformers.generation.logits_process import SynthIDTextWatermarkLogitsProcessor

    return SynthIDTextWatermarkLogitsProcessor(
        ngram_len=cfg.ngram_len, keys=list(cfg.keys), sampling_table_size=cfg.sampling_table_size,
        sampling_table_seed=cfg.sampling_table_seed, context_history_size=cfg.context_history_size,
        device="cpu", skip_first_ngram_calls=cfg.skip_first_ngram_calls,
    )  # fmt: skip


# ---- reference test vectors (§3.6) -----------------------------------------------------------------


def test_sampling_table_vectors() -> None:
    table = wm.Watermark(DEFAULT).table
    assert table.dtype == torch.int64 and int(table.sum()) == 32743
    assert (
        "".join(map(str, table[:64].tolist()))
        == "0110111111100100000101100111101010110110010111110101111010011010"
    )
    digest = hashlib.sha256(table.numpy().astype("<i8").tobytes()).hexdigest()
    assert digest == "03f5cf50b0ca8eac3d92997927f953debae1a0a48b6eab992f282046da8db6d1"
    assert torch.equal(wm.sampling_table(0, 8), table[:8])  # the prefix does not depend on the size


def test_hash_g_value_and_mask_vectors() -> None:
    one = torch.ones((), dtype=torch.long)
    assert int(wm.accumulate_hash(one, torch.tensor([1, 2, 3, 4]))) == 8268566681299659399
    assert int(wm.accumulate_hash(one, torch.tensor([0, 0, 0, 0]))) == -4106384379532733411
    ids = torch.tensor([[2, 651, 6037, 576, 6081, 603, 7127, 235265, 1]])
    rows = ["000010101010000101000001110110", "000011001101000011111010010110",
            "110011100001010111011001110110", "111010110111100110110110010010",
            "110101011111100011000011000110"]  # fmt: skip
    g = wm.Watermark(DEFAULT).g_values(ids)
    assert g.shape == (1, 5, 30) and ["".join(map(str, r)) for r in g[0].tolist()] == rows
    w = wm.Watermark(DEFAULT)
    keys = w.context_hash(ids[:, :5]) * wm.MULTIPLIER + w.key_terms[:3]  # the first n-gram, layers 0-2
    assert keys.tolist() == [72692613837150888, 6895570243192269826, -3799391289748274010]
    assert torch.remainder(keys, 2**16).tolist() == [55976, 44034, 17574]  # floor modulo
    rep = w.repetition_mask(torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7, 8]]))
    assert rep.tolist() == [[1, 1, 1, 1, 1, 0, 0, 0, 0, 0]]
    assert w.eos_mask(ids, 1).tolist() == [[1, 1, 1, 1, 1, 1, 1, 1, 0][4:]]  # HF's mask sliced [:, n-1:]


def test_update_scores_vector_and_expected_mean() -> None:
    torch.manual_seed(0)
    scores = torch.log_softmax(torch.randn(1, 8, dtype=torch.float64), dim=1)
    g = torch.tensor([[[1, 0], [0, 1], [1, 1], [0, 0], [1, 0], [0, 1], [1, 1], [0, 0]]])
    probs = wm.update_scores(scores, g).exp()[0].tolist()
    expected = [0.43857788, 0.04887038, 0.02451559, 0.05017287, 0.03175401, 0.01618371, 0.3242275, 0.06569806]
    assert probs == pytest.approx(expected, abs=1e-8)
    assert wm.expected_mean_g(256000) == 0.7499990234375


# ---- against transformers directly ---------------------------------------------------------------


def test_g_values_and_masks_equal_transformers() -> None:
    gen = torch.Generator().manual_seed(0)
    for cfg in (
        DEFAULT,
        wm.WatermarkConfig((7, -3, 2**62), ngram_len=2, sampling_table_size=1000, context_history_size=5),
    ):
        hf, ours = hf_processor(cfg), wm.Watermark(cfg)
        ids = torch.randint(0, 262144, (3, 120), generator=gen)
        ids[1, 50:] = ids[1, :70].clone()  # repeated contexts
        assert torch.equal(ours.g_values(ids), hf.compute_g_values(ids))
        assert torch.equal(ours.repetition_mask(ids), hf.compute_context_repetition_mask(ids))
        eos = int(ids[0, 30])
        assert torch.equal(
            ours.eos_mask(ids, eos), hf.compute_eos_token_mask(ids, eos)[:, cfg.ngram_len - 1 :]
        )


# (vocab, batch, keys, ngram_len, top_k, extra config fields, steps)
PROCESSOR_CASES = {
    "small-vocab-repeats": (50, 2, (11, 22, 33), 2, None, {}, 200),
    "topk-skip-first": (
        1000,
        3,
        wm.EXAMPLE_KEYS,
        5,
        20,
        {"skip_first_ngram_calls": True, "context_history_size": 16},
        200,
    ),
    "odd-table-no-topk": (4096, 1, tuple(range(100, 108)), 3, None, {"sampling_table_size": 1031}, 200),
    "gemma3-vocab-topk": (262144, 1, wm.EXAMPLE_KEYS, 5, 64, {}, 20),  # HF: ~0.3 s per step here
}


@pytest.mark.parametrize("case", list(PROCESSOR_CASES))
def test_processor_bit_equal_to_transformers(case: str) -> None:
    vocab, batch, keys, n, top_k, extra, steps = PROCESSOR_CASES[case]
    cfg = wm.WatermarkConfig(keys, ngram_len=n, **extra)
    ours, hf = wm.watermark_processor(cfg), hf_processor(cfg)
    gen = torch.Generator().manual_seed(1)
    last = torch.randint(0, vocab, (batch,), generator=gen)
    repeated = 0
    for _ in range(steps):
        scores = 3 * torch.randn(batch, vocab, generator=gen)
        if top_k is not None:  # as the sampler's filter: -inf outside the top k
            scores = scores.masked_fill(scores < scores.topk(top_k).values[:, -1:], float("-inf"))
        expected = hf(last[:, None], scores.clone())
        got = ours(last, scores.clone())
        assert torch.equal(got, expected), f"max |diff| {(got - expected).abs().max()}"
        repeated += int(torch.equal(got, scores))
        last = torch.multinomial(torch.softmax(expected, dim=1), 1, generator=gen)[:, 0]
    if case == "small-vocab-repeats":
        assert repeated > 10  # the repeated-context branch really ran


# ---- end to end: transformers' generate vs the engine --------------------------------------------


@pytest.mark.parametrize("case, temperature, top_k", [
    ("gemma1-mqa", 1.0, 50), ("gemma2", 0.7, 20),
    ("gemma3", 1.3, None)])  # fmt: skip
def test_generate_matches_transformers_token_for_token(
    case: str, temperature: float, top_k: int | None
) -> None:
    from transformers import SynthIDTextWatermarkingConfig

    hf = make_hf_model(case, std=0.1)  # std 0.1: spread-out distributions, so sampling has choices
    model = twin_of(hf)
    cfg = wm.WatermarkConfig(wm.EXAMPLE_KEYS[:9], ngram_len=3)
    prompt = [2, 17, 99, 5, 240]
    torch.manual_seed(123)
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 5, dtype=torch.long), do_sample=True,
                      temperature=temperature, top_k=top_k or 0, max_new_tokens=200, eos_token_id=1, pad_token_id=0,
                      watermarking_config=SynthIDTextWatermarkingConfig(ngram_len=3, keys=list(cfg.keys)))  # fmt: skip
    expected = out[0, 5:].tolist()
    expected = expected[: expected.index(1)] if 1 in expected else expected
    torch.manual_seed(123)
    [got] = Engine(model).generate([prompt], 200, temperature=temperature, top_k=top_k, stop_tokens=[1],
                                   processor=wm.watermark_processor(cfg))  # fmt: skip
    assert got == expected
    assert len(got) >= 50 and len(set(got)) >= 30  # long and varied enough for the check to bite
    g, mask = wm.Watermark(cfg).score_inputs([got], None)
    assert wm.p_value(g, mask)[0] < 1e-3  # and it is watermarked


# ---- statistics, as HF's tests ---------------------------------------------------------------------


def test_unwatermarked_mean_g_is_one_half() -> None:
    gen = torch.Generator().manual_seed(0)
    for n, keys, vocab in ((5, (1, 2, 3), 10000), (10, (4, 5, 6, 7, 8), 1000)):
        w = wm.Watermark(wm.WatermarkConfig(keys, ngram_len=n))
        ids = torch.randint(0, vocab, (20, 1000 + n - 1), generator=gen)
        assert abs(float(w.g_values(ids).double().mean()) - 0.5) < 0.01


def test_sampled_mean_g_matches_expectation_for_uniform_logits() -> None:
    for vocab in (2, 10, 1000):
        cfg = wm.WatermarkConfig((42,), ngram_len=2)
        proc, rows = wm.watermark_processor(cfg), 20000
        gen = torch.Generator().manual_seed(vocab)
        scores = torch.zeros(rows, vocab)
        proc(torch.zeros(rows, dtype=torch.long), scores)  # first call: zero context
        last = torch.randint(0, 2**40, (rows,), generator=gen)  # distinct contexts for the second call
        tok = torch.multinomial(torch.softmax(proc(last, scores), dim=1), 1, generator=gen)[:, 0]
        g = wm.Watermark(cfg).g_values(torch.stack((last, tok), dim=1))
        assert abs(float(g.double().mean()) - wm.expected_mean_g(vocab)) < 0.015


def test_scores_and_p_value() -> None:
    g = torch.tensor([[[1, 1, 0], [1, 1, 1], [0, 0, 0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert wm.mean_score(g, mask).item() == pytest.approx(5 / 6)
    weights = torch.tensor([10.0, 5.5, 1.0]) * 3 / 16.5
    assert wm.weighted_mean_score(g, mask).item() == pytest.approx(
        float(weights @ torch.tensor([2.0, 2, 1])) / 6
    )
    assert wm.p_value(g, mask) == pytest.approx([7 / 64])  # P[Bin(6, 1/2) >= 5]
    assert wm.p_value(torch.zeros(1, 1, 3, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long)) == [1.0]
    from scipy.stats import binom

    for s, n in ((0, 10), (3, 10), (800, 1500), (3100, 6000), (6000, 6000)):
        assert wm._binomial_tail(s, n) == pytest.approx(binom.sf(s - 1, n, 0.5), rel=1e-9, abs=1e-300)


# ---- the Bayesian detector -----------------------------------------------------------------------


def test_bayesian_posterior_equals_transformers() -> None:
    from transformers.generation.watermarking import BayesianDetectorConfig, BayesianDetectorModel

    depth = 12
    ours = wm.BayesianDetector(depth, base_rate=0.3, seed=0)
    with torch.no_grad():
        ours.beta.add_(torch.randn(ours.beta.shape))
        ours.delta.mul_(500)
    hf = BayesianDetectorModel(BayesianDetectorConfig(watermarking_depth=depth, base_rate=0.3))
    with torch.no_grad():
        hf.likelihood_model_watermarked.beta.copy_(ours.beta)
        hf.likelihood_model_watermarked.delta.copy_(ours.delta)
        hf.prior.copy_(ours.prior)
    gen = torch.Generator().manual_seed(0)
    g = torch.randint(0, 2, (6, 40, depth), generator=gen)
    mask = (torch.rand(6, 40, generator=gen) < 0.8).long()
    labels = torch.tensor([1.0, 0, 1, 0, 1, 0])
    expected, hf_loss = hf(g, mask, labels=labels, loss_batch_weight=0.01)
    torch.testing.assert_close(ours(g, mask), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.loss(g, mask, labels, 0.01), hf_loss, rtol=1e-5, atol=1e-6)


def _synthetic(n: int, gen: torch.Generator, watermarked: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Half the layers carry signal (P(g=1) = 0.58), half are fair coins: the mean is diluted, the
    Bayesian detector can learn to ignore the noise layers."""
    bias = torch.tensor([0.58] * 4 + [0.5] * 12) if watermarked else torch.full((16,), 0.5)
    g = (torch.rand(n, 30, 16, generator=gen) < bias).long()
    return g, torch.ones(n, 30, dtype=torch.long)


def test_training_raises_tpr_and_round_trips(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    pos, neg = _synthetic(300, gen, True), _synthetic(300, gen, False)
    test_pos, test_neg = _synthetic(300, gen, True), _synthetic(300, gen, False)
    before = wm.BayesianDetector(16, seed=0)
    training = wm.DetectorTraining(epochs=15, l2_weights=(1e-3,))
    result = wm.train_detector(pos, neg, training)
    with torch.no_grad():
        tpr_before = wm.tpr_at_fpr(before(*test_pos), before(*test_neg), 0.05)
        tpr_after = wm.tpr_at_fpr(result.detector(*test_pos), result.detector(*test_neg), 0.05)
    assert tpr_after > tpr_before + 0.1, (tpr_before, tpr_after)
    cfg = wm.WatermarkConfig(tuple(range(16)))
    out = wm.save_detector(result.detector, cfg, tmp_path / "det", {"note": "test"})
    assert json.loads((out / "detector.json").read_text())["keys_fingerprint"] == cfg.fingerprint()
    loaded = wm.load_detector(out, cfg)
    with torch.no_grad():
        assert torch.equal(loaded(*test_pos), result.detector(*test_pos))
    with pytest.raises(wm.WatermarkError, match="detector was trained for other keys"):
        wm.load_detector(out, wm.WatermarkConfig(tuple(range(1, 17))))


# ---- config and keys files ----------------------------------------------------------------------


@pytest.mark.parametrize("text, needle", [
    ("keys = [1, 2]\nngram = 3\n", "unknown key(s) ngram"),
    ("ngram_len = 3\n", "missing `keys`"),
    ('keys = "abc"\n', "keys: expected a list"),
    ("keys = [1, 1]\n", "distinct"),
    ("keys = [1, 2.5]\n", "int64 integers"),
    ("keys = [1, 2]\nngram_len = 1\n", "ngram_len: expected an integer in [2,"),
    ("keys = [1, 2]\nsampling_table_size = 16777217\n", "sampling_table_size"),
    ("keys = [1, 2\n", "not valid TOML"),
])  # fmt: skip
def test_bad_keys_files(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(text)
    with pytest.raises(wm.WatermarkError) as e:
        wm.load_keys(path)
    assert str(e.value).startswith(str(path)) and needle in str(e.value) and "\n" not in str(e.value)


def test_shipped_keys_file_is_the_example_keys() -> None:
    assert wm.load_keys(KEYS_FILE) == DEFAULT


# ---- the command line ----------------------------------------------------------------------------


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _rows(stdout: str) -> list[list[str]]:
    return [line.split() for line in stdout.strip().splitlines()[1:]]


def test_cli_generate_watermark_is_the_engine_with_the_processor(model_dir: Path, capsys) -> None:
    from gemmakit.checkpoint import load_model
    from gemmakit.tokenizer import Tokenizer

    args = ["generate", "--model", str(model_dir), "--prompt", "hello world", "--seed", "5", "--max-new-tokens",
            "40", "--temperature", "3.0", "--top-k", "50", "--ignore-eos", "--attn", "eager"]  # fmt: skip
    rc, marked, err = _cli(capsys, *args, "--watermark", str(KEYS_FILE))
    assert rc == 0, err
    rc, plain, err = _cli(capsys, *args)
    assert rc == 0, err
    tok, engine = Tokenizer.load(model_dir), Engine(load_model(model_dir))
    [new] = engine.generate([tok.encode("hello world")], 40, temperature=3.0, top_k=50, seed=5,
                            processor=wm.watermark_processor(DEFAULT))  # fmt: skip
    assert marked == tok.decode(new) + "\n" and marked != plain


@pytest.fixture(scope="module")
def texts(model_dir: Path) -> dict[str, list[str]]:
    """Watermarked and plain texts (80 tokens each) from a tiny random model whose sampling is limited
    to pieces that decode -> encode round-trips (no byte pieces or word starts): detection of text
    then sees exactly the sampled ids, as it would for a real model's ordinary text."""
    from gemmakit.config import PRESETS
    from gemmakit.model import Gemma
    from gemmakit.tokenizer import Tokenizer

    tok = Tokenizer.load(model_dir)
    ok = [i for i in range(4, tok.vocab_size) if i not in tok.reserved_ids
          and tok.encode(tok.decode([i]), bos=False) == [i] and not tok.decode([i]).startswith(" ")]  # fmt: skip
    allowed = torch.full((tok.vocab_size,), float("-inf"))
    allowed[ok] = 0.0
    engine = Engine(Gemma(PRESETS["tiny"].replace(vocab_size=tok.vocab_size)).init_weights(std=0.1, seed=0))
    out: dict[str, list[str]] = {"w": [], "u": []}
    for i in range(8):
        for name in out:
            proc = wm.watermark_processor(DEFAULT) if name == "w" else None
            limit = (lambda last, s, p=proc: p(last, s + allowed)) if proc else (lambda last, s: s + allowed)
            [new] = engine.generate([[2, 10 + i]], 80, temperature=1.0, seed=i, processor=limit)
            out[name].append(tok.decode(new))
    return out


def test_cli_detect_separates_watermarked_text(model_dir: Path, tmp_path: Path, texts, capsys) -> None:
    (tmp_path / "one.txt").write_text(texts["w"][0])
    both = [texts["w"][1], texts["u"][1]]
    (tmp_path / "both.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in both))
    rc, out, err = _cli(capsys, "watermark", "detect", "--keys", str(KEYS_FILE), "--model", str(model_dir),
                        str(tmp_path / "both.jsonl"))  # fmt: skip
    assert rc == 0, err
    marked, plain = _rows(out)
    assert float(marked[5]) < 1e-10 and marked[-1] == "watermarked"
    assert float(plain[5]) > 1e-3 and plain[-2:] == ["not", "detected"]
    rc, out, _ = _cli(capsys, "watermark", "detect", "--keys", str(KEYS_FILE), "--tokenizer", str(model_dir),
                      str(tmp_path / "one.txt"))  # fmt: skip
    assert rc == 0 and len(_rows(out)) == 1 and float(_rows(out)[0][5]) < 1e-10


def test_cli_train_detector_and_detect_with_it(model_dir: Path, tmp_path: Path, texts, capsys) -> None:
    for name, rows in texts.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(t) + "\n" for t in rows))
    rc, out, err = _cli(capsys, "watermark", "train-detector", "--keys", str(KEYS_FILE), "--model", str(model_dir),
                        "--watermarked", str(tmp_path / "w.jsonl"), "--unwatermarked", str(tmp_path / "u.jsonl"),
                        "--epochs", "3", "--out", str(tmp_path / "det"))  # fmt: skip
    assert rc == 0, err
    assert (tmp_path / "det" / "detector.safetensors").is_file() and "validation TPR" in out
    rc, out, err = _cli(capsys, "watermark", "detect", "--keys", str(KEYS_FILE), "--model", str(model_dir),
                        "--detector", str(tmp_path / "det"), str(tmp_path / "w.jsonl"))  # fmt: skip
    assert rc == 0, err
    posteriors = [float(r[6]) for r in _rows(out)]
    assert len(posteriors) == 8 and all(p > 0.99 for p in posteriors)
    other = tmp_path / "other.toml"
    other.write_text("keys = [1, 2, 3]\n")
    rc, _, err = _cli(capsys, "watermark", "detect", "--keys", str(other), "--detector", str(tmp_path / "det"),
                      "--model", str(model_dir), str(tmp_path / "w.jsonl"))  # fmt: skip
    _assert_one_line_error(rc, err, "detector was trained for other keys")


def _assert_one_line_error(rc: int, err: str, needle: str) -> None:
    assert rc == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err


def test_cli_user_errors(model_dir: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("keys = [1, 2]\nlayers = 3\n")
    text = tmp_path / "t.txt"
    text.write_text("hello")
    rc, _, err = _cli(capsys, "watermark", "detect", "--keys", str(bad), str(text))
    _assert_one_line_error(rc, err, "unknown key(s) layers")
    rc, _, err = _cli(capsys, "watermark", "detect", "--keys", str(tmp_path / "none.toml"), str(text))
    _assert_one_line_error(rc, err, "no such watermark keys file")
    rc, _, err = _cli(capsys, "watermark", "detect", "--keys", str(KEYS_FILE), str(tmp_path / "missing.txt"))
    _assert_one_line_error(rc, err, "missing.txt: no such file")
    rc, _, err = _cli(
        capsys, "watermark", "detect", "--keys", str(KEYS_FILE), "--detector", str(tmp_path), str(text)
    )
    _assert_one_line_error(rc, err, "no such detector file")
    with pytest.raises(SystemExit) as e:  # argparse-time: the keys file is read while parsing
        main(["generate", "--model", str(model_dir), "--prompt", "hi", "--watermark", str(bad)])
    assert e.value.code == 2
    _assert_one_line_error(2, capsys.readouterr().err, "unknown key(s) layers")
