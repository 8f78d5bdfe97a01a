"""Social IQa (Sap et al. 2019): reason about people's motives, reactions and what happens next.

Data: the lighteval/siqa repository lm-eval 0.4.13 loads (task `social_iqa`; a Parquet mirror of
allenai/social_i_qa, whose loading script `datasets` no longer runs), splits train / validation,
rows {context, question, answerA, answerB, answerC, label: "1" | "2" | "3"}. As its siqa.yaml: prompt
"Q: {context} {question}\\nA:", continuations " {answerA}" .. " {answerC}", gold = label - 1,
validation scored, few-shot examples from train, accuracy only.

Key trade-off: as for PIQA, file names are matched by pattern (see tasks.upstream), since the
mirror's exact shard names were not verifiable here; lm-eval's task name is `social_iqa`, ours is
the report's "siqa".
"""

from __future__ import annotations

from typing import ClassVar

from gemmakit.eval.tasks.base import Doc, EvalError, MultipleChoiceTask, field
from gemmakit.eval.tasks.upstream import UpstreamFiles


class SIQA(UpstreamFiles, MultipleChoiceTask):
    name: ClassVar[str] = "siqa"
    repo: ClassVar[str] = "lighteval/siqa"
    files: ClassVar[dict[str, str]] = {s: f"**/{s}[-_.]*" for s in ("train", "validation")}
    eval_split: ClassVar[str] = "validation"
    fewshot_split: ClassVar[str] = "train"
    fewshot_excludes_doc: ClassVar[bool] = True  # its YAML has neither test_split nor fewshot_split
    metrics: ClassVar[dict[str, str]] = {"acc": "mean"}
    primary_metric: ClassVar[str] = "acc"

    def question(self, doc: Doc) -> str:
        return f"Q: {field(doc, 'context', self.name)} {field(doc, 'question', self.name)}\nA:"

    def choices(self, doc: Doc) -> list[str]:
        return [field(doc, f"answer{k}", self.name) for k in "ABC"]

    def gold(self, doc: Doc) -> int:
        label = str(field(doc, "label", self.name)).strip()
        if not label.isdigit():
            raise EvalError(f"{self.name}: label {label!r} is not '1', '2' or '3'")
        return int(label) - 1
