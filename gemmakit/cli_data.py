"""The data side of the command line: `gemmakit data run` and `gemmakit data report`.

Where it sits: a thin entry point registered by `cli`; it parses arguments, prints a summary, and leaves
all work to `gemmakit.data.pipeline` and `gemmakit.data.report`.

Key trade-off: `data run` prints one summary at the end (plus per-step lines with --verbose) rather than
a live bar: shards finish in parallel processes or on other machines, and the resumable markers on disk,
not the terminal, are the record of progress.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from gemmakit import cli_args as ca


def cmd_data_run(args: argparse.Namespace) -> int:
    from gemmakit.data.pipeline import run
    from gemmakit.data.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    out = Path(args.output or Path("data-runs") / Path(args.recipe).stem)
    start = time.perf_counter()
    stats = run(recipe, out, executor=args.executor, workers=args.workers, ray_address=args.ray_address)
    t = stats["total"]
    took = time.perf_counter() - start
    print(f"{out}: {t['docs_in']:,} records -> kept {t['kept']:,}, removed {sum(t['dropped'].values()):,}, "
          f"malformed {sum(t['malformed'].values()):,}, tokens {t['tokens']:,} ({took:.1f} s)")  # fmt: skip
    for reason, n in sorted(t["dropped"].items(), key=lambda kv: -kv[1])[:8]:
        print(f"  {reason:<28} {n:>10,}")
    print(f"report: {out / 'report.md'}")
    return 0


def cmd_data_report(args: argparse.Namespace) -> int:
    from gemmakit.data.report import write_report

    path = write_report(Path(args.dir))
    print(path)
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    if args.kind != "web":
        import json

        from gemmakit.artifact import atomic_open
        from gemmakit.data import synth

        rows = (synth.preference_pairs if args.kind == "preference" else synth.prompt_set)(
            args.docs, args.seed
        )
        out = Path(args.out)
        out = out / f"{args.kind}-{synth.split_of(args.seed)}-seed{args.seed}.jsonl" if out.is_dir() else out
        with atomic_open(out, overwrite=args.overwrite) as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"wrote {len(rows):,} {args.kind} rows ({synth.split_of(args.seed)} split) to {out}")
        return 0
    from gemmakit.data.webgen import write_demo_corpus

    paths = write_demo_corpus(Path(args.out), args.docs, args.seed)
    print(f"wrote {args.docs:,} documents in {len(paths) - 1} files under {Path(args.out) / 'web'} and an eval "
          f"set {paths[-1]}")  # fmt: skip
    return 0


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("data", help="filter, deduplicate and tokenize a corpus (data recipes)",
                       description="The data pipeline: sources -> filters -> dedup -> decontamination -> "
                                   "kept JSONL, token shards, stats.json and a report.")  # fmt: skip
    data = p.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    r = data.add_parser("run", help="run or resume a data recipe",
                        description="Run a data recipe (TOML). Rerunning with the same output resumes: "
                                    "finished shards are skipped.")  # fmt: skip
    r.add_argument("--recipe", required=True, help="data recipe TOML (see recipes/data_*.toml)")
    r.add_argument("--output", help="output directory (default: data-runs/<recipe name>)")
    r.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local worker processes (default) or a Ray cluster")  # fmt: skip
    r.add_argument(
        "--workers",
        type=ca.int_range(1, 1024),
        help="local worker processes (default: the recipe's pipeline.workers)",
    )
    r.add_argument("--ray-address", help="Ray cluster address (default: start or join a local one)")
    r.set_defaults(func=cmd_data_run)
    r = data.add_parser("synth", help="write a generated web-like corpus to try the pipeline on",
                        description="Seeded web-like documents (prose, junk, duplicates, personal data, "
                                    "other languages) as JSONL, plus a small eval set some documents quote.")  # fmt: skip
    r.add_argument("--out", required=True, help="directory (gets web/ and evals/)")
    r.add_argument(
        "--docs", type=ca.int_range(1, 10**8), default=20000, help="number of documents (default 20000)"
    )
    r.add_argument("--seed", type=ca.seed, default=0)
    r.add_argument("--kind", choices=("web", "preference", "prompts"), default="web",
                   help="web: the corpus above (default); preference: TRL-format preference pairs for reward "
                        "models and DPO; prompts: RL prompt rows with answers for verifiable rewards (--out "
                        "is then a JSONL file or a directory; --docs is the row count; even seeds are the "
                        "train split, odd seeds held out)")  # fmt: skip
    r.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    r.set_defaults(func=cmd_data_synth)
    r = data.add_parser("report", help="re-render report.md / report.png from a run's stats.json")
    r.add_argument("dir", help="a finished data run's output directory")
    r.set_defaults(func=cmd_data_report)
