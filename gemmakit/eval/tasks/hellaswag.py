"""HellaSwag: pick the most plausible continuation of an ActivityNet or WikiHow context.

Data: the Rowan/hellaswag repository lm-eval 0.4.13 loads, data/{split}-00000-of-00001.parquet,
rows {ind, activity_label, ctx_a, ctx_b, ctx, endings: [4 strings], source_id, split, split_type,
label: "0".."3" as a string}. Preprocessing is lm-eval's hellaswag/utils.py to the character: query =
clean(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()), choices = clean(ending), where clean
strips, turns " [title]" into ". ", deletes "[...]" (WikiHow artefacts) and collapses double spaces
once. Validation is scored (the test labels are hidden), few-shot from train, acc and acc_norm.

Key trade-off: the cleanup keeps lm-eval's quirks (one pass of the double-space collapse, "[title]"
-> ". ") instead of a cleaner normalisation, so every prompt, and the score, matches lm-eval's.
"""

from __future__ import annotations

import re
from typing import ClassVar

from gemmakit.eval.tasks.base import Doc, EvalError, MultipleChoiceTask, field

_BRACKETS = re.compile(r"\[.*?\]")


def preprocess(text: str) -> str:
    """lm-eval's hellaswag `preprocess` (one pass of "  " -> " ", as upstream)."""
    text = text.strip().replace(" [title]", ". ")
    return _BRACKETS.sub("", text).replace("  ", " ")


class HellaSwag(MultipleChoiceTask):
    name: ClassVar[str] = "hellaswag"
    repo: ClassVar[str] = "Rowan/hellaswag"
    files: ClassVar[dict[str, str]] = {
        s: f"data/{s}-00000-of-00001.parquet" for s in ("train", "validation", "test")
    }
    eval_split: ClassVar[str] = "validation"
    fewshot_split: ClassVar[str] = "train"
    fewshot_excludes_doc: ClassVar[bool] = True  # its YAML has neither test_split nor fewshot_split

    def process_docs(self, rows: list[Doc]) -> list[Doc]:
        out = []
        for row in rows:
            context = field(row, "ctx_a", self.name) + " " + field(row, "ctx_b", self.name).capitalize()
            label = str(field(row, "label", self.name))
            if not label.isdigit():
                raise EvalError(
                    f"{self.name}: label {label!r} is not a choice index (test split rows have none)"
                )
            # like datasets.map: the new fields are added to the row, which few-shot sampling compares
            out.append({
                **row,
                "query": preprocess(field(row, "activity_label", self.name) + ": " + context),
                "choices": [preprocess(e) for e in field(row, "endings", self.name)],
                "gold": int(label),
            })  # fmt: skip
        return out

    def question(self, doc: Doc) -> str:
        return doc["query"]

    def choices(self, doc: Doc) -> list[str]:
        return doc["choices"]

    def gold(self, doc: Doc) -> int:
        return doc["gold"]
