"""ARC-Easy and ARC-Challenge (AI2 Reasoning Challenge): grade-school science, multiple choice.

Data: the allenai/ai2_arc repository lm-eval 0.4.13 loads (configs ARC-Easy, ARC-Challenge), one
Parquet file per split, rows {id, question, choices: {text: [...], label: [...]}, answerKey}. As in
its arc_easy.yaml: prompt "Question: {question}\\nAnswer:", the choices' texts as continuations, gold
= labels.index(answerKey) (labels are "A".."E" or "1".."5"), test split scored, few-shot examples
from train, 0-shot by default, acc and acc_norm.

Key trade-off: lm-eval's prompt, not the Mistral/Gemini one the Gemma 1 report used ("Mistral
methodology", unpublished), so numbers compare with lm-eval runs first and the report second.
"""

from __future__ import annotations

from typing import ClassVar

from gemmakit.eval.tasks.base import Doc, MultipleChoiceTask, answer_key_index, field

SPLITS = ("train", "validation", "test")


class ArcEasy(MultipleChoiceTask):
    name: ClassVar[str] = "arc_easy"
    repo: ClassVar[str] = "allenai/ai2_arc"
    files: ClassVar[dict[str, str]] = {s: f"ARC-Easy/{s}-00000-of-00001.parquet" for s in SPLITS}
    eval_split: ClassVar[str] = "test"
    fewshot_split: ClassVar[str] = "train"

    def question(self, doc: Doc) -> str:
        return f"Question: {field(doc, 'question', self.name)}\nAnswer:"

    def choices(self, doc: Doc) -> list[str]:
        return list(field(doc, "choices", self.name)["text"])

    def gold(self, doc: Doc) -> int:
        return answer_key_index(doc, self.name)


class ArcChallenge(ArcEasy):
    name: ClassVar[str] = "arc_challenge"
    files: ClassVar[dict[str, str]] = {s: f"ARC-Challenge/{s}-00000-of-00001.parquet" for s in SPLITS}
