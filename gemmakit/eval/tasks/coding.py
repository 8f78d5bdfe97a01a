"""HumanEval and MBPP: the model writes Python, which runs in the sandbox against the benchmark's tests.

Where it sits: `run_task` asks the LM for one greedy completion per problem; `score` assembles the
program exactly as lm-eval 0.4.13 hands it to HF's code_eval metric (candidate + "\\n" + test
code) and runs it with `execution.run_program(harness="exec")`: human-eval's semantics (exec() in
fresh globals; any exception, SystemExit included, fails), 3 s, contained by Linux namespaces.
pass@1 of one greedy sample per problem is `metrics.pass_at_k(1, c, 1)`, i.e. the pass rate.

- humaneval (humaneval.yaml): the 164 problems from openai/openai_humaneval's
  openai_humaneval/test-00000-of-00001.parquet when data_dir holds it, else from the human-eval
  package's HumanEval.jsonl.gz (the same problems; `eval.humaneval`); 0-shot, the prompt is the
  problem's prompt, generation stops at "\\nclass", "\\ndef", "\\n#", "\\nif" or "\\nprint",
  1024 tokens; program = prompt + completion + "\\n" + test + "\\ncheck(entry_point)".
- mbpp (mbpp.yaml): google-research-datasets/mbpp's full/test-00000-of-00001.parquet (500
  problems, task_ids 11-510); 3-shot with the fixed exemplars task_ids 2-4 (first_n sampler):
  "You are an expert Python programmer, and here is your task: {text} Your code should pass these
  tests:\\n\\n{3 asserts}\\n[BEGIN]\\n", an exemplar's answer is its code + "\\n[DONE]" (target
  delimiter ""); generation stops at "[DONE]", 256 tokens; program = completion + "\\n" + the 3
  asserts (test_setup_code and challenge_test_list are not used, as lm-eval).

Key trade-off: the sandbox is decided before any generation (`load` resolves the isolation), so
a machine without namespaces fails in a second with ExecutionRefused instead of after an hour of
generation; programs then run one at a time as `run_task` scores each document (~0.15 s each on
2 cores: MBPP's 500 take about 75 s), not in parallel.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from gemmakit.eval import execution, humaneval
from gemmakit.eval.lm import GenerateRequest, Request
from gemmakit.eval.metrics import pass_at_k
from gemmakit.eval.tasks.base import Doc, EvalError, Task, field, read_rows
from gemmakit.eval.tasks.exemplars import ExemplarTask

logger = logging.getLogger(__name__)

HUMANEVAL_UNTIL = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
MBPP_UNTIL = ("[DONE]",)
HUMANEVAL_FIELDS = ("task_id", "prompt", "test", "entry_point")


@dataclass(frozen=True)
class CodeExecution:
    """How model-written programs run (see `eval.execution`)."""

    timeout: float = 3.0  # seconds per program: human-eval's and HF code_eval's default
    memory_mb: int = (
        1024  # address-space limit per program; every HumanEval canonical solution passes under it
    )
    isolation: str = "auto"  # "auto", "namespaces" or "none" (execution.resolve_isolation)
    allow_unsafe: bool = False  # run without isolation where there is none (--allow-unsafe-code-execution)


class CodeTask:
    """Mixin: runs programs under one `CodeExecution`, with the isolation decided before generation."""

    metrics: ClassVar[dict[str, str]] = {"pass@1": "mean"}
    primary_metric: ClassVar[str] = "pass@1"

    def __init__(self, code_execution: CodeExecution | None = None) -> None:
        self.code_execution = code_execution or CodeExecution()
        self._isolation: str | None = None  # "namespaces" or "none" once resolved

    def resolve_isolation(self) -> str:
        """The isolation programs will run under; ExecutionRefused when there is none and it is not allowed."""
        if self._isolation is None:
            cfg = self.code_execution
            self._isolation = execution.resolve_isolation(cfg.isolation, cfg.allow_unsafe)
        return self._isolation

    def program_for(self, doc: Doc, responses: Sequence[Any]) -> tuple[str, str]:
        """(the program that runs for this document's answer, a label for logs)."""
        raise NotImplementedError

    def score(self, doc: Doc, responses: Sequence[Any]) -> dict[str, float]:
        return {"pass@1": self.pass_at_1(*self.program_for(doc, responses))}

    def score_all(self, docs: Sequence[Doc], answers: Sequence[Sequence[Any]]) -> list[dict[str, float]]:
        """Every document's program at once, os.cpu_count() sandboxes in parallel (`execution.run_many`,
        with its watchdog): MBPP's 500 programs take about 1/cores of the time of one by one."""
        cfg = self.code_execution
        programs = [self.program_for(doc, ans)[0] for doc, ans in zip(docs, answers, strict=True)]
        results = execution.run_many(programs, timeout=cfg.timeout, memory_mb=cfg.memory_mb,
                                     isolation=self.resolve_isolation(), allow_unsafe=cfg.allow_unsafe,
                                     harness="exec")  # fmt: skip
        return [{"pass@1": pass_at_k(1, int(r.passed), 1)} for r in results]

    def pass_at_1(self, program: str, label: str) -> float:
        """pass@1 (1.0 or 0.0) of one program, run in the sandbox the human-eval way."""
        cfg = self.code_execution
        result = execution.run_program(
            program, timeout=cfg.timeout, memory_mb=cfg.memory_mb, isolation=self.resolve_isolation(),
            allow_unsafe=cfg.allow_unsafe, harness="exec",
        )  # fmt: skip
        logger.debug("%s: %s in %.2f s", label, result.status, result.wall_s)
        return pass_at_k(1, int(result.passed), 1)


class HumanEval(CodeTask, Task):
    name: ClassVar[str] = "humaneval"
    repo: ClassVar[str] = "openai/openai_humaneval"
    files: ClassVar[dict[str, str]] = {"test": "openai_humaneval/test-00000-of-00001.parquet"}
    eval_split: ClassVar[str] = "test"
    fewshot_split: ClassVar[str] = "test"  # never sampled: `build` refuses few-shot prompts
    max_gen_tokens: ClassVar[int] = 1024

    def parquet(self, data_dir: str | Path | None) -> Path | None:
        """The upstream Parquet file under data_dir, if it is there."""
        if data_dir is None:
            return None
        path = Path(data_dir) / self.repo / self.files["test"]
        return path if path.is_file() else None

    def expected_files(self, data_dir: str | Path | None) -> list[Path]:
        """The file the problems come from: the Parquet file if present, else human-eval's own."""
        path = self.parquet(data_dir)
        if path is not None:
            return [path]
        try:
            return [humaneval.problems_path()]
        except humaneval.HumanEvalError:
            return [] if data_dir is None else [Path(data_dir) / self.repo / self.files["test"]]

    def load(self, data_dir: str | Path | None, split: str) -> list[Doc]:
        """The problems, from the Parquet file under data_dir if it is there, else from human-eval."""
        self.resolve_isolation()  # refuse before the model generates anything
        path = self.parquet(data_dir)
        try:
            docs = read_rows(path) if path is not None else list(humaneval.load_problems().values())
        except humaneval.HumanEvalError as e:
            where = Path(data_dir or ".") / self.repo / self.files["test"]
            raise EvalError(
                f"{self.name}: no {where}, and the bundled problems are unavailable: {e}"
            ) from None
        if not docs:
            raise EvalError(f"{self.name}: no problems in {path}")
        for doc in docs:
            for name in HUMANEVAL_FIELDS:
                field(doc, name, self.name)
        return docs

    def build(self, doc: Doc, fewshot: Sequence[Doc]) -> list[Request]:
        if fewshot:
            raise EvalError(f"{self.name}: 0-shot only (lm-eval's humaneval.yaml has no few-shot examples)")
        return [GenerateRequest(doc["prompt"], HUMANEVAL_UNTIL, self.max_gen_tokens)]

    def program_for(self, doc: Doc, responses: Sequence[Any]) -> tuple[str, str]:
        (completion,) = responses
        return humaneval.program(doc, completion), doc["task_id"]


# lm-eval 0.4.13's mbpp/utils.py `list_fewshot_samples`: MBPP's prompt split, task_ids 2-4
MBPP_EXEMPLARS: tuple[dict[str, Any], ...] = (
    {
        "task_id": 2,
        "text": "Write a function to find the similar elements from the given two tuple lists.",
        "code": "def similar_elements(test_tup1, test_tup2):\r\n  res = tuple(set(test_tup1) & set(test_tup2))\r\n  return (res) ",
        "test_list": [
            "assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)",
            "assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)",
            "assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14)",
        ],
    },
    {
        "task_id": 3,
        "text": "Write a python function to identify non-prime numbers.",
        "code": "import math\r\ndef is_not_prime(n):\r\n    result = False\r\n    for i in range(2,int(math.sqrt(n)) + 1):\r\n        if n % i == 0:\r\n            result = True\r\n    return result",
        "test_list": [
            "assert is_not_prime(2) == False",
            "assert is_not_prime(10) == True",
            "assert is_not_prime(35) == True",
        ],
    },
    {
        "task_id": 4,
        "text": "Write a function to find the largest integers from a given list of numbers using heap queue algorithm.",
        "code": "import heapq as hq\r\ndef heap_queue_largest(nums,n):\r\n  largest_nums = hq.nlargest(n, nums)\r\n  return largest_nums",
        "test_list": [
            "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],3)==[85, 75, 65] ",
            "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],2)==[85, 75] ",
            "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],5)==[85, 75, 65, 58, 35]",
        ],
    },
)


class MBPP(CodeTask, ExemplarTask):
    name: ClassVar[str] = "mbpp"
    repo: ClassVar[str] = "google-research-datasets/mbpp"
    files: ClassVar[dict[str, str]] = {"test": "full/test-00000-of-00001.parquet"}
    eval_split: ClassVar[str] = "test"
    default_fewshot: ClassVar[int] = 3
    max_shots: ClassVar[int] = len(MBPP_EXEMPLARS)
    target_delimiter: ClassVar[str] = ""

    def load(self, data_dir: str | Path, split: str) -> list[Doc]:
        if split == self.eval_split:
            self.resolve_isolation()  # refuse before the model generates anything
        return super().load(data_dir, split)

    def exemplars(self, doc: Doc) -> list[Doc]:
        return list(MBPP_EXEMPLARS)

    def tests(self, doc: Doc) -> list[str]:
        """The three asserts the prompt shows and the program runs."""
        tests = list(field(doc, "test_list", self.name))
        if len(tests) < 3:
            raise EvalError(f"{self.name}: task {doc.get('task_id')} has {len(tests)} tests; expected 3")
        return tests[:3]

    def question(self, doc: Doc) -> str:
        asserts = "\n".join(self.tests(doc))
        return (
            f"You are an expert Python programmer, and here is your task: {field(doc, 'text', self.name)} "
            f"Your code should pass these tests:\n\n{asserts}\n[BEGIN]\n"
        )

    def build(self, doc: Doc, fewshot: Sequence[Doc]) -> list[Request]:
        prefix = "".join(
            self.question(d) + self.target_delimiter + d["code"] + "\n[DONE]" + self.fewshot_delimiter
            for d in self.shots(doc, list(fewshot))
        )
        return [GenerateRequest(prefix + self.question(doc), MBPP_UNTIL, self.max_gen_tokens)]

    def program(self, doc: Doc, completion: str) -> str:
        """What runs: the completion, then the three asserts (HF code_eval's candidate + "\\n" + test)."""
        return completion + "\n" + "\n".join(self.tests(doc))

    def program_for(self, doc: Doc, responses: Sequence[Any]) -> tuple[str, str]:
        (completion,) = responses
        return self.program(doc, completion), f"mbpp/{doc.get('task_id')}"
