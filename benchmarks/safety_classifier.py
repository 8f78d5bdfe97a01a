"""The shipped safety classifier: build it (data, fine-tuning, packaging) and measure it on held-out rows.

    python benchmarks/safety_classifier.py [--out runs/safety-classifier] [--smoke] [--no-package]

1. Data: `gemmakit.data.harms.examples`, seed 0 (train halves of every template and filler list) and
   seed 1 (the other halves: unseen templates, names, groups, acts, insults, and the held-out quarter
   of violent verb-victim pairs, whose words train sees in other pairs); held-out rows whose
   (prompt, response) text also occurs in train (everyday chat lines such as "What is 3 + 4?") are
   dropped. Each row becomes the ShieldGemma prompt of its policy (`safety.classifier.render_ids`)
   followed by the answer token "Yes" or "No", the only target (pre-tokenized SFT rows).
2. Training: `recipes/guard-nano.toml` (full fine-tune of the shipped nano model, the one loop).
3. Packaging: `gemmakit/assets/nano-guard` (bf16 safetensors, tokenizer, guard.json with this run's
   numbers), replaced atomically.
4. Held-out table per harm type (the policy asked): precision / recall / F1 at 0.5 and ROC AUC for the
   trained classifier, the untrained nano model prompted the same way, and the alt-profanity-check
   baseline (policy-blind: it scores the judged text, the response if there is one, else the prompt);
   split by prompt-only and prompt-response form and by row kind (violations, hard negatives).
Writes benchmarks/results/safety_classifier.json and benchmarks/safety_classifier.md.

Key trade-off: generated data gives exact labels and a clean train/held-out split, so the table is
a fair measurement of generalisation to unseen phrasings of the SAME kind of text; it is not a
measurement on real user traffic (the md file says what it cannot catch).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NANO = ROOT / "gemmakit" / "assets" / "nano"
SHIPPED = ROOT / "gemmakit" / "assets" / "nano-guard"
sys.path.insert(0, str(HERE))

SIZES = {"train": (16000, 96), "held": (2000, 64)}  # rows (full run, --smoke)
STEPS = (1000, 3)


def _rows_to_sft(rows: list[dict], tok: object, path: Path) -> Path:
    from gemmakit.safety.classifier import render_ids
    from gemmakit.safety.policy import HARMS

    yes, no = tok.piece_to_id("Yes"), tok.piece_to_id("No")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            ids = render_ids(tok, HARMS[r["policy"]], r["prompt"], r["response"])
            ids.append(yes if r["label"] else no)
            f.write(json.dumps({"input_ids": ids, "completion_mask": [0] * (len(ids) - 1) + [1]}) + "\n")
    return path


def _profanity_scores(rows: list[dict]) -> list[float]:
    from gemmakit.safety.classifier import load_toxicity_scorer

    score = load_toxicity_scorer("profanity-check")
    return score([r["response"] if r["response"] is not None else r["prompt"] for r in rows])


def _classifier_scores(model_dir: Path, rows: list[dict]) -> list[float]:
    from gemmakit.checkpoint import load_model
    from gemmakit.safety.classifier import Classifier, Item
    from gemmakit.tokenizer import Tokenizer

    clf = Classifier(load_model(model_dir, dtype=torch.float32).set_attn_impl("sdpa"), Tokenizer.load(NANO),
                     batch_size=16)  # fmt: skip
    out = [0.0] * len(rows)
    by_policy: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_policy.setdefault(r["policy"], []).append(i)
    for policy, idx in by_policy.items():  # one policy per row: grouped by policy, rows batch together
        scored = clf.score([Item(rows[i]["prompt"], rows[i]["response"]) for i in idx], [policy])
        for i, s in zip(idx, scored, strict=True):
            out[i] = s[policy]
    return out


def _guard_overhead(guard_dir: Path, new_tokens: int = 96) -> dict:
    """Chat reply time with and without the guard's streamed output checks (4 policies, every 16
    tokens) on the nano chat model, greedy, same prompt; thresholds at 0.999 so the reply is never cut."""
    from gemmakit.chat import render
    from gemmakit.checkpoint import load_model
    from gemmakit.infer import Engine
    from gemmakit.safety.classifier import load_classifier
    from gemmakit.safety.guard import Check, Guard, GuardConfig
    from gemmakit.safety.policy import HARMS
    from gemmakit.tokenizer import StreamDecoder, Tokenizer

    tok = Tokenizer.load(NANO)
    engine = Engine(load_model(NANO, dtype=torch.float32).set_attn_impl("sdpa"))
    prompt = render(
        tok, [{"role": "user", "content": "Tell me a story about a cat."}], add_generation_prompt=True
    )
    checks = tuple(Check(p, 0.999) for p in HARMS)
    clf = load_classifier(guard_dir)
    guard = Guard(GuardConfig(input=checks, output=checks), scorer=clf.score)

    def reply(monitor: object | None) -> tuple[float, int]:
        t = time.perf_counter()
        dec, n = StreamDecoder(tok), 0
        for step in engine.stream([prompt.tokens], new_tokens, stop_tokens=[]):  # no stop: fixed length
            n += 1
            piece = dec.push(step[0])
            if monitor is not None:
                monitor.push(piece)
        if monitor is not None:
            monitor.finish()
        return time.perf_counter() - t, n

    reply(None)  # warm-up
    plain = min(reply(None)[0] for _ in range(3))
    guarded, n = min(reply(guard.monitor("Tell me a story about a cat.")) for _ in range(3))
    t = time.perf_counter()
    guard.check_input("Tell me a story about a cat.")
    input_s = time.perf_counter() - t
    return {"tokens": n, "plain_s": round(plain, 3), "guarded_s": round(guarded, 3),
            "ratio": round(guarded / plain, 2), "input_check_s": round(input_s, 3), "window_tokens": 16,
            "policies": len(checks)}  # fmt: skip


def _table(rows: list[dict], scores: dict[str, list[float]]) -> dict:
    from gemmakit.data.harms import HARM_TYPES
    from gemmakit.safety.scoring import binary_report

    def subset(pred) -> dict:
        idx = [i for i, r in enumerate(rows) if pred(r)]
        labels = [rows[i]["label"] for i in idx]
        return {name: binary_report([s[i] for i in idx], labels) for name, s in scores.items()}

    out = {"all": subset(lambda r: True)}
    for h in HARM_TYPES:
        out[h] = subset(lambda r, h=h: r["policy"] == h)
    out["prompt-only"] = subset(lambda r: r["response"] is None)
    out["prompt-response"] = subset(lambda r: r["response"] is not None)
    out["hard negatives"] = subset(lambda r: r["kind"] == "hard_negative" or r["label"] == 1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/safety-classifier", help="work directory (reruns resume)")
    ap.add_argument("--smoke", action="store_true", help="a few steps on small data (CI)")
    ap.add_argument("--no-package", action="store_true", help="do not replace gemmakit/assets/nano-guard")
    ap.add_argument("--md", default=None, help="Markdown output (default benchmarks/safety_classifier.md)")
    return _run(ap.parse_args(argv))


def _run(args: argparse.Namespace) -> int:
    from machine_info import machine

    from gemmakit.data import harms
    from gemmakit.tokenizer import Tokenizer
    from gemmakit.train import load_recipe, run
    from gemmakit.train.nano import package

    i = 1 if args.smoke else 0
    out = Path(args.out)
    t0 = time.perf_counter()
    tok = Tokenizer.load(NANO)
    train_rows = harms.examples(SIZES["train"][i], 0)
    seen = {(r["prompt"], r["response"]) for r in train_rows}
    held_all = harms.examples(SIZES["held"][i], 1)
    held = [r for r in held_all if (r["prompt"], r["response"]) not in seen]
    data = _rows_to_sft(train_rows, tok, out / "data" / "train.jsonl")
    steps = STEPS[i]
    final = out / "run" / "final"
    t = time.perf_counter()
    if not final.is_dir():
        recipe = load_recipe(ROOT / "recipes" / "guard-nano.toml",
                             [f"model.init_from={NANO}", f"data.path={data}", f"loop.steps={steps}"])  # fmt: skip
        result = run(recipe, out / "run", resume=(out / "run" / "checkpoints").is_dir())
        train_info = {"steps": result.steps, "first_loss": result.losses[0], "final_loss": result.losses[-1]}
    else:
        train_info = {"steps": steps, "resumed_from_final": True}
    train_s = time.perf_counter() - t
    t = time.perf_counter()
    scores = {
        "nano-guard": _classifier_scores(final, held),
        "nano (untrained)": _classifier_scores(NANO, held),
    }
    try:
        scores["alt-profanity-check"] = _profanity_scores(held)
    except Exception as e:  # the data extra is not installed: the baseline column is left out
        print(f"baseline skipped: {e}", file=sys.stderr)
    eval_s = time.perf_counter() - t
    table = _table(held, scores)
    results = {
        "machine": machine(),
        "torch": torch.__version__,
        "smoke": args.smoke,
        "data": {"train_rows": len(train_rows), "train_positive": sum(r["label"] for r in train_rows),
                 "held_rows": len(held), "held_dropped_as_seen": len(held_all) - len(held),
                 "held_positive": sum(r["label"] for r in held), "train_seed": 0, "held_seed": 1},
        "training": {**train_info, "seconds": round(train_s, 1)},
        "eval_seconds": round(eval_s, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "table": table,
    }  # fmt: skip
    if not args.smoke and not args.no_package:
        package(final, SHIPPED, {"classifier": "ShieldGemma prompt, Yes/No", **results})
        (SHIPPED / "nano.json").rename(SHIPPED / "guard.json")
    results["guard_overhead"] = _guard_overhead(final, 96 if not args.smoke else 8)
    if not args.smoke:
        res = HERE / "results" / "safety_classifier.json"
        res.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    md = args.md or (None if args.smoke else HERE / "safety_classifier.md")
    text = to_markdown(results)
    if md:
        Path(md).write_text(text, encoding="utf-8")
    print(text)
    return 0


def _cell(r: dict) -> str:
    f = lambda x: "–" if x != x else f"{x:.3f}"  # noqa: E731  (NaN -> dash)
    return f"{f(r['precision'])} / {f(r['recall'])} / {f(r['auc'])}"


def to_markdown(r: dict) -> str:
    names = list(next(iter(r["table"].values())))
    lines = [
        "# Safety classifier (nano-guard), measured on held-out rows",
        "",
        f"Machine: {r['machine'].get('cpu', platform.processor())}; torch {r['torch']}. "
        f"Train {r['data']['train_rows']} rows ({r['data']['train_positive']} positive), "
        f"held-out {r['data']['held_rows']} rows ({r['data']['held_positive']} positive; "
        f"{r['data']['held_dropped_as_seen']} dropped because their text occurs in train). "
        f"Training {r['training'].get('steps')} steps in {r['training']['seconds']:.0f} s; "
        f"rebuild with `python benchmarks/safety_classifier.py`.",
        "",
        "Each cell: precision / recall at P(violation) > 0.5 / ROC AUC.",
        "",
        "| rows (policy asked) | n | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for key, cols in r["table"].items():
        n = next(iter(cols.values()))["n"]
        lines.append(f"| {key} | {n} | " + " | ".join(_cell(cols[c]) for c in names) + " |")
    g = r.get("guard_overhead")
    if g:
        lines += ["", f"Guarded chat (nano, {g['tokens']} greedy tokens, {g['policies']} output policies checked every "
                  f"{g['window_tokens']} tokens by nano-guard): {g['plain_s']:.2f} s unguarded, {g['guarded_s']:.2f} s "
                  f"guarded ({g['ratio']:.2f}x); the input check takes {g['input_check_s']:.2f} s."]  # fmt: skip
    lines += [
        "",
        "alt-profanity-check does not read the policy: it scores the judged text (the response, else the",
        "prompt) the same way whatever harm is asked, so rows asking about another harm count against it.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
