"""TriviaQA and Natural Questions (open): closed-book question answering, generated and exact-matched.

Data, as lm-eval 0.4.13 loads them (validation scored, few-shot examples from train, 0-shot by default):
- triviaqa: mandarjoshi/trivia_qa config rc.nocontext, rc.nocontext/{split}-00000-of-00001.parquet,
  rows {question, question_id, answer: {aliases: [...], value, ...}, ...}. Prompt "Question:
  {question}?\\nAnswer:" (a "?" is added even after the question's own), examples joined by "\\n\\n".
- nq_open: google-research-datasets/nq_open, nq_open/{split}-00000-of-00001.parquet, rows {question,
  answer: [...]}. The prompt opens with "Answer these questions:\\n\\n", then "Q: {question}?\\nA:",
  examples joined by "\\n".
A few-shot example's answer is the first reference. Greedy generation stops at "\\n", "." or ","; the
output is stripped and scores 1 when it equals any reference after lowercasing and deleting ASCII
punctuation (NQ also deletes the articles "the ", "a ", "an " first, lm-eval's regex), as lm-eval's
`exact_match` with its multiple-target rule ("any reference matches").

Key trade-off: exact match, not the SQuAD F1 some papers give for NQ: it is the metric the Gemma
reports and lm-eval print, and a stop at the first "," or "." means a correct answer that needs one
("Washington, D.C.") can never match; we keep that, as the published numbers did.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from gemmakit.eval.lm import GenerateRequest, Request
from gemmakit.eval.metrics import exact_match_hf
from gemmakit.eval.tasks.base import Doc, EvalError, Task, field

UNTIL = ("\n", ".", ",")


class TriviaQA(Task):
    name: ClassVar[str] = "triviaqa"
    repo: ClassVar[str] = "mandarjoshi/trivia_qa"
    files: ClassVar[dict[str, str]] = {
        s: f"rc.nocontext/{s}-00000-of-00001.parquet" for s in ("train", "validation")
    }
    eval_split: ClassVar[str] = "validation"
    fewshot_split: ClassVar[str] = "train"
    fewshot_excludes_doc: ClassVar[bool] = True  # its YAML has neither test_split nor fewshot_split
    metrics: ClassVar[dict[str, str]] = {"exact_match": "mean"}
    primary_metric: ClassVar[str] = "exact_match"
    description: ClassVar[str] = ""  # text before the few-shot examples (lm-eval's `description`)
    regexes_to_ignore: ClassVar[tuple[str, ...]] = ()  # deleted from prediction and reference first

    def question(self, doc: Doc) -> str:
        return f"Question: {field(doc, 'question', self.name)}?\nAnswer:"

    def references(self, doc: Doc) -> list[str]:
        """The accepted answers, in the dataset's order (the first is a few-shot example's answer)."""
        return list(field(doc, "answer", self.name)["aliases"])

    def build(self, doc: Doc, fewshot: Sequence[Doc]) -> list[Request]:
        examples = ""
        for example in fewshot:
            references = self.references(example)
            if not references:
                raise EvalError(
                    f"{self.name}: a few-shot example has no reference answer: {str(example)[:120]}"
                )
            examples += (
                self.question(example) + self.target_delimiter + references[0] + self.fewshot_delimiter
            )
        prompt = self.description + examples + self.question(doc)
        return [GenerateRequest(prompt, UNTIL, self.max_gen_tokens)]

    def score(self, doc: Doc, responses: Sequence[Any]) -> dict[str, float]:
        (text,) = responses
        prediction = text.strip()  # lm-eval's remove_whitespace filter
        options = {
            "regexes_to_ignore": self.regexes_to_ignore,
            "ignore_case": True,
            "ignore_punctuation": True,
        }
        hits = [exact_match_hf(prediction, ref, **options) for ref in self.references(doc)]
        return {"exact_match": max(hits, default=0.0)}


class NQOpen(TriviaQA):
    name: ClassVar[str] = "nq_open"
    repo: ClassVar[str] = "google-research-datasets/nq_open"
    files: ClassVar[dict[str, str]] = {
        s: f"nq_open/{s}-00000-of-00001.parquet" for s in ("train", "validation")
    }
    description: ClassVar[str] = "Answer these questions:\n\n"
    fewshot_delimiter: ClassVar[str] = "\n"
    regexes_to_ignore: ClassVar[tuple[str, ...]] = (r"\b(?:The |the |An |A |The |a |an )",)

    def question(self, doc: Doc) -> str:
        return f"Q: {field(doc, 'question', self.name)}?\nA:"

    def references(self, doc: Doc) -> list[str]:
        answer = field(doc, "answer", self.name)
        return [answer] if isinstance(answer, str) else list(answer)
