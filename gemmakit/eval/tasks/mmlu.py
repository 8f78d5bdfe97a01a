"""MMLU (Hendrycks et al. 2021): 57 subjects of four-option exam questions, answered by letter.

Data: the cais/mmlu repository lm-eval 0.4.13 loads, one config per subject,
<subject>/{test,dev}-00000-of-00001.parquet, rows {question, subject, choices: [4 strings], answer:
0..3}. As its mmlu/default YAMLs: each prompt opens with the subject's description "The following are
multiple choice questions (with answers) about <subject with spaces>.\\n\\n", then the few-shot
examples, then "<question.strip()>\\nA. <c0>\\nB. <c1>\\nC. <c2>\\nD. <c3>\\nAnswer:"; the continuations
are " A".." D"; the test split is scored, accuracy only, 0-shot by default. Few-shot examples are
fixed, not sampled: the first n of the subject's dev split (5 rows; its `first_n` sampler), so
`build` uses only the count of the examples `run_task` samples and takes the subject's own, which
`load` attaches to every test document.

Group semantics (lm-eval's `mmlu` group: weight_by_size at every level): the score is the mean over
all 14,042 test documents, not over subjects. Its stderr is ours (std over all documents / sqrt(n)),
which counts the between-subject spread that lm-eval's pooled within-subject stderr leaves out.

Key trade-off: one task for the 57 subjects keeps `--tasks mmlu` one line and one number, at the price
of per-subject scores (the per-document log's doc_index maps to a document, whose "_subset" names its
subject) and of `limit`, which keeps the first documents of the group (abstract_algebra first), not
the first of every subject as lm-eval's --limit does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from gemmakit.eval.lm import LoglikelihoodRequest, Request
from gemmakit.eval.tasks.base import Doc, EvalError, MultipleChoiceTask, field, lettered_question
from gemmakit.eval.tasks.upstream import EXAMPLES_KEY, SUBSET_KEY, UpstreamFiles, with_examples

# the 57 subjects, in the order of lm-eval's mmlu/default/mmlu_<subject>.yaml files
SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine",
    "college_physics", "computer_security", "conceptual_physics", "econometrics", "electrical_engineering",
    "elementary_mathematics", "formal_logic", "global_facts", "high_school_biology",
    "high_school_chemistry", "high_school_computer_science", "high_school_european_history",
    "high_school_geography", "high_school_government_and_politics", "high_school_macroeconomics",
    "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history",
    "high_school_world_history", "human_aging", "human_sexuality", "international_law", "jurisprudence",
    "logical_fallacies", "machine_learning", "management", "marketing", "medical_genetics", "miscellaneous",
    "moral_disputes", "moral_scenarios", "nutrition", "philosophy", "prehistory", "professional_accounting",
    "professional_law", "professional_medicine", "professional_psychology", "public_relations",
    "security_studies", "sociology", "us_foreign_policy", "virology", "world_religions",
)  # fmt: skip
LETTERS = ("A", "B", "C", "D")


def description(subject: str) -> str:
    """The prompt's first line for one subject, as lm-eval's generated YAMLs spell it."""
    return (
        f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    )


class MMLU(UpstreamFiles, MultipleChoiceTask):
    name: ClassVar[str] = "mmlu"
    repo: ClassVar[str] = "cais/mmlu"
    files: ClassVar[dict[str, str]] = {s: f"{{subset}}/{s}-00000-of-00001.parquet" for s in ("test", "dev")}
    subsets: ClassVar[tuple[str, ...]] = SUBJECTS
    eval_split: ClassVar[str] = "test"
    fewshot_split: ClassVar[str] = "dev"
    metrics: ClassVar[dict[str, str]] = {"acc": "mean"}
    primary_metric: ClassVar[str] = "acc"

    def load(self, data_dir: str | Path, split: str) -> list[Doc]:
        """Documents of `split`; test documents carry their subject's dev rows (the fixed examples)."""
        docs = super().load(data_dir, split)
        if split != self.eval_split:
            return docs
        dev = {s: self.load_subset(data_dir, self.fewshot_split, s) for s in self.subsets}
        return with_examples(docs, dev)

    def question(self, doc: Doc) -> str:
        choices = field(doc, "choices", self.name)
        return lettered_question(doc, self.name, field(doc, "question", self.name).strip(), choices, LETTERS)

    def choices(self, doc: Doc) -> list[str]:
        return list(LETTERS)

    def gold(self, doc: Doc) -> int:
        return int(field(doc, "answer", self.name))

    def build(self, doc: Doc, fewshot: Sequence[Doc]) -> list[Request]:
        subject = field(doc, SUBSET_KEY, self.name)
        pool = field(doc, EXAMPLES_KEY, self.name).docs
        if len(fewshot) > len(pool):
            raise EvalError(
                f"{self.name}: {len(fewshot)}-shot prompts need {len(fewshot)} dev examples, "
                f"{subject} has {len(pool)}"
            )
        context = description(subject) + self.fewshot_text(pool[: len(fewshot)]) + self.question(doc)
        return [LoglikelihoodRequest(context, self.target_delimiter + c) for c in self.choices(doc)]
