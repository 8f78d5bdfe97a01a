"""CommonsenseQA (Talmor et al. 2019): five-way questions about everyday concepts, answered by letter.

Data: the tau/commonsense_qa repository lm-eval 0.4.13 loads, data/{split}-00000-of-00001.parquet,
rows {id, question, question_concept, choices: {label: ["A".."E"], text: [5 strings]}, answerKey}.
As its commonsense_qa/default.yaml: prompt "Question: {question.strip()}" then one line per option
("\\nA. {t0}" .. "\\nE. {t4}") then "\\nAnswer:", continuations " A" .. " E", gold = the answerKey
letter, validation scored (the test answers are hidden), few-shot examples from train (a few-shot
answer is its letter), accuracy only.

Key trade-off: lm-eval's lettered format rather than scoring the answer texts themselves (the
Mistral-style evaluation the Gemma 1 report replicated is unpublished); letters make the five
continuations the same length, so acc_norm would add nothing and is not reported.
"""

from __future__ import annotations

from typing import ClassVar

from gemmakit.eval.tasks.base import Doc, EvalError, MultipleChoiceTask, field, lettered_question

LETTERS = ("A", "B", "C", "D", "E")


class CommonsenseQA(MultipleChoiceTask):
    name: ClassVar[str] = "commonsense_qa"
    repo: ClassVar[str] = "tau/commonsense_qa"
    files: ClassVar[dict[str, str]] = {s: f"data/{s}-00000-of-00001.parquet" for s in ("train", "validation")}
    eval_split: ClassVar[str] = "validation"
    fewshot_split: ClassVar[str] = "train"
    fewshot_excludes_doc: ClassVar[bool] = True  # its YAML has neither test_split nor fewshot_split
    metrics: ClassVar[dict[str, str]] = {"acc": "mean"}
    primary_metric: ClassVar[str] = "acc"

    def question(self, doc: Doc) -> str:
        texts = list(field(doc, "choices", self.name)["text"])
        question = f"Question: {field(doc, 'question', self.name).strip()}"
        return lettered_question(doc, self.name, question, texts, LETTERS)

    def choices(self, doc: Doc) -> list[str]:
        return list(LETTERS)

    def gold(self, doc: Doc) -> int:
        key = field(doc, "answerKey", self.name)
        if key not in LETTERS:
            raise EvalError(f"{self.name}: answerKey {key!r} is not one of A-E ({doc.get('id')})")
        return LETTERS.index(key)
