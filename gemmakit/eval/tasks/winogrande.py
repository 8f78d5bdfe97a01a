"""WinoGrande with partial scoring: which option, put in the blank, makes the rest of the sentence likely.

Data: the allenai/winogrande repository lm-eval 0.4.13 loads (config winogrande_xl),
winogrande_xl/{split}-00000-of-00001.parquet, rows {sentence (one "_"), option1, option2, answer:
"1" | "2"}. Validation is scored, few-shot examples from train (an example is the gold-filled
context + " " + continuation), accuracy only.

Key trade-off, partial scoring (Trinh & Le 2018; the Gemma 1/2 protocol and lm-eval's): each option
gives a different CONTEXT, sentence[:blank] + option, and the shared continuation " " +
sentence[blank + 1:].strip() is scored; only the continuation's tokens count, so the options' own
likelihoods (frequent vs rare names) do not decide, at the price of one forward per option.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from gemmakit.eval.lm import LoglikelihoodRequest, Request
from gemmakit.eval.metrics import choice_accuracy
from gemmakit.eval.tasks.base import Doc, EvalError, Task, field

ANSWER_INDEX = {"1": 0, "2": 1}


class WinoGrande(Task):
    name: ClassVar[str] = "winogrande"
    repo: ClassVar[str] = "allenai/winogrande"
    files: ClassVar[dict[str, str]] = {
        s: f"winogrande_xl/{s}-00000-of-00001.parquet" for s in ("train", "validation", "test")
    }
    eval_split: ClassVar[str] = "validation"
    fewshot_split: ClassVar[str] = "train"
    fewshot_excludes_doc: ClassVar[bool] = True  # its YAML has neither test_split nor fewshot_split
    metrics: ClassVar[dict[str, str]] = {"acc": "mean"}
    primary_metric: ClassVar[str] = "acc"

    def split(self, doc: Doc) -> tuple[list[str], str, int]:
        """(the two contexts, the shared continuation without its delimiter, the gold index)."""
        sentence = field(doc, "sentence", self.name)
        if "_" not in sentence:
            raise EvalError(f"{self.name}: sentence has no blank '_': {sentence[:80]!r}")
        blank = sentence.index("_")
        answer = field(doc, "answer", self.name)
        if answer not in ANSWER_INDEX:
            raise EvalError(f"{self.name}: answer {answer!r} is not '1' or '2' (test split rows have none)")
        options = [field(doc, "option1", self.name), field(doc, "option2", self.name)]
        contexts = [sentence[:blank] + option for option in options]
        return contexts, sentence[blank + 1 :].strip(), ANSWER_INDEX[answer]

    def build(self, doc: Doc, fewshot: Sequence[Doc]) -> list[Request]:
        prefix = ""
        for example in fewshot:
            contexts, target, gold = self.split(example)
            prefix += contexts[gold] + self.target_delimiter + target + self.fewshot_delimiter
        contexts, target, _ = self.split(doc)
        return [LoglikelihoodRequest(prefix + c, self.target_delimiter + target) for c in contexts]

    def score(self, doc: Doc, responses: Sequence[Any]) -> dict[str, float]:
        _, _, gold = self.split(doc)
        return {"acc": choice_accuracy([float(ll) for ll, _ in responses], gold)}
