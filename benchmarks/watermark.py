"""SynthID Text on the nano model, measured: detection power per score and length, robustness to token
edits, agreement with transformers' Bayesian detector, and what the processor costs per token.

One command rebuilds every number of `benchmarks/watermark.md` (about 8 minutes on 2 cores):

    python benchmarks/watermark.py [--out runs/watermark] [--smoke]

Data: raw-text prompts (the user turns of `synth.prompt_set(N, seed=0)`), each continued once with and
once without the watermark (the 30 example keys, ngram_len 5), temperature 1.0, top_k 64, 200 new
tokens, no stop token (so every text has full length; the EOS mask is then all ones), in batches of
`BATCH` rows. Half the pairs train the Bayesian detector (`train_detector`: its own 30% validation
split picks the epoch); the other half are the test set of every table row. Texts are cut to their
first 50 / 100 / 200 tokens, and edited by substituting 10% or 30% of positions with uniform random
vocabulary ids (the same positions for watermarked and plain texts of a pair).
TPR at 1% FPR: share of watermarked test texts scoring at or above the 99th percentile of the plain
ones (p-values ranked by -p, the Bayesian score by its log-odds).

Key trade-off: nano is a 14M model whose continuations of raw prompts have low entropy (many repeated
4-gram contexts, which the mask drops), so these rates are a floor for a real Gemma's; and with ~200
negatives the 1% FPR threshold rests on the 2-3 highest plain scores (a standard error of several
points on each TPR).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NANO = ROOT / "gemmakit" / "assets" / "nano"
sys.path.insert(0, str(HERE))

from gemmakit.safety import watermark as wm  # noqa: E402

# (full run, --smoke)
SIZES = {"pairs": (480, 8), "new_tokens": (200, 24), "epochs": (50, 2)}
LENGTHS = {"full": (50, 100, 200), "smoke": (12, 24)}
EDITS = (0.0, 0.1, 0.3)
BATCH = 96  # rows decoded in lockstep (one forward per step for all of them)
TOP_K, TEMPERATURE = 64, 1.0


def _load_nano():
    """The nano model as `gemmakit generate` loads the default model (load_any + bf16 kernels)."""
    from gemmakit.quantize import load_any, with_bf16_kernels
    from gemmakit.tokenizer import Tokenizer

    return with_bf16_kernels(load_any(str(NANO))), Tokenizer.load(NANO)


def _generate(engine, prompts: list[list[int]], new_tokens: int, config, seed: int) -> list[list[int]]:
    """Continuations of `prompts` in batches; watermarked with a fresh processor per batch if `config`."""
    out: list[list[int]] = []
    for start in range(0, len(prompts), BATCH):
        batch = prompts[start : start + BATCH]
        proc = wm.watermark_processor(config) if config is not None else None
        out += engine.generate(batch, new_tokens, temperature=TEMPERATURE, top_k=TOP_K,
                               seed=seed + start, processor=proc)  # fmt: skip
    return out


def _edit(texts: list[list[int]], rate: float, vocab: int, seed: int) -> list[list[int]]:
    """Each text with round(rate * len) positions replaced by uniform random ids (seeded per text)."""
    edited = []
    for i, text in enumerate(texts):
        rng = random.Random(seed * 1_000_003 + i)
        new = list(text)
        for pos in rng.sample(range(len(new)), round(rate * len(new))):
            new[pos] = rng.randrange(vocab)
        edited.append(new)
    return edited


def _scores(watermark, detector, texts: list[list[int]]) -> dict[str, torch.Tensor]:
    g, mask = watermark.score_inputs(texts, None)
    with torch.no_grad():
        bayes = detector.log_odds(g, mask)
    return {"mean": wm.mean_score(g, mask), "weighted_mean": wm.weighted_mean_score(g, mask),
            "p_value": -torch.tensor(wm.p_value(g, mask), dtype=torch.float64), "bayesian": bayes}  # fmt: skip


def _hf_agreement(detector, watermark, texts: list[list[int]]) -> float:
    """Max |posterior difference| between our detector and HF's BayesianDetectorModel (same parameters)."""
    from transformers.generation.watermarking import BayesianDetectorConfig, BayesianDetectorModel

    hf = BayesianDetectorModel(BayesianDetectorConfig(watermarking_depth=detector.depth))
    with torch.no_grad():
        hf.likelihood_model_watermarked.beta.copy_(detector.beta)
        hf.likelihood_model_watermarked.delta.copy_(detector.delta)
        hf.prior.copy_(detector.prior)
        g, mask = watermark.score_inputs(texts, None)
        return float((hf(g, mask)[0] - detector(g, mask)).abs().max())


def _step_costs(steps: int, vocabs: tuple[int, ...]) -> list[dict]:
    """ms per sampled token (batch 1) with and without the watermark, ours and HF's processor."""
    from transformers.generation.logits_process import SynthIDTextWatermarkLogitsProcessor

    from gemmakit.infer.sampler import sample

    config = wm.WatermarkConfig(wm.EXAMPLE_KEYS)
    rows = []
    for vocab in vocabs:
        for top_k in (64, None):
            logits = torch.randn(steps, 1, vocab, generator=torch.Generator().manual_seed(0))
            hf = SynthIDTextWatermarkLogitsProcessor(ngram_len=5, keys=list(wm.EXAMPLE_KEYS), sampling_table_size=2**16,
                                                     sampling_table_seed=0, context_history_size=1024, device="cpu")  # fmt: skip
            timed = {}
            for name, proc in (("plain", None), ("gemmakit", wm.watermark_processor(config)),
                               ("transformers", lambda last, s, hf=hf: hf(last[:, None], s))):  # fmt: skip
                last = torch.zeros(1, dtype=torch.long)
                with torch.inference_mode():
                    sample(logits[0], TEMPERATURE, top_k, None, None, proc, last)  # warm-up (and first call)
                    start = time.perf_counter()
                    for step in range(1, steps):
                        last = sample(logits[step], TEMPERATURE, top_k, None, None, proc, last)
                timed[name] = 1e3 * (time.perf_counter() - start) / (steps - 1)
            rows.append(
                {"vocab": vocab, "top_k": top_k, "depth": 30, **{f"{k}_ms": v for k, v in timed.items()}}
            )
    return rows


def _decode_cost(engine, prompt: list[int], config, tokens: int) -> dict:
    """Nano end to end, batch 1: ms per generated token with and without the watermark."""
    out = {}
    for name, cfg in (("plain", None), ("watermarked", config)):
        engine.generate([prompt], 8, temperature=TEMPERATURE, top_k=TOP_K, seed=0)  # warm-up
        start = time.perf_counter()
        proc = wm.watermark_processor(cfg) if cfg is not None else None
        engine.generate([prompt], tokens, temperature=TEMPERATURE, top_k=TOP_K, seed=0, processor=proc)
        out[f"{name}_ms_per_token"] = 1e3 * (time.perf_counter() - start) / tokens
    return out


def run(smoke: bool) -> dict:
    from gemmakit.data import synth
    from gemmakit.infer import Engine

    i = int(smoke)
    n_pairs, new_tokens, epochs = SIZES["pairs"][i], SIZES["new_tokens"][i], SIZES["epochs"][i]
    lengths = LENGTHS["smoke" if smoke else "full"]
    torch.manual_seed(0)
    model, tok = _load_nano()
    engine, config = Engine(model), wm.WatermarkConfig(wm.EXAMPLE_KEYS)
    watermark = wm.Watermark(config)
    prompts = [tok.encode(r["messages"][0]["content"]) for r in synth.prompt_set(n_pairs, 0)]
    timings = {}
    start = time.perf_counter()
    marked = _generate(engine, prompts, new_tokens, config, seed=1)
    plain = _generate(engine, prompts, new_tokens, None, seed=1)
    timings["generate_s"] = time.perf_counter() - start
    half = n_pairs // 2
    start = time.perf_counter()
    training = wm.DetectorTraining(epochs=epochs)
    trained = wm.train_detector(watermark.score_inputs(marked[:half], None),
                                watermark.score_inputs(plain[:half], None), training)  # fmt: skip
    timings["train_s"] = time.perf_counter() - start
    test_pos, test_neg = marked[half:], plain[half:]
    table = []
    for rate in EDITS:
        for length in lengths:
            pos = _edit([t[:length] for t in test_pos], rate, model.config.vocab_size, seed=length)
            neg = _edit([t[:length] for t in test_neg], rate, model.config.vocab_size, seed=length)
            sp, sn = _scores(watermark, trained.detector, pos), _scores(watermark, trained.detector, neg)
            table.append({"edit_rate": rate, "tokens": length,
                          **{k: wm.tpr_at_fpr(sp[k], sn[k], 0.01) for k in sp}})  # fmt: skip
    hf_diff = _hf_agreement(trained.detector, watermark, test_pos + test_neg)
    g, mask = watermark.score_inputs(test_pos + test_neg, None)
    from machine_info import machine

    return {
        "tpr_at_1pct_fpr": table,
        "detector": {
            "validation_tpr": trained.validation_tpr,
            "l2_weight": trained.l2_weight,
            "epoch": trained.epoch,
            "max_abs_posterior_diff_vs_transformers": hf_diff,
        },  # fmt: skip
        "scored_fraction": float(mask.double().mean()),
        "mean_g": {
            "watermarked": float(wm.mean_score(*watermark.score_inputs(test_pos, None)).mean()),
            "plain": float(wm.mean_score(*watermark.score_inputs(test_neg, None)).mean()),
        },  # fmt: skip
        "step_cost": _step_costs(4, (8192,)) if smoke else _step_costs(40, (8192, 262144)),
        "nano_decode": _decode_cost(engine, prompts[0], config, 16 if smoke else 64),
        "sizes": {
            "pairs": n_pairs,
            "train_pairs": half,
            "test_pairs": n_pairs - half,
            "new_tokens": new_tokens,
            "epochs": epochs,
            "top_k": TOP_K,
            "temperature": TEMPERATURE,
        },  # fmt: skip
        "timings_s": timings,
        "torch_threads": torch.get_num_threads(),
        "machine": machine(),
    }


def to_markdown(r: dict) -> str:
    m, d = r["machine"], r["detector"]
    lines = ["# SynthID Text on nano: detection and cost", "",
             f"Machine: {m.get('cpu', '?')}, isa_level {m.get('isa_level')}, kernel_backend "
             f"{m.get('kernel_backend')}, torch {m.get('torch')}, {r['torch_threads']} threads.", "",
             f"{r['sizes']['test_pairs']} test pairs (watermarked vs plain continuations of the same prompts, "
             f"temperature {r['sizes']['temperature']}, top_k {r['sizes']['top_k']}); the Bayesian detector "
             f"was trained on {r['sizes']['train_pairs']} other pairs of {r['sizes']['new_tokens']} tokens. "
             f"Mean g: {r['mean_g']['watermarked']:.4f} watermarked, {r['mean_g']['plain']:.4f} plain; "
             f"{100 * r['scored_fraction']:.0f}% of positions scored (the rest repeat a 4-token context).", "",
             "TPR at 1% FPR:", "",
             "| edits | tokens | mean | weighted mean | p-value | Bayesian |", "|---|---|---|---|---|---|"]  # fmt: skip
    for row in r["tpr_at_1pct_fpr"]:
        lines.append(f"| {100 * row['edit_rate']:.0f}% | {row['tokens']} | {row['mean']:.2f} | "
                     f"{row['weighted_mean']:.2f} | {row['p_value']:.2f} | {row['bayesian']:.2f} |")  # fmt: skip
    lines += ["", f"Bayesian detector: validation TPR {d['validation_tpr']:.2f} (epoch {d['epoch']}, L2 "
              f"{d['l2_weight']:.1e}); max |posterior - transformers' BayesianDetectorModel| on the test "
              f"texts: {d['max_abs_posterior_diff_vs_transformers']:.1e}.", "",
              "Per sampled token, batch 1, depth 30 (ms; `sample()` with the processor vs without; "
              "transformers' processor in the same sampler):", "",
              "| vocab | top_k | plain | gemmakit watermark | transformers watermark |", "|---|---|---|---|---|"]  # fmt: skip
    for c in r["step_cost"]:
        lines.append(f"| {c['vocab']} | {c['top_k'] or 'none'} | {c['plain_ms']:.2f} | {c['gemmakit_ms']:.2f} | "
                     f"{c['transformers_ms']:.2f} |")  # fmt: skip
    n = r["nano_decode"]
    lines += ["", f"Nano end to end (batch 1, top_k {r['sizes']['top_k']}): {n['plain_ms_per_token']:.1f} ms/token "
              f"plain, {n['watermarked_ms_per_token']:.1f} ms/token watermarked.", "",
              "Rebuild: `python benchmarks/watermark.py`. What these numbers say: README.md, "
              "section \"Watermarking (SynthID Text)\".", ""]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="results JSON (default: benchmarks/results/watermark.json)")
    p.add_argument(
        "--md", default=None, help="Markdown table (default: benchmarks/watermark.md, not with --smoke)"
    )
    p.add_argument("--smoke", action="store_true", help="a few tiny texts: checks that everything runs")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:  # on a shared 2-core machine 1 thread times more steadily than 2 fighting a neighbour
        torch.set_num_threads(args.threads)
    from gemmakit.artifact import atomic_open, write_json

    result = run(args.smoke)
    out = Path(args.out) if args.out else (None if args.smoke else HERE / "results" / "watermark.json")
    if out is not None:
        write_json(out, result)
    md = to_markdown(result)
    target = Path(args.md) if args.md else (None if args.smoke else HERE / "watermark.md")
    if target is not None:
        with atomic_open(target) as f:
            f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
