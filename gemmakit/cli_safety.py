"""The safety side of the command line: `gemmakit watermark detect` and `gemmakit watermark train-detector`.

Where it sits: a thin entry point registered by `cli` (which hands it its model-loading helpers, so
this module never imports `cli`); the work is `gemmakit.safety.watermark`. `detect` loads only a
tokenizer (detection needs token ids, no model); `train-detector` loads a model only to generate its
own training texts.

Key trade-off: `detect` re-tokenizes text, and decode -> encode does not always give back the ids
that were sampled (SentencePiece may merge pieces differently), so a few g-values per text are
noise; the p-value stays exact under H0 and the watermark just loses a little evidence.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gemmakit import cli_args as ca

GENERATE_BATCH = 32  # rows decoded in lockstep by train-detector --generate (one forward per step)
NANO_DIR = Path(__file__).resolve().parent / "assets" / "nano"  # as cli.NANO_DIR (no import upward)


def _tokenizer(args: argparse.Namespace) -> Any:
    from gemmakit.tokenizer import Tokenizer

    if args.tokenizer:
        return Tokenizer.load(args.tokenizer)
    model = Path(args.model) if args.model else NANO_DIR
    return Tokenizer.load(model if model.is_dir() else model.parent)


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Ids of generated `text`, no BOS; the text of reserved pieces (<end_of_turn>, ...), which decode
    writes out but encode never produces, maps back to its id, so a model's own output round-trips."""
    import re

    pieces = {tokenizer.id_to_piece(i): i for i in tokenizer.reserved_ids}
    if not pieces:
        return tokenizer.encode(text, bos=False)
    pattern = "(" + "|".join(re.escape(p) for p in sorted(pieces, key=len, reverse=True)) + ")"
    ids: list[int] = []
    for i, part in enumerate(re.split(pattern, text)):
        ids += [pieces[part]] if i % 2 else tokenizer.encode(part, bos=False) if part else []
    return ids


def read_texts(path: str | Path) -> list[str]:
    """A `.jsonl` file's rows (strings or {"text": ...}), or any other file's whole text as one text."""
    from gemmakit.jsonl import read_jsonl
    from gemmakit.safety.watermark import WatermarkError

    path = Path(path)
    if path.suffix == ".jsonl":
        texts = []
        for row, where in read_jsonl(path, WatermarkError, "texts"):
            text = row.get("text") if isinstance(row, dict) else row
            if not isinstance(text, str):
                raise WatermarkError(f'{where}: expected a string or {{"text": string}}, got {row!r:.80}')
            texts.append(text)
        return texts
    try:
        return [path.read_text(encoding="utf-8-sig")]
    except FileNotFoundError:
        raise WatermarkError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise WatermarkError(f"{path}: is a directory; expected a text or JSONL file") from None
    except UnicodeDecodeError as e:
        raise WatermarkError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def cmd_detect(args: argparse.Namespace) -> int:
    from gemmakit.safety import watermark as wm

    config = wm.load_keys(args.keys)
    detector = wm.load_detector(args.detector, config) if args.detector else None
    texts = read_texts(args.file)
    tokenizer = _tokenizer(args)
    tokens = [encode_text(tokenizer, t) for t in texts]
    g, mask = wm.Watermark(config).score_inputs(tokens, tokenizer.eos_id)
    means, weighted = wm.mean_score(g, mask).tolist(), wm.weighted_mean_score(g, mask).tolist()
    pvalues = wm.p_value(g, mask)
    posterior = detector(g, mask).tolist() if detector is not None else [None] * len(texts)
    print(f"{'text':>5} {'tokens':>7} {'scored':>7} {'mean_g':>7} {'w_mean':>7} {'p_value':>9} "
          f"{'bayes':>7}  verdict")  # fmt: skip
    for i, (n, m, w, p, b) in enumerate(zip(tokens, means, weighted, pvalues, posterior, strict=True)):
        bayes = f"{b:7.4f}" if b is not None else f"{'-':>7}"
        flagged = p <= args.threshold if b is None else b >= 0.5
        verdict = "watermarked" if flagged else "not detected"
        print(f"{i:>5} {len(n):>7} {int(mask[i].sum()):>7} {m:7.4f} {w:7.4f} {p:9.2e} {bayes}  {verdict}")
    return 0


def _generate_texts(args: argparse.Namespace, load: Callable[[argparse.Namespace], tuple[Any, Any]],
                    config: Any) -> tuple[list[list[int]], list[list[int]], int]:  # fmt: skip
    """(watermarked, unwatermarked) generated token lists, one pair per prompt, and the eos id."""
    from gemmakit.data.synth import prompt_set
    from gemmakit.infer import Engine
    from gemmakit.safety.watermark import Watermark, watermark_processor

    model, tokenizer = load(args)
    engine, watermark = Engine(model), Watermark(config)
    prompts = [
        tokenizer.encode(r["messages"][0]["content"]) for r in prompt_set(args.generate, args.seed or 0)
    ]
    pos: list[list[int]] = []
    neg: list[list[int]] = []
    for start in range(0, len(prompts), GENERATE_BATCH):
        batch = prompts[start : start + GENERATE_BATCH]
        for out, proc in ((pos, watermark_processor(watermark)), (neg, None)):
            out += engine.generate(batch, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                   top_p=args.top_p, seed=(args.seed or 0) + start, stop_tokens=[tokenizer.eos_id],
                                   processor=proc)  # fmt: skip
        print(f"\rgenerated {len(pos)}/{len(prompts)} pairs", end="", file=sys.stderr)
    print("", file=sys.stderr)
    return pos, neg, tokenizer.eos_id


def cmd_train_detector(
    args: argparse.Namespace, load: Callable[[argparse.Namespace], tuple[Any, Any]]
) -> int:
    from gemmakit.safety import watermark as wm

    config = wm.load_keys(args.keys)
    files = (args.watermarked, args.unwatermarked)
    if args.generate is None and None in files:
        raise wm.WatermarkError(
            "train-detector: give --watermarked and --unwatermarked files, or --generate N"
        )
    if args.generate is not None:
        pos, neg, eos = _generate_texts(args, load, config)
    else:
        tokenizer = _tokenizer(args)
        pos, neg = ([encode_text(tokenizer, t) for t in read_texts(f)] for f in files)
        eos = tokenizer.eos_id
    watermark = wm.Watermark(config)
    training = wm.DetectorTraining(epochs=args.epochs, seed=args.seed or 0)
    result = wm.train_detector(watermark.score_inputs(pos, eos), watermark.score_inputs(neg, eos), training)
    extra = {"validation_tpr_at_1pct_fpr": result.validation_tpr, "l2_weight": result.l2_weight,
             "epoch": result.epoch, "texts": [len(pos), len(neg)]}  # fmt: skip
    out = wm.save_detector(result.detector, config, args.out, extra)
    print(f"detector: {out} (validation TPR at 1% FPR {result.validation_tpr:.3f}, "
          f"{len(pos)} watermarked + {len(neg)} unwatermarked texts)")  # fmt: skip
    return 0


def add_parsers(sub: Any, add_model_args: Callable[[argparse.ArgumentParser], None],
                load: Callable[[argparse.Namespace], tuple[Any, Any]]) -> None:  # fmt: skip
    p = sub.add_parser("watermark", help="SynthID Text: detect watermarks, train a Bayesian detector",
                       description="SynthID Text watermark detection (HF transformers-compatible keys and "
                                   "g-values). Generate watermarked text with `generate --watermark KEYS.toml`.")  # fmt: skip
    wsub = p.add_subparsers(dest="watermark_command", required=True, metavar="ACTION")

    d = wsub.add_parser("detect", help="score texts for the watermark of a keys file",
                        description="Score each text: mean and weighted-mean g, exact binomial p-value and, "
                                    "with --detector, the Bayesian posterior.")  # fmt: skip
    d.add_argument(
        "file", metavar="FILE", help='a text file (one text) or a JSONL of strings / {"text": ...}'
    )
    d.add_argument(
        "--keys", required=True, help="watermark keys TOML (see recipes/watermark/example-keys.toml)"
    )
    d.add_argument("--detector", help="a `train-detector` output directory for the Bayesian posterior")
    d.add_argument("--threshold", type=ca.float_range(0.0, 1.0), default=0.01,
                   help="p-value at or below which a text is reported watermarked (default 0.01; with "
                        "--detector the verdict is posterior >= 0.5)")  # fmt: skip
    d.add_argument("--model", help="model directory whose tokenizer.model to use (default: bundled nano)")
    d.add_argument("--tokenizer", help="tokenizer.model or its directory (overrides --model)")
    d.set_defaults(func=cmd_detect)

    t = wsub.add_parser("train-detector", help="train and save a Bayesian detector for a keys file",
                        description="Train a Bayesian detector on watermarked vs unwatermarked texts: two "
                                    "files, or --generate N prompt pairs with a model.")  # fmt: skip
    add_model_args(t)
    t.add_argument("--keys", required=True, help="watermark keys TOML")
    t.add_argument("--out", required=True, help="output directory (detector.safetensors + detector.json)")
    t.add_argument("--watermarked", help="text/JSONL file of watermarked texts")
    t.add_argument("--unwatermarked", help="text/JSONL file of unwatermarked texts")
    t.add_argument(
        "--generate", type=ca.int_range(4, 100_000), help="generate N prompt pairs with --model instead"
    )
    t.add_argument(
        "--temperature", type=ca.float_range(0.0), default=1.0, help="sampling temperature (default 1)"
    )
    t.add_argument(
        "--epochs", type=ca.int_range(1, 10_000), default=50, help="epochs per L2 weight (default 50)"
    )
    t.set_defaults(func=lambda args: cmd_train_detector(args, load), top_k=64, max_new_tokens=200)
