"""Generative tasks whose few-shot examples ship with the task: MBPP, MATH (Minerva) and BBH.

Where it sits: a `Task` base for `tasks.coding.MBPP`, `tasks.minerva_math` and `tasks.bbh`, driven by
`tasks.run.run_task` like any task; files, shards and subset groups are `tasks.upstream`'s. Their
lm-eval 0.4.13 YAMLs use the `first_n` sampler over examples written into the task
(`fewshot_config.samples`), so an n-shot prompt always holds the first n of them, in order, and no
random draw is involved. `run_task` samples from `fewshot_split`; here that split is the
pseudo-split "exemplars", whose documents are placeholders: the draw only fixes how many examples
a prompt gets, and `exemplars(doc)[:n]` are the ones used.

Groups (MATH's 7 subjects, BBH's 27 subtasks) are lm-eval groups whose score is the mean over
documents (`weight_by_size: true`: the sum of subset means x sizes / total size), which is what
`run_task`'s mean over the concatenated documents is. Two group details differ from lm-eval: `limit`
keeps the first documents overall (lm-eval: per subset), and the stderr is the documents' sample
stderr, which counts the spread between subsets (lm-eval's `pooled_sample_stderr` pools only the
spread within them, so it is smaller when subset means differ).

Key trade-off: the placeholder split keeps `run_task` and the protocols unchanged (a protocol's shot
count still reaches `build`) at the cost of one `random.sample` per document that decides nothing.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import ClassVar

from gemmakit.eval.tasks.base import Doc
from gemmakit.eval.tasks.upstream import UpstreamFiles

EXEMPLARS_SPLIT = "exemplars"  # the pseudo-split of shipped few-shot examples


class ExemplarTask(UpstreamFiles):
    """A task whose few-shot examples are shipped with it; its documents may come from several subsets."""

    fewshot_split: ClassVar[str] = EXEMPLARS_SPLIT
    max_shots: ClassVar[int]  # how many exemplars there are (per subset)

    @abc.abstractmethod
    def exemplars(self, doc: Doc) -> list[Doc]:
        """The shipped few-shot examples for `doc` (they may depend on its subset), in order."""

    def shots(self, doc: Doc, fewshot: list[Doc]) -> list[Doc]:
        """The first len(fewshot) exemplars: the placeholders `run_task` drew only set the count."""
        return self.exemplars(doc)[: len(fewshot)]

    def expected_files(self, data_dir: str | Path) -> list[Path]:
        """Every file read (the evaluation split of each subset, in group order), or its path pattern."""
        out: list[Path] = []
        for subset in self._parts():
            pattern = self.files[self.eval_split].format(subset=subset)
            out += self.split_files(data_dir, self.eval_split, subset) or [
                self._root(data_dir, subset) / pattern
            ]
        return out

    def load(self, data_dir: str | Path, split: str) -> list[Doc]:
        """The documents of every subset, concatenated; for "exemplars", one placeholder per exemplar."""
        if split == EXEMPLARS_SPLIT:
            return [{"exemplar": i} for i in range(self.max_shots)]
        return super().load(data_dir, split)
