"""Split files that are sharded, hash-suffixed or spread over one dataset repository per subset.

Where it sits: a mixin for `tasks.base.Task` subclasses whose published files `Task.load` cannot name
exactly. `files` values may be glob patterns relative to the repository folder ("**/test[-_.]*": the
names `datasets`' `push_to_hub` gives, test-00000-of-00001.parquet or test-00000-of-00001-<hash>.parquet,
and plain test.parquet / test.jsonl), every matching file of a split is read in name order (shard
order); and a task may be a group of `subsets` (MMLU's 57 subjects in one repository, AGIEval's 10
repositories), with `{subset}` in `repo` or `files`; its documents are every subset's, in order, each
tagged with `SUBSET_KEY`.

Key trade-off: globbing keeps tasks working whatever shard names a repository snapshot has, at the
price of trusting the folder: hidden folders (huggingface-cli's .cache/ with its *.metadata files) and
non-data suffixes are skipped, and matches in two different folders are refused as ambiguous rather
than read twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from gemmakit.eval.tasks.base import Doc, EvalError, Task, read_rows

DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".jsonl.gz", ".json.gz")
GLOB_CHARS = frozenset("*?[")
SUBSET_KEY = "_subset"  # added to each document of a grouped task; no upstream column starts with "_"


def match_files(root: Path, pattern: str) -> list[Path]:
    """Data files under `root` matching `pattern` (a relative path or glob), in name order."""
    if not GLOB_CHARS & set(pattern):
        path = root / pattern
        return [path] if path.is_file() else []
    found = sorted(
        p
        for p in root.glob(pattern)
        if p.is_file()
        and p.name.endswith(DATA_SUFFIXES)
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    folders = sorted({str(p.parent) for p in found})
    if len(folders) > 1:
        raise EvalError(f"{root}: files matching {pattern!r} in several folders ({', '.join(folders)})")
    return found


class UpstreamFiles(Task):
    """`Task.expected_files` and `Task.load` for glob patterns and subset groups (see module docstring)."""

    # the group's members, in lm-eval's order; () = a single dataset (no "{subset}" in repo or files)
    subsets: ClassVar[tuple[str, ...]] = ()

    def _parts(self) -> tuple[str, ...]:
        return self.subsets or ("",)

    def _root(self, data_dir: str | Path, subset: str) -> Path:
        return Path(data_dir) / self.repo.format(subset=subset)

    def split_files(self, data_dir: str | Path, split: str, subset: str = "") -> list[Path]:
        """The files holding `split` (of `subset`), in shard order; [] when none is there."""
        return match_files(self._root(data_dir, subset), self.files[split].format(subset=subset))

    def expected_files(self, data_dir: str | Path) -> list[Path]:
        """Every file read, or the path pattern where none matches yet: evaluation split, then few-shot."""
        out: list[Path] = []
        for split in dict.fromkeys((self.eval_split, self.fewshot_split)):
            for subset in self._parts():
                found = self.split_files(data_dir, split, subset)
                out += found or [self._root(data_dir, subset) / self.files[split].format(subset=subset)]
        return out

    def load_subset(self, data_dir: str | Path, split: str, subset: str = "") -> list[Doc]:
        """The rows of one split of one subset, all shards concatenated, before `process_docs`."""
        found = self.split_files(data_dir, split, subset)
        if not found:
            missing = [str(p) for p in self.expected_files(data_dir) if not p.is_file()]
            root = self._root(data_dir, subset).parent if self.subsets else self._root(data_dir, subset)
            raise EvalError(
                f"{self.name}: missing data file(s) {', '.join(missing)} (Parquet or JSON lines; '*' "
                f"patterns match shards); download the {self.repo.format(subset='*')} dataset "
                f"repository into {root}"
            )
        return [row for path in found for row in read_rows(path)]

    def load(self, data_dir: str | Path, split: str) -> list[Doc]:
        """Documents of one split: each subset's rows in turn (tagged with SUBSET_KEY), processed."""
        docs: list[Doc] = []
        for subset in self._parts():
            rows = self.load_subset(data_dir, split, subset)
            if not rows:
                raise EvalError(f"{self.name}: no documents in the {split} split of {subset or self.repo}")
            if self.subsets:
                rows = [{**row, SUBSET_KEY: subset} for row in rows]
            docs += self.process_docs(rows)
        return docs


class FixedExamples:
    """A subset's few-shot examples, attached to each of its documents under EXAMPLES_KEY.

    Equality is identity, so the sampler's document comparisons stay cheap and never recurse into
    the examples; the repr is short, so a logged document stays readable.
    """

    __slots__ = ("docs",)

    def __init__(self, docs: list[Doc]) -> None:
        self.docs = docs

    def __repr__(self) -> str:
        return f"FixedExamples({len(self.docs)} docs)"


EXAMPLES_KEY = "_examples"


def with_examples(docs: list[Doc], pools: dict[str, list[Doc]]) -> list[Doc]:
    """Each document with its subset's pool of few-shot examples under EXAMPLES_KEY (one shared
    FixedExamples per subset, so a 14k-document MMLU holds 57 pools, not 14k copies)."""
    examples = {subset: FixedExamples(pool) for subset, pool in pools.items()}
    return [{**doc, EXAMPLES_KEY: examples[doc[SUBSET_KEY]]} for doc in docs]


def public(doc: Doc) -> Doc:
    """The document without the keys added here (SUBSET_KEY, EXAMPLES_KEY): the upstream row."""
    return {k: v for k, v in doc.items() if not k.startswith("_")}
