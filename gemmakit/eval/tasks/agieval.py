"""AGIEval, English subsets (Zhong et al. 2023): admission and qualification exam questions.

Data: lm-eval 0.4.13's `agieval_en` group, one hails/agieval-<subset> repository per subset (test split
only), rows {query, choices: ["(A)...", ...], gold: [indices]}; the math subset's rows {query, answer}.
As its agieval YAMLs: the prompt is the row's `query` (which already holds the "Q: ... Answer Choices:
... A: Among A through E, the answer is" scaffolding); a multiple-choice document scores " {choice}"
continuations and is right when the best one is any gold index (`process_results_mcqa`); the math
subset generates greedily until "Q:" (32 tokens at most) and compares with AGIEval's own answer parser
and Hendrycks-style equivalence (`utils.process_results`). 0-shot by default.

Group semantics (its `agieval_en`: acc, weight_by_size): the score is the accuracy over all documents
of the 10 subsets, not the mean of subset scores; acc_norm exists only per multiple-choice subset.
A `limit` keeps the first documents of the group (aqua-rat first), not the first of every subset.

Few-shot (the Gemma 2/3 cards' "3-5-shot"): lm-eval cannot do it (no training split, and its few-shot
rendering rejects a list-valued gold), so this is ours: the first n documents of the same subset, the
evaluated one excluded, each followed by " " + its first gold choice (math: its answer) and "\\n\\n".
Like MMLU's, `build` uses only the count of the examples `run_task` samples.

Key trade-off: bit-compatibility with AGIEval's parser, quirks included (a gold "\\frac{1}{2}" parses to
"2", the last number; a candidate with "=" keeps what follows the last "="), because the published
numbers were scored with it; the equivalence reuses `metrics.math_strip` with AGIEval's one deviation
(its a/b rule never raises) rebuilt around it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from gemmakit.eval.lm import GenerateRequest, LoglikelihoodRequest, Request
from gemmakit.eval.metrics import choice_accuracy, last_boxed, math_strip
from gemmakit.eval.tasks.base import Doc, EvalError, Task, field
from gemmakit.eval.tasks.upstream import EXAMPLES_KEY, SUBSET_KEY, UpstreamFiles, public, with_examples

# agieval_en's members, in its YAML's order ("gaokao-english" is English: AGIEval's english_qa_tasks)
SUBSETS = (
    "aqua-rat", "gaokao-english", "logiqa-en", "lsat-ar", "lsat-lr", "lsat-rc", "math",
    "sat-en-without-passage", "sat-en", "sat-math",
)  # fmt: skip
MATH = "math"  # the one generative subset
MATH_UNTIL = ("Q:",)
MATH_MAX_TOKENS = 32  # its math.yaml's max_gen_toks

# ---- AGIEval's math answer parser and equivalence (lm-eval agieval/utils.py) -----------------------

_DOLLARS = re.compile(r"\$(.*)\$")
_NUMBER = re.compile(r"(?:\$)?\d+(?:\.\d+)?(?![\w\d])")
_MARK = "\x00"  # stands in for a character while a shared helper must not see it


def _last_boxed(text: str) -> str | None:
    """AGIEval's last_boxed_only_string: metrics.last_boxed without its brace-less "\\boxed x" branch."""
    found = last_boxed(text.replace("\\boxed ", "\\boxed" + _MARK))
    return None if found is None else found.replace("\\boxed" + _MARK, "\\boxed ")


def parse_math_answer(text: str) -> str | None:
    """AGIEval's parse_math_answer: last \\boxed{}, else last $...$, else what follows "=", else a number."""
    if "\\boxed" in text:
        boxed = _last_boxed(text)
        if boxed is None or not (boxed.startswith("\\boxed{") and boxed.endswith("}")):
            return None
        answer = boxed[len("\\boxed{") : -1]
        return answer.split("=")[-1].lstrip(" ") if "=" in answer else answer
    dollars = _DOLLARS.findall(text)
    answer = dollars[-1] if dollars else None
    if answer and "=" in answer:
        answer = answer.split("=")[-1].lstrip(" ")
    if answer:  # upstream falls through on None and on ""
        return answer
    if "=" in text:
        answer = text.split("=")[-1].lstrip(" ").rstrip(".")
        return answer.split("\\n")[0]  # a literal backslash-n, as upstream
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _strip(answer: str) -> str:
    """AGIEval's _strip_string: math_strip, except that a non-integer "a/b" stays as it is."""
    out = math_strip(answer.replace("/", _MARK)).replace(_MARK, "/")
    parts = out.split("/")
    if len(parts) != 2:
        return out
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        return out
    return f"\\frac{{{a}}}{{{b}}}" if out == f"{a}/{b}" else out


def agieval_equiv(candidate: str, gold: str) -> bool:
    """AGIEval's is_equiv: both parsed, then normalised strings equal (parsed strings if that fails)."""
    a, b = parse_math_answer(candidate), parse_math_answer(gold)
    if a is None or b is None:
        return a is None and b is None
    try:
        return _strip(a) == _strip(b)
    except Exception:  # noqa: BLE001 (upstream catches everything here and compares the raw answers)
        return a == b


# ---- the task ---------------------------------------------------------------------------------------


class AGIEval(UpstreamFiles, Task):
    name: ClassVar[str] = "agieval"
    repo: ClassVar[str] = "hails/agieval-{subset}"
    files: ClassVar[dict[str, str]] = {"test": "**/test[-_.]*"}
    subsets: ClassVar[tuple[str, ...]] = SUBSETS
    eval_split: ClassVar[str] = "test"
    fewshot_split: ClassVar[str] = "test"
    metrics: ClassVar[dict[str, str]] = {"acc": "mean"}
    primary_metric: ClassVar[str] = "acc"

    def load(self, data_dir: str | Path, split: str) -> list[Doc]:
        """The group's documents, each carrying its subset's documents (its few-shot pool)."""
        docs = super().load(data_dir, split)
        pools: dict[str, list[Doc]] = {}
        for doc in docs:
            pools.setdefault(doc[SUBSET_KEY], []).append(doc)
        return with_examples(docs, pools)

    def gold(self, doc: Doc) -> list[int]:
        gold, n = list(field(doc, "gold", self.name)), len(field(doc, "choices", self.name))
        if not gold or not all(0 <= g < n for g in gold):
            raise EvalError(f"{self.name}: gold {gold} is not a non-empty list of indices below {n}")
        return gold

    def answer_text(self, doc: Doc) -> str:
        """What follows a few-shot example's query: its answer, or its first gold choice."""
        if doc[SUBSET_KEY] == MATH:
            return field(doc, "answer", self.name)
        return field(doc, "choices", self.name)[self.gold(doc)[0]]

    def build(self, doc: Doc, fewshot: Sequence[Doc]) -> list[Request]:
        row = public(doc)
        pool = [e for e in field(doc, EXAMPLES_KEY, self.name).docs if public(e) != row]
        if len(fewshot) > len(pool):
            raise EvalError(
                f"{self.name}: {len(fewshot)}-shot prompts need more than {len(pool) + 1} documents"
            )
        context = "".join(
            e["query"] + self.target_delimiter + self.answer_text(e) + self.fewshot_delimiter
            for e in pool[: len(fewshot)]
        ) + field(doc, "query", self.name)  # fmt: skip
        if doc[SUBSET_KEY] == MATH:
            return [GenerateRequest(context, MATH_UNTIL, MATH_MAX_TOKENS)]
        choices = field(doc, "choices", self.name)
        return [LoglikelihoodRequest(context, self.target_delimiter + c) for c in choices]

    def score(self, doc: Doc, responses: Sequence[Any]) -> dict[str, float]:
        if doc[SUBSET_KEY] == MATH:
            (text,) = responses
            return {"acc": float(agieval_equiv(text, str(field(doc, "answer", self.name))))}
        return {"acc": choice_accuracy([float(ll) for ll, _ in responses], self.gold(doc))}
