"""BoolQ (SuperGLUE): answer a yes/no question about a Wikipedia passage.

Data: the aps/super_glue repository lm-eval 0.4.13 loads (config boolq),
boolq/{split}-00000-of-00001.parquet, rows {question, passage, idx, label: 0 = no, 1 = yes}. As its
super_glue/boolq/default.yaml: prompt "{passage}\\nQuestion: {question}?\\nAnswer:", continuations
" no" / " yes", validation scored (test labels are -1), few-shot from train, accuracy only.

Key trade-off: lm-eval's lowercase " no"/" yes" answers rather than the "False"/"True" of T5-style
prompts; a model can prefer one spelling by several points, so only lm-eval numbers compare.
"""

from __future__ import annotations

from typing import ClassVar

from gemmakit.eval.tasks.base import Doc, MultipleChoiceTask, field


class BoolQ(MultipleChoiceTask):
    name: ClassVar[str] = "boolq"
    repo: ClassVar[str] = "aps/super_glue"
    files: ClassVar[dict[str, str]] = {
        s: f"boolq/{s}-00000-of-00001.parquet" for s in ("train", "validation", "test")
    }
    eval_split: ClassVar[str] = "validation"
    fewshot_split: ClassVar[str] = "train"
    fewshot_excludes_doc: ClassVar[bool] = True  # its YAML has neither test_split nor fewshot_split
    metrics: ClassVar[dict[str, str]] = {"acc": "mean"}
    primary_metric: ClassVar[str] = "acc"

    def question(self, doc: Doc) -> str:
        passage, question = field(doc, "passage", self.name), field(doc, "question", self.name)
        return f"{passage}\nQuestion: {question}?\nAnswer:"

    def choices(self, doc: Doc) -> list[str]:
        return ["no", "yes"]

    def gold(self, doc: Doc) -> int:
        return int(field(doc, "label", self.name))
