"""PIQA (Bisk et al. 2020): pick the more sensible of two solutions to a physical goal.

Data: the baber/piqa repository lm-eval 0.4.13 loads (a Parquet re-upload of ybisk/piqa, whose loading
script `datasets` no longer runs), splits train / validation / test, rows {goal, sol1, sol2, label: 0 |
1}. As its piqa.yaml: prompt "Question: {goal}\\nAnswer:", continuations " {sol1}" / " {sol2}",
validation scored (the test labels are hidden), few-shot examples from train, acc and acc_norm.

Key trade-off: the repository's file names are matched by pattern ("**/<split>[-_.]*": <split>.parquet,
<split>-00000-of-00001.parquet, ... at the top or in one folder; see tasks.upstream) rather than spelled
out, because this hand-uploaded mirror's names could not be verified here.
"""

from __future__ import annotations

from typing import ClassVar

from gemmakit.eval.tasks.base import Doc, MultipleChoiceTask, field
from gemmakit.eval.tasks.upstream import UpstreamFiles


class PIQA(UpstreamFiles, MultipleChoiceTask):
    name: ClassVar[str] = "piqa"
    repo: ClassVar[str] = "baber/piqa"
    files: ClassVar[dict[str, str]] = {s: f"**/{s}[-_.]*" for s in ("train", "validation")}
    eval_split: ClassVar[str] = "validation"
    fewshot_split: ClassVar[str] = "train"
    fewshot_excludes_doc: ClassVar[bool] = True  # its YAML's test_split and fewshot_split are both null

    def question(self, doc: Doc) -> str:
        return f"Question: {field(doc, 'goal', self.name)}\nAnswer:"

    def choices(self, doc: Doc) -> list[str]:
        return [field(doc, "sol1", self.name), field(doc, "sol2", self.name)]

    def gold(self, doc: Doc) -> int:
        return int(field(doc, "label", self.name))
