"""The evaluation side of the command line: `gemmakit eval`.

Where it sits: a thin entry point registered by `cli` (which hands it its model-loading helpers, so
this module never imports `cli`); the work is `gemmakit.eval.runner.evaluate`. It prints a progress bar
on stderr while requests are answered and a summary table at the end.

Key trade-off: progress is counted in requests, fed to the model in slices of `PROGRESS_SLICE`, so the
bar moves during a long task; slicing gives the adapter smaller batches to sort by length, which costs
a little padding efficiency and nothing else (each request's score does not depend on its batch).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gemmakit import cli_args as ca

PROGRESS_SLICE = 256  # requests per adapter call while showing progress


class _Progress:
    """Wraps an LM: the same answers, with a request counter drawn on stderr."""

    def __init__(self, lm: Any, stream: Any = sys.stderr) -> None:
        self.lm, self.stream, self.name = lm, stream, getattr(lm, "name", type(lm).__name__)
        self.task, self.done, self.total, self.start = "", 0, 0, time.perf_counter()

    def begin(self, task: str) -> None:
        self.task, self.done, self.total, self.start = task, 0, 0, time.perf_counter()

    def _draw(self) -> None:
        if not self.stream.isatty() and self.done < self.total:
            return  # in a log file, only the final line of each call
        frac = self.done / max(self.total, 1)
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        rate = self.done / max(time.perf_counter() - self.start, 1e-9)
        end = "\n" if self.done >= self.total else ""
        self.stream.write(f"\r{self.task:<16} [{bar}] {self.done}/{self.total} requests {rate:.1f}/s{end}")
        self.stream.flush()

    def _sliced(self, fn: Callable[[Sequence[Any]], list[Any]], requests: Sequence[Any]) -> list[Any]:
        self.done, self.total = 0, len(requests)
        out: list[Any] = []
        for i in range(0, len(requests), PROGRESS_SLICE):
            out += fn(requests[i : i + PROGRESS_SLICE])
            self.done = len(out)
            self._draw()
        return out

    def loglikelihood(self, requests: Sequence[Any]) -> list[Any]:
        return self._sliced(self.lm.loglikelihood, requests)

    def loglikelihood_rolling(self, requests: Sequence[Any]) -> list[Any]:
        return self._sliced(self.lm.loglikelihood_rolling, requests)

    def generate_until(self, requests: Sequence[Any]) -> list[Any]:
        return self._sliced(self.lm.generate_until, requests)

    def token_count(self, text: str) -> int:
        return self.lm.token_count(text)


def match_preset(config: Any) -> str | None:
    """The first preset with exactly this shape (for published numbers), or None."""
    from gemmakit.config import PRESETS

    for name, preset in PRESETS.items():
        if preset == config or (name != "tiny" and _same_shape(preset, config)):
            return name
    return None


def _same_shape(a: Any, b: Any) -> bool:
    keys = ("generation", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "vocab_size")
    return all(getattr(a, k, None) == getattr(b, k, None) for k in keys)


def cmd_eval(args: argparse.Namespace, load: Callable[[argparse.Namespace], tuple[Any, Any]]) -> int:
    from gemmakit.eval.lm import GemmaLM
    from gemmakit.eval.lm_http import OpenAICompatibleLM
    from gemmakit.eval.report import write_report
    from gemmakit.eval.runner import evaluate, model_info
    from gemmakit.eval.tasks import EvalError
    from gemmakit.eval.tasks.safety_toxicity import using_toxicity_scorer

    if args.report:
        print(write_report(Path(args.report)))
        return 0
    if args.judge or args.compare:
        return _judge(args)
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if args.memorization:
        return _memorization(args, load)
    if not tasks:
        raise EvalError(
            "--tasks: give at least one task (e.g. arc_easy,gsm8k or ppl:FILE), or --memorization"
        )
    scorer = _toxicity_scorer(args, tasks)  # before the model loads: a bad --toxicity-scorer fails fast
    if args.endpoint:
        lm: Any = OpenAICompatibleLM(args.endpoint, args.endpoint_model or "default")
        info = {"endpoint": args.endpoint, "model": args.endpoint_model}
    else:
        model, tokenizer = load(args)
        lm = GemmaLM(model, tokenizer, batch_size=args.batch_size)
        info = model_info(args.model, args.preset or match_preset(model.config))
    progress = _Progress(lm)
    out = Path(args.out or Path("eval-runs") / time.strftime("%Y%m%d-%H%M%S"))
    with using_toxicity_scorer(scorer) if scorer else contextlib.nullcontext():
        results = evaluate(progress, tasks, protocol=args.protocol, data_dir=args.data_dir, out=out,
                           limit=args.limit, model=info, on_task_start=progress.begin,
                           allow_unsafe_code=args.allow_unsafe_code_execution)  # fmt: skip
    print(f"\n{'task':<18} {'metric':<16} {'score':>8} {'stderr':>8} {'n':>6}")
    for name, e in results["tasks"].items():
        scale = 1 if e["kind"] == "perplexity" else 100
        err = e["stderr"].get(e["metric"])
        print(f"{name[:18]:<18} {e['metric'][:16]:<16} {scale * e['value']:>8.2f} "
              f"{(scale * err if err is not None else float('nan')):>8.2f} {e['n']:>6}")  # fmt: skip
    print(f"results: {out / 'results.json'}\nreport:  {out / 'report.md'}")
    return 0


def _toxicity_scorer(
    args: argparse.Namespace, tasks: Sequence[str]
) -> Callable[[Sequence[str]], list[float]] | None:
    """The --toxicity-scorer for the run when a requested task scores toxicity (RealToxicityPrompts,
    BOLD), else None; `gemmakit.safety` (a model load) is imported only then."""
    from gemmakit.eval.runner import PPL_PREFIX
    from gemmakit.eval.tasks import get_task

    names = [t for t in tasks if not t.startswith(PPL_PREFIX)]
    if not any(getattr(get_task(t), "needs_toxicity_scorer", False) for t in names):
        return None
    from gemmakit.safety.classifier import load_toxicity_scorer

    return load_toxicity_scorer(args.toxicity_scorer)


def _judge(args: argparse.Namespace) -> int:
    """Pairwise comparison of two answer files by a judge model: judge.json and one summary line."""
    from gemmakit.artifact import write_json
    from gemmakit.eval.judge import JudgeError, compare, load_judge, read_answers

    if not (args.judge and args.compare):
        raise JudgeError("--judge MODEL and --compare A.jsonl B.jsonl go together")
    (pa, a), (pb, b) = (read_answers(f) for f in args.compare)
    if len(a) != len(b):
        raise JudgeError(f"--compare: {args.compare[0]} has {len(a)} answers, {args.compare[1]} {len(b)}")
    for i, (x, y) in enumerate(zip(pa, pb, strict=True)):
        if x != y:
            raise JudgeError(f"--compare: answer {i + 1} is to another prompt in {args.compare[0]} than in "
                             f"{args.compare[1]}")  # fmt: skip
    result = compare(load_judge(args.judge, batch_size=args.batch_size), pa, a, b)
    out = Path(args.out or Path("eval-runs") / time.strftime("%Y%m%d-%H%M%S"))
    write_json(out / "judge.json", {"a": args.compare[0], "b": args.compare[1], **result.as_dict()})
    print(f"A vs B under {result.judge}: win rate {100 * result.win_rate:.1f}% +- {100 * result.stderr:.1f} "
          f"({result.wins} wins, {result.ties} ties, {result.losses} losses of {result.n}); both orders "
          f"agreed on {100 * result.position_consistency:.0f}%; {out / 'judge.json'}")  # fmt: skip
    return 0


def _memorization(args: argparse.Namespace, load: Callable[[argparse.Namespace], tuple[Any, Any]]) -> int:
    """The report's memorization test on token shards or a data run: memorization.json and .md."""
    from gemmakit.artifact import atomic_open, write_json
    from gemmakit.eval.memorization import memorization

    model, tokenizer = load(args)
    result = memorization(model, args.memorization, per_source=args.per_source, tokenizer=tokenizer,
                          batch_size=args.batch_size)  # fmt: skip
    out = Path(args.out or Path("eval-runs") / time.strftime("%Y%m%d-%H%M%S"))
    write_json(out / "memorization.json", result.as_dict())
    md = result.to_markdown()
    with atomic_open(out / "memorization.md") as f:
        f.write(md + "\n")
    print(md)
    print(f"results: {out / 'memorization.json'}")
    return 0


def add_parsers(sub: Any, add_model_args: Callable[[argparse.ArgumentParser], None],
                load: Callable[[argparse.Namespace], tuple[Any, Any]]) -> None:  # fmt: skip
    p = sub.add_parser("eval", help="benchmarks under the Gemma reports' protocols (results.json + report)",
                       description="Evaluate a model on benchmarks read from local dataset files "
                                   "(--data-dir, upstream layouts), or perplexity on any text set "
                                   "(--tasks ppl:FILE).")  # fmt: skip
    add_model_args(p)
    p.add_argument("--tasks", help="comma-separated task names (e.g. arc_easy,hellaswag,gsm8k) or ppl:PATH")
    p.add_argument("--protocol", default="lm-eval", help="gemma1, gemma2, gemma3 or lm-eval (default)")
    p.add_argument("--data-dir", default="eval-data", help="directory holding the datasets' files")
    p.add_argument("--limit", type=ca.positive_int, help="score only the first N documents of each task")
    p.add_argument(
        "--batch-size", type=ca.int_range(1, 4096), default=8, help="requests per forward pass (default 8)"
    )
    p.add_argument("--out", help="output directory (default: eval-runs/<timestamp>)")
    p.add_argument("--endpoint", help="evaluate an OpenAI-compatible server instead (base URL, e.g. "
                   "http://127.0.0.1:8000/v1)")  # fmt: skip
    p.add_argument("--endpoint-model", help="the model name to send to --endpoint")
    p.add_argument("--allow-unsafe-code-execution", action="store_true",
                   help="let HumanEval/MBPP run model-written code where no namespace sandbox is available "
                        "(it then runs with your user's rights, network and files)")  # fmt: skip
    p.add_argument("--toxicity-scorer", metavar="SPEC",
                   help="what scores toxicity for realtoxicityprompts and bold: 'profanity-check' (the "
                        "alt-profanity-check baseline), a classifier model directory, or unset for the "
                        "shipped classifier")  # fmt: skip
    p.add_argument("--memorization", metavar="SHARDS",
                   help="run the memorization test on a token-shard directory or a `gemmakit data run` output")  # fmt: skip
    p.add_argument("--per-source", type=ca.positive_int, default=10_000,
                   help="documents sampled per source for --memorization (default 10000, as the report)")  # fmt: skip
    p.add_argument("--report", metavar="DIR", help="only re-render DIR/report.md from DIR/results.json")
    p.add_argument("--judge", metavar="MODEL",
                   help="pairwise judging with this model (a reward model, or a chat model asked 'A or B' in "
                        "both orders); needs --compare")  # fmt: skip
    p.add_argument("--compare", nargs=2, metavar=("A.jsonl", "B.jsonl"),
                   help='two answer files, rows {"prompt": ..., "answer": ...} in the same prompt order')  # fmt: skip
    p.set_defaults(func=lambda args: cmd_eval(args, load))
