"""MATH (Hendrycks et al. 2021) with Minerva's 4-shot prompt and answer check, as lm-eval's minerva_math.

Data: the EleutherAI/hendrycks_math repository lm-eval 0.4.13 loads, one folder per subject
(algebra, counting_and_probability, geometry, intermediate_algebra, number_theory, prealgebra,
precalculus), <subject>/test-00000-of-00001.parquet (any <subject>/test-* shards), rows {problem, level, type, solution}; the
gold answer is the last \\boxed{...} of the solution. All 7 subjects are lm-eval's `minerva_math`
group: 5,000 test problems, scored as one mean over problems (its weight_by_size aggregate).

As its minerva_math_<subject>.yaml: prompt "Problem:\\n{problem}\\n\\nSolution:", the 4 fixed
exemplars of Lewkowycz et al. 2022 (first_n sampler; each a full solution ending "Final Answer:
The final answer is X. I hope it is correct."), target delimiter " ", greedy generation stopped
at "Problem:", 256 tokens. exact_match: the X after "Final Answer: The final answer is" in the
response and the boxed gold answer, both through Minerva's normaliser (`metrics.minerva_normalize`),
are equal, or sympy proves them equal (`metrics.minerva_equiv`: needs sympy and
antlr4-python3-runtime 4.11, as lm-eval's [math] extra; without them only equal strings count).

Key trade-off: only lm-eval's `exact_match` is reproduced, not its second metric `math_verify`
(which needs the math-verify package and parses the whole response): exact_match is the
Minerva-protocol number the Gemma reports' "MATH 4-shot" follows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, ClassVar

from gemmakit.eval.lm import GenerateRequest, Request
from gemmakit.eval.metrics import (
    MetricError,
    last_boxed,
    minerva_answer,
    minerva_equiv,
    minerva_normalize,
    remove_boxed,
)
from gemmakit.eval.tasks.base import Doc, EvalError, field
from gemmakit.eval.tasks.exemplars import ExemplarTask

SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
            "prealgebra", "precalculus")  # fmt: skip
UNTIL = ("Problem:",)

# Minerva's exemplars, as lm-eval 0.4.13's minerva_math/utils.py `list_fewshot_samples`
EXEMPLARS: tuple[dict[str, str], ...] = (
    {
        "problem": "Find the domain of the expression  $\\frac{\\sqrt{x-2}}{\\sqrt{5-x}}$.",
        "solution": "The expressions inside each square root must be non-negative. Therefore, $x-2 \\ge 0$, so $x\\ge2$, and $5 - x \\ge 0$, so $x \\le 5$. Also, the denominator cannot be equal to zero, so $5-x>0$, which gives $x<5$. Therefore, the domain of the expression is $\\boxed{[2,5)}$.\nFinal Answer: The final answer is $[2,5)$. I hope it is correct.",
    },
    {
        "problem": "If $\\det \\mathbf{A} = 2$ and $\\det \\mathbf{B} = 12,$ then find $\\det (\\mathbf{A} \\mathbf{B}).$",
        "solution": "We have that $\\det (\\mathbf{A} \\mathbf{B}) = (\\det \\mathbf{A})(\\det \\mathbf{B}) = (2)(12) = \\boxed{24}.$\nFinal Answer: The final answer is $24$. I hope it is correct.",
    },
    {
        "problem": "Terrell usually lifts two 20-pound weights 12 times. If he uses two 15-pound weights instead, how many times must Terrell lift them in order to lift the same total weight?",
        "solution": "If Terrell lifts two 20-pound weights 12 times, he lifts a total of $2\\cdot 12\\cdot20=480$ pounds of weight.  If he lifts two 15-pound weights instead for $n$ times, he will lift a total of $2\\cdot15\\cdot n=30n$ pounds of weight.  Equating this to 480 pounds, we can solve for $n$:\n\\begin{align*}\n30n&=480\\\\\n\\Rightarrow\\qquad n&=480/30=\\boxed{16}\n\\end{align*}\nFinal Answer: The final answer is $16$. I hope it is correct.",
    },
    {
        "problem": "If the system of equations\n\n\\begin{align*}\n6x-4y&=a,\\\\\n6y-9x &=b.\n\\end{align*}has a solution $(x, y)$ where $x$ and $y$ are both nonzero,\nfind $\\frac{a}{b},$ assuming $b$ is nonzero.",
        "solution": "If we multiply the first equation by $-\\frac{3}{2}$, we obtain\n\n$$6y-9x=-\\frac{3}{2}a.$$Since we also know that $6y-9x=b$, we have\n\n$$-\\frac{3}{2}a=b\\Rightarrow\\frac{a}{b}=\\boxed{-\\frac{2}{3}}.$$\nFinal Answer: The final answer is $-\\frac{2}{3}$. I hope it is correct.",
    },
)


def boxed_answer(solution: str, task: str) -> str:
    """The normalised content of the solution's last \\boxed{...}, as lm-eval's process_docs."""
    boxed = last_boxed(solution)
    if boxed is not None:
        with contextlib.suppress(MetricError):  # "\\boxed{x" without its closing brace, ...
            return minerva_normalize(remove_boxed(boxed))
    raise EvalError(f"{task}: solution has no \\boxed{{...}} answer: ...{solution[-80:]!r}")


class MinervaMath(ExemplarTask):
    name: ClassVar[str] = "math"
    repo: ClassVar[str] = "EleutherAI/hendrycks_math"
    files: ClassVar[dict[str, str]] = {"test": "{subset}/test-*"}  # the repo card's data_files pattern
    subsets: ClassVar[tuple[str, ...]] = SUBJECTS
    eval_split: ClassVar[str] = "test"
    default_fewshot: ClassVar[int] = 4
    max_shots: ClassVar[int] = len(EXEMPLARS)
    metrics: ClassVar[dict[str, str]] = {"exact_match": "mean"}
    primary_metric: ClassVar[str] = "exact_match"

    def process_docs(self, rows: list[Doc]) -> list[Doc]:
        return [{**row, "answer": boxed_answer(field(row, "solution", self.name), self.name)} for row in rows]

    def exemplars(self, doc: Doc) -> list[Doc]:
        return list(EXEMPLARS)

    def question(self, doc: Doc) -> str:
        return "Problem:\n" + field(doc, "problem", self.name) + "\n\nSolution:"

    def build(self, doc: Doc, fewshot: Sequence[Doc]) -> list[Request]:
        prefix = "".join(
            self.question(d) + self.target_delimiter + d["solution"] + self.fewshot_delimiter
            for d in self.shots(doc, list(fewshot))
        )
        return [GenerateRequest(prefix + self.question(doc), UNTIL, self.max_gen_tokens)]

    def score(self, doc: Doc, responses: Sequence[Any]) -> dict[str, float]:
        (text,) = responses
        answer = minerva_normalize(minerva_answer(text))
        return {"exact_match": float(minerva_equiv(answer, doc["answer"]))}
