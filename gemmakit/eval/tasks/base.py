"""What a benchmark is: where its published files are, how a document becomes LM requests, how answers score.

Where it sits: a `Task` reads documents from a local copy of the dataset's Hugging Face repository
(`data_dir/<owner>/<name>/...`, the exact files lm-evaluation-harness 0.4.13's YAML loads), turns each
into `eval.lm` requests, and scores the answers; `tasks.run.run_task` drives it with an `LM` and a
protocol (`tasks.protocols`). Tasks never touch tokens or models.

Prompt building copies lm-eval's plain-text (no chat template) rendering: a few-shot example is
question + target_delimiter (" ") + answer + fewshot_delimiter ("\\n\\n"); the evaluated question follows
with no delimiter; multiple-choice continuations are target_delimiter + choice.

Key trade-off: every file is read whole into a list of dicts (pyarrow's `to_pylist`), which is
what lm-eval's `datasets` rows look like and keeps document equality (used by few-shot sampling)
identical; the largest split used here (WinoGrande XL train, 40k rows) takes ~30 MB and ~0.2 s.
"""

from __future__ import annotations

import abc
import gzip
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from gemmakit.errors import UserError
from gemmakit.eval.lm import LoglikelihoodRequest, Request
from gemmakit.eval.metrics import choice_accuracy, choice_accuracy_norm

Doc = dict[str, Any]

PARQUET_MAGIC = b"PAR1"
GZIP_MAGIC = b"\x1f\x8b"


class EvalError(UserError):
    """Bad evaluation input (unknown task or protocol, missing or malformed data); one line."""


# ---- reading the published files ---------------------------------------------------------------


def read_rows(path: Path) -> list[Doc]:
    """Rows of a Parquet, JSONL or gzipped JSONL file, recognised by its first bytes, never its name."""
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError as e:
        raise EvalError(f"{path}: cannot read ({e.strerror})") from None
    if head == PARQUET_MAGIC:
        return _read_parquet(path)
    if head[:2] == GZIP_MAGIC:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return _read_jsonl(f, path)
    if head[:1] in (b"{", b"[", b" ", b"\n", b"\r", b"\t") or head == b"":
        with path.open(encoding="utf-8") as f:
            return _read_jsonl(f, path)
    raise EvalError(f"{path}: not Parquet (PAR1) or JSON lines; first bytes {head!r}")


def _read_parquet(path: Path) -> list[Doc]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise EvalError(f"{path}: reading Parquet needs pyarrow (pip install 'gemmakit[eval]')") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... with multi-line messages
        raise EvalError(f"{path}: unreadable Parquet ({' '.join(str(e).split())[:200]})") from None


def _read_jsonl(lines: Any, path: Path) -> list[Doc]:
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise EvalError(f"{path}:{number}: not a JSON object ({e.msg})") from None
        if not isinstance(row, dict):
            raise EvalError(f"{path}:{number}: expected a JSON object per line, got {type(row).__name__}")
        rows.append(row)
    return rows


def field(doc: Doc, name: str, task: str) -> Any:
    """doc[name], or an EvalError naming the task and the missing column."""
    try:
        return doc[name]
    except KeyError:
        raise EvalError(f"{task}: document has no field {name!r} (fields: {sorted(doc)})") from None


def answer_key_index(doc: Doc, task: str, lstrip: bool = False) -> int:
    """Index of doc["answerKey"] (left-stripped first if `lstrip`, as OpenBookQA's YAML does) among
    doc["choices"]["label"]: the ARC / OpenBookQA layout, labels "A".."E" or "1".."5" beside the texts."""
    labels, key = list(field(doc, "choices", task)["label"]), field(doc, "answerKey", task)
    key = key.lstrip() if lstrip else key
    if key not in labels:
        raise EvalError(f"{task}: answerKey {key!r} is not among the labels {labels} ({doc.get('id')})")
    return labels.index(key)


def lettered_question(
    doc: Doc, task: str, question: str, options: Sequence[str], letters: Sequence[str]
) -> str:
    """lm-eval's lettered prompt (MMLU, CommonsenseQA): the question, one "\\n<letter>. <option>" line
    per option, then "\\nAnswer:"; an EvalError unless there is exactly one option per letter."""
    if len(options) != len(letters):
        raise EvalError(f"{task}: expected {len(letters)} choices, got {len(options)} in {str(doc)[:120]}")
    lines = "".join(f"\n{letter}. {text}" for letter, text in zip(letters, options, strict=True))
    return f"{question}{lines}\nAnswer:"


# ---- the task interface ------------------------------------------------------------------------


class Task(abc.ABC):
    """One benchmark. Subclasses set the class attributes and implement `build` and `score`."""

    name: ClassVar[str]  # registry name, as lm-eval's task name ("arc_easy")
    # the HF dataset repo lm-eval reads ("allenai/ai2_arc"); its files live under data_dir/repo
    repo: ClassVar[str]
    # split -> file inside the repo ("test": "ARC-Easy/test-00000-of-00001.parquet")
    files: ClassVar[dict[str, str]]
    eval_split: ClassVar[str]  # the split that is scored (lm-eval: test if the YAML has one, else validation)
    fewshot_split: ClassVar[str]  # where few-shot examples come from (lm-eval: fewshot_split, else train)
    default_fewshot: ClassVar[int] = 0  # lm-eval's num_fewshot for this task (the "lm-eval" protocol)
    metrics: ClassVar[dict[str, str]]  # metric -> aggregation ("mean"); what `score` returns
    primary_metric: ClassVar[str]  # the number a report shows unless the protocol says otherwise
    # lm-eval passes the evaluated doc to its sampler (which then draws n + 1 and drops it) whenever the
    # few-shot split equals the YAML's test_split, which is also the case when both are unset (None):
    # that changes which examples a seed draws, so it is mirrored per task.
    fewshot_excludes_doc: ClassVar[bool] = False
    max_gen_tokens: ClassVar[int] = 256  # generative tasks: lm-eval's default max_gen_toks
    fewshot_delimiter: ClassVar[str] = "\n\n"
    target_delimiter: ClassVar[str] = " "

    def expected_files(self, data_dir: str | Path) -> list[Path]:
        """Every file this task may read (evaluation and few-shot splits), in split order."""
        splits = dict.fromkeys((self.eval_split, self.fewshot_split))  # ordered, without duplicates
        return [Path(data_dir) / self.repo / self.files[s] for s in splits]

    def load(self, data_dir: str | Path, split: str) -> list[Doc]:
        """Documents of one split, processed as lm-eval's `process_docs` does."""
        path = Path(data_dir) / self.repo / self.files[split]
        if not path.is_file():
            missing = [str(p) for p in self.expected_files(data_dir) if not p.is_file()]
            raise EvalError(
                f"{self.name}: missing data file(s) {', '.join(missing)}; download the {self.repo} dataset "
                f"repository into {Path(data_dir) / self.repo} (expected: "
                f"{', '.join(str(p) for p in self.expected_files(data_dir))})"
            )
        docs = self.process_docs(read_rows(path))
        if not docs:
            raise EvalError(f"{path}: no documents")
        return docs

    def process_docs(self, rows: list[Doc]) -> list[Doc]:
        """Hook for per-task preprocessing (HellaSwag); identity by default."""
        return rows

    @abc.abstractmethod
    def build(self, doc: Doc, fewshot: Sequence[Doc]) -> list[Request]:
        """The LM requests for one document, its prompt preceded by the few-shot examples."""

    @abc.abstractmethod
    def score(self, doc: Doc, responses: Sequence[Any]) -> dict[str, float]:
        """Metric values for one document from the LM's answers to `build(doc, ...)`, in order."""

    def score_all(self, docs: Sequence[Doc], answers: Sequence[Sequence[Any]]) -> list[dict[str, float]]:
        """`score` for every document; tasks whose scoring is slow per document (running programs)
        override it to work on many documents at once."""
        return [self.score(doc, ans) for doc, ans in zip(docs, answers, strict=True)]


class MultipleChoiceTask(Task):
    """Score each choice as a continuation of the question; the highest log-likelihood is the answer.

    acc uses the raw log-likelihood; acc_norm divides it by the choice's length in characters
    (lm-eval's "acc_norm", not per token), which stops long choices from losing just for being long.
    """

    metrics: ClassVar[dict[str, str]] = {"acc": "mean", "acc_norm": "mean"}
    primary_metric: ClassVar[str] = "acc_norm"

    @abc.abstractmethod
    def question(self, doc: Doc) -> str:
        """The prompt text of a document, without any answer."""

    @abc.abstractmethod
    def choices(self, doc: Doc) -> list[str]:
        """The answer options (without the target delimiter)."""

    @abc.abstractmethod
    def gold(self, doc: Doc) -> int:
        """Index of the right option."""

    def checked_gold(self, doc: Doc) -> int:
        gold, n = self.gold(doc), len(self.choices(doc))
        if not 0 <= gold < n:
            raise EvalError(
                f"{self.name}: gold answer index {gold} outside the {n} choices of {str(doc)[:120]}"
            )
        return gold

    def fewshot_text(self, fewshot: Sequence[Doc]) -> str:
        return "".join(
            self.question(d)
            + self.target_delimiter
            + self.choices(d)[self.checked_gold(d)]
            + self.fewshot_delimiter
            for d in fewshot
        )

    def build(self, doc: Doc, fewshot: Sequence[Doc]) -> list[Request]:
        context = self.fewshot_text(fewshot) + self.question(doc)
        return [LoglikelihoodRequest(context, self.target_delimiter + c) for c in self.choices(doc)]

    def score(self, doc: Doc, responses: Sequence[Any]) -> dict[str, float]:
        lls = [float(ll) for ll, _ in responses]
        choices, gold = self.choices(doc), self.checked_gold(doc)
        out = {"acc": choice_accuracy(lls, gold), "acc_norm": choice_accuracy_norm(lls, choices, gold)}
        return {k: v for k, v in out.items() if k in self.metrics}
