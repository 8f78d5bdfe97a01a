"""The training side of the command line: `gemmakit train` and `gemmakit shards`.

Where it sits: a thin entry point like `cli` (which registers these subcommands); it parses
arguments, prints progress, and leaves all work to `gemmakit.train` and `gemmakit.data`. Under
`torchrun --nproc-per-node N -m gemmakit.cli train ...` every rank runs it; only rank 0 prints.

Key trade-off: progress is one printed line per logged step (step, loss, lr, tokens/s, ETA)
rather than a redrawn bar, so logs of a multi-hour run on a cluster stay readable in a file.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from gemmakit import cli_args as ca

# Alignment metrics worth a glance on the progress line (metrics.jsonl has them all).
_ALIGN_SHOWN = (("accuracy", "acc"), ("rewards/accuracy", "acc"), ("rewards/margin", "margin"),
                ("reward", "reward"), ("kl", "kl"))  # fmt: skip


def _progress(total: int) -> Any:
    start = time.perf_counter()

    def show(record: dict) -> None:
        step, elapsed = record["step"], time.perf_counter() - start
        eta = elapsed / max(step, 1) * (total - step)
        val = f"  val {record['val_loss']:.4f}" if "val_loss" in record else ""
        val += "".join(f"  {name} {record[key]:.3f}" for key, name in _ALIGN_SHOWN if key in record)
        print(f"step {step:>6}/{total}  loss {record['loss']:.4f}{val}  lr {record['lr']:.2e}  "
              f"|g| {record['grad_norm']:.3f}  {record['tokens_per_s']:,.0f} tok/s  eta {eta / 60:.1f} min",
              flush=True)  # fmt: skip

    return show


def cmd_train(args: argparse.Namespace) -> int:
    from gemmakit.train import distributed as dist
    from gemmakit.train import load_recipe, run

    recipe = load_recipe(args.recipe, args.set or [])
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        result = run(recipe, args.out, resume=args.resume, on_log=_progress(recipe.loop.steps))
        rank = dist.rank()
    finally:
        dist.teardown()
    if rank == 0:
        print(f"done: {result.steps} steps; final loss {result.losses[-1]:.4f}" if result.losses else "done")
        if result.last_checkpoint and recipe.method == "reward":
            print(
                f"reward model: {args.out}/final  (gemmakit reward score --model {args.out}/final --data PAIRS)"
            )
        elif result.last_checkpoint:
            print(f"model: {args.out}/final  (gemmakit chat --model {args.out}/final)")
    return 0


def cmd_shards(args: argparse.Namespace) -> int:
    from gemmakit.data.shards import Shards, tokenize_to_shards
    from gemmakit.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(args.tokenizer)
    out = tokenize_to_shards(args.inputs, tokenizer, args.out, text_field=args.text_field,
                             overwrite=args.overwrite)  # fmt: skip
    shards = Shards.open(out)
    print(f"{out}: {shards.n_docs} documents, {shards.n_tokens:,} tokens ({shards.dtype})")
    return 0


def cmd_nano(args: argparse.Namespace) -> int:
    from gemmakit.train.nano import build

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    shows: dict[str, Any] = {}

    def on_log(stage: str, record: dict) -> None:
        if stage not in shows:
            print(f"== {stage}", flush=True)
            shows[stage] = _progress(record.get("total_steps", 0))
        shows[stage](record)

    report = build(args.out, smoke=args.smoke, on_log=on_log)
    before, after = report["eval_before_sft"], report["eval_after_sft"]
    print(f"nano: {report['parameters']:,} parameters, {report['wall_time_s'] / 60:.1f} min; "
          f"arithmetic {before['arithmetic_accuracy']:.0%} -> {after['arithmetic_accuracy']:.0%}; "
          f"<end_of_turn> rate {after['end_of_turn_rate']:.0%}; model: {args.out}/model")  # fmt: skip
    return 0


def cmd_reward_score(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from gemmakit.artifact import atomic_open
    from gemmakit.data.preference import read_preference_jsonl
    from gemmakit.errors import UserError
    from gemmakit.tokenizer import Tokenizer
    from gemmakit.train.pairs import encode_pairs
    from gemmakit.train.reward import load_reward_model, score_sequences

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    tokenizer = Tokenizer.load(args.tokenizer or args.model)
    rm = load_reward_model(args.model, pad_id=tokenizer.pad_id)
    if tokenizer.vocab_size > rm.config.vocab_size:
        raise UserError(f"--tokenizer: {tokenizer.vocab_size} pieces but the reward model {args.model} has "
                        f"{rm.config.vocab_size} embedding rows; use the tokenizer it was trained with")  # fmt: skip
    pairs = encode_pairs(read_preference_jsonl(args.data), tokenizer, args.data)
    seqs = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
    scores = score_sequences(rm, seqs, args.batch_size)
    chosen, rejected = scores[: len(pairs)], scores[len(pairs) :]
    out = Path(args.out)
    with atomic_open(out, overwrite=True) as f:
        for i, (c, r) in enumerate(zip(chosen, rejected, strict=True)):
            f.write(json.dumps({"pair": i + 1, "chosen": c, "rejected": r, "margin": c - r}) + "\n")
    right = sum(c > r for c, r in zip(chosen, rejected, strict=True))
    margin = sum(c - r for c, r in zip(chosen, rejected, strict=True)) / len(pairs)
    print(f"accuracy {right / len(pairs):.4f} ({right}/{len(pairs)} pairs: chosen scored above rejected); "
          f"mean margin {margin:.4f}; scores: {out}")  # fmt: skip
    return 0


def _add_reward(sub: Any) -> None:
    p = sub.add_parser("reward", help="use a reward model (score preference pairs)",
                       description="Reward models trained with `gemmakit train` (method \"reward\") or any "
                                   "HF Gemma*ForSequenceClassification directory with one label.")  # fmt: skip
    rsub = p.add_subparsers(dest="reward_command", required=True, metavar="{score}")
    q = rsub.add_parser("score", help="score preference pairs; print the pairwise accuracy",
                        description="Score prompt + chosen and prompt + rejected of every pair in a TRL-format "
                                    "preference JSONL file; print how often chosen wins and write the scores.")  # fmt: skip
    q.add_argument("--model", required=True, help="reward model directory")
    q.add_argument("--data", required=True, help="preference pairs JSONL ({prompt, chosen, rejected})")
    q.add_argument(
        "--out", default="scores.jsonl", help="scores JSONL, one line per pair (default: scores.jsonl)"
    )
    q.add_argument("--tokenizer", help="tokenizer.model or its directory (default: the one in --model)")
    q.add_argument("--batch-size", type=ca.positive_int, default=8, help="sequences per forward (default 8)")
    q.add_argument("--threads", type=ca.threads, help="CPU threads (default: torch's choice)")
    q.set_defaults(func=cmd_reward_score)


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("train", help="pretrain, SFT, LoRA, reward model, DPO or RL from a TOML recipe",
                       description="Train from a TOML recipe (see recipes/). Under torchrun, every rank "
                                   "runs this command; set parallel.mode to ddp or fsdp.")  # fmt: skip
    p.add_argument("--recipe", required=True, help="recipe TOML file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set optim.lr=1e-3 (repeatable)")  # fmt: skip
    p.add_argument("--out", required=True, help="run directory (metrics, checkpoints, final model)")
    p.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint in --out")
    p.add_argument("--threads", type=ca.threads, help="CPU threads per process (default: torch's choice)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("shards", help="tokenize text / JSONL files into training shards",
                       description="Tokenize .txt files (one document each) and JSONL files (one document "
                                   "per line) into memory-mapped token shards for pretraining.")  # fmt: skip
    p.add_argument("inputs", nargs="+", help="input files")
    p.add_argument("--tokenizer", required=True, help="tokenizer.model or its directory")
    p.add_argument("--out", required=True, help="output shard directory (written atomically)")
    p.add_argument("--text-field", default="text", help="JSONL key holding the text (default: text)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=cmd_shards)
    _add_nano(sub)
    _add_reward(sub)


def _add_nano(sub: Any) -> None:
    p = sub.add_parser("nano", help="build the nano Gemma from the repository's data (about 1 hour)",
                       description="Train the nano Gemma end to end: tokenizer, pretraining on Shakespeare, "
                                   "SFT on generated chat data, evaluation; writes OUT/model.")  # fmt: skip
    p.add_argument("--out", required=True, help="build directory")
    p.add_argument("--smoke", action="store_true", help="a few steps of every stage (CI)")
    p.add_argument("--threads", type=ca.threads, help="CPU threads (default: torch's choice)")
    p.set_defaults(func=cmd_nano)
