"""OpenBookQA (Mihaylov et al. 2018): elementary science questions that need a fact plus common sense.

Data: the allenai/openbookqa repository lm-eval 0.4.13 loads (config main),
main/{split}-00000-of-00001.parquet, rows {id, question_stem, choices: {text: [4], label: ["A".."D"]},
answerKey}. As its openbookqa.yaml: the prompt is the bare question_stem (no "Question:"/"Answer:"),
continuations " {choice text}", gold = labels.index(answerKey.lstrip()), test split scored, few-shot
examples from train, acc and acc_norm.

Key trade-off: the bare-stem prompt (lm-eval's, for sentence-completion stems such as "The sun is
responsible for") scores the answer texts as continuations; acc_norm is the headline because the
four texts differ in length by up to ~5x.
"""

from __future__ import annotations

from typing import ClassVar

from gemmakit.eval.tasks.base import Doc, MultipleChoiceTask, answer_key_index, field


class OpenBookQA(MultipleChoiceTask):
    name: ClassVar[str] = "openbookqa"
    repo: ClassVar[str] = "allenai/openbookqa"
    files: ClassVar[dict[str, str]] = {
        s: f"main/{s}-00000-of-00001.parquet" for s in ("train", "validation", "test")
    }
    eval_split: ClassVar[str] = "test"
    fewshot_split: ClassVar[str] = "train"

    def question(self, doc: Doc) -> str:
        return field(doc, "question_stem", self.name)

    def choices(self, doc: Doc) -> list[str]:
        return list(field(doc, "choices", self.name)["text"])

    def gold(self, doc: Doc) -> int:
        return answer_key_index(doc, self.name, lstrip=True)
