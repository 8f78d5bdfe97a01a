"""GSM8K: grade-school math word problems, answered by generation and scored by exact match.

Data: the openai/gsm8k repository lm-eval 0.4.13 loads (config main), main/{split}-00000-of-00001.parquet,
rows {question, answer}; an answer is worked steps ending "#### <number>". As its gsm8k.yaml: prompt
"Question: {question}\\nAnswer:", few-shot examples (5 by default, from train) carry the whole worked
answer, greedy generation stops at "Question:", "</s>" or "<|im_end|>"; the test split is scored.
Two extractions, as lm-eval's filters: strict takes the first "#### <number>", flexible the last
number-like run anywhere (fallback "[invalid]"); both sides then drop ",", "$", everything up to "#### "
and a final ".", and compare case-insensitively. maj@1 (the Gemma reports) is this greedy score.

Key trade-off: strict-match is the headline (it needs the few-shot "#### n" format, as the reports'
few-shot prompts teach); flexible-extract is kept beside it because small models often give the
right number without "####", and the gap between the two shows how much format costs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, ClassVar

from gemmakit.eval.lm import GenerateRequest, Request
from gemmakit.eval.metrics import exact_match_hf
from gemmakit.eval.tasks.base import Doc, Task, field

STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")  # its regexes_to_ignore, applied to both sides in order
UNTIL = ("Question:", "</s>", "<|im_end|>")
FALLBACK = "[invalid]"


def extract(text: str, pattern: re.Pattern[str], select: int) -> str:
    """lm-eval's RegexFilter: match number `select` of findall; of its groups the first non-empty."""
    matches = pattern.findall(text)
    if not matches:
        return FALLBACK
    match = matches[select]
    if isinstance(match, tuple):
        match = next((group for group in match if group), FALLBACK)
    return match.strip()


class GSM8K(Task):
    name: ClassVar[str] = "gsm8k"
    repo: ClassVar[str] = "openai/gsm8k"
    files: ClassVar[dict[str, str]] = {s: f"main/{s}-00000-of-00001.parquet" for s in ("train", "test")}
    eval_split: ClassVar[str] = "test"
    fewshot_split: ClassVar[str] = "train"
    default_fewshot: ClassVar[int] = 5
    metrics: ClassVar[dict[str, str]] = {"exact_match_strict": "mean", "exact_match_flexible": "mean"}
    primary_metric: ClassVar[str] = "exact_match_strict"

    def question(self, doc: Doc) -> str:
        return f"Question: {field(doc, 'question', self.name)}\nAnswer:"

    def build(self, doc: Doc, fewshot: Sequence[Doc]) -> list[Request]:
        prefix = "".join(
            self.question(d) + self.target_delimiter + field(d, "answer", self.name) + self.fewshot_delimiter
            for d in fewshot
        )
        return [GenerateRequest(prefix + self.question(doc), UNTIL, self.max_gen_tokens)]

    def score(self, doc: Doc, responses: Sequence[Any]) -> dict[str, float]:
        (text,) = responses
        gold = field(doc, "answer", self.name)
        strict, flexible = extract(text, STRICT, 0), extract(text, FLEXIBLE, -1)
        options = {"regexes_to_ignore": IGNORE, "ignore_case": True}
        return {
            "exact_match_strict": exact_match_hf(strict, gold, **options),
            "exact_match_flexible": exact_match_hf(flexible, gold, **options),
        }
