"""Data recipes: a TOML file naming the sources, the ordered stages and the outputs of a pipeline run.

Where it sits: read by `gemmakit data run --recipe X.toml` and by `data.pipeline.run`; it only describes
a run. Layout (every key maps to a dataclass field; unknown sections and keys are errors):

    [pipeline]                 # PipelineSection: shard count, local workers
    [[source]]                 # SourceSection, one per corpus (name, paths or globs, format = "text" |
                               #   "chat" | "preference")
    [[stage]]                  # one per stage, in order: kind = "quality" | "language" | "toxicity" | "pii"
                               #   | "self_identification" | "dedup" | "decontam"; the other keys are that
                               #   stage's config (filters.FILTERS, dedup.DedupConfig, decontam.DecontamConfig)
    [output]                   # OutputSection: kept JSONL, token shards, report examples
    [mixture]                  # optional MixtureSection, with [[mixture.phase]] tables

Relative paths are resolved against the recipe file's directory, so a recipe and its corpus can move
together. Key trade-off: every stage's config is validated when the recipe is loaded (a typo fails in
milliseconds, before any worker starts), at the price of importing each stage's config class eagerly;
the heavy parts (language and toxicity models) are still loaded only inside the workers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gemmakit.config import dataclass_from_table, read_toml
from gemmakit.data import decontam, dedup, filters
from gemmakit.errors import UserError

FORMATS = ("text", "chat", "preference")
GLOBAL_STAGES = ("dedup",)  # stages that need every shard's output before any shard can go on
# Each shard is a task with its own files (markers, survivors, signatures, token parts) and every plain
# JSONL input is cut into one byte range per shard, so planning and the output tree grow with the count;
# past this a recipe is a typo (a hang in planning, millions of files), not a bigger corpus.
MAX_SHARDS = 100_000
MAX_WORKERS = 1024  # the same bound as --workers


class DataRecipeError(UserError):
    """A data recipe is invalid; the message names the file, the key and what was expected."""


@dataclass(frozen=True)
class PipelineSection:
    """How the work is split and run."""

    # Work units. Fixed for the life of an output directory: a rerun with another count is refused,
    # because the split of the input (byte ranges of each JSONL file) would change under finished shards.
    shards: int = 8
    # Local worker processes (the `--workers` flag overrides); Ray ignores it and uses the cluster.
    workers: int = 2

    def __post_init__(self) -> None:
        if self.shards < 1 or self.workers < 1:
            raise DataRecipeError(f"[pipeline]: shards and workers must be >= 1, got {self}")
        if self.shards > MAX_SHARDS:
            raise DataRecipeError(f"[pipeline].shards: at most {MAX_SHARDS}, got {self.shards} (each shard "
                                  "is a task with its own files and its own byte range of every input)")  # fmt: skip
        if self.workers > MAX_WORKERS:
            raise DataRecipeError(f"[pipeline].workers: at most {MAX_WORKERS}, got {self.workers} "
                                  "(one local process each)")  # fmt: skip


@dataclass(frozen=True)
class SourceSection:
    """One corpus: files, globs or directories of the same format."""

    # Short name used in stats, reports and mixture weights (letters, digits, '_', '-').
    name: str = ""
    # Files (JSONL plain/.gz/.zst by magic bytes, Parquet), directories of .txt files, or glob patterns.
    paths: tuple[str, ...] = ()
    # "text": one document per record in `text_field`; "chat": `text_field` holds a list of
    # {"role", "content"} turns (SFT data), which the SFT filters judge turn by turn; "preference": TRL
    # preference rows (data.preference: {"prompt", "chosen", "rejected"}, strings or messages, implicit
    # prompt allowed), each answer judged as the chat conversation prompt + answer (data.shard_step).
    format: str = "text"
    # Field holding the text ("text") or, for chat, the turns ("messages"); unused for preference.
    text_field: str = ""
    # Field holding a stable document id; records without one get "<file>:<line>".
    id_field: str = "id"
    # JSONL lines longer than this are quarantined as line_too_long without being held in memory.
    max_line_bytes: int = 16 << 20


@dataclass(frozen=True)
class OutputSection:
    """What a run leaves in its output directory besides stats.json and the report."""

    # Kept documents as JSONL, one file per shard (kept/part-NNNNN.jsonl).
    jsonl: bool = True
    # Tokenizer for the training token shards (tokens/): a tokenizer.model file or a directory holding
    # one; "nano" = the bundled nano model's; "" = no token shards.
    tokenizer: str = "nano"
    # Removed documents shown per reason in the report (personal data redacted there).
    examples: int = 3


@dataclass(frozen=True)
class MixturePhase:
    """One phase of a staged mixture: a share of the token budget drawn with these source weights."""

    # Fraction of `tokens` this phase holds; the phases' fractions must sum to 1.
    fraction: float = 1.0
    # Source name -> sampling weight (normalised over the phase; sources left out get weight 0).
    weights: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class MixtureSection:
    """Sample kept documents by source weight into token shards, phase by phase (mixture/)."""

    # Token budget of the whole mixture; sources are repeated (epochs) when a phase needs more than
    # they hold, and the repeats are reported.
    tokens: int = 0
    # Seed of the document sampler (the mixture is a pure function of the kept data and this seed).
    seed: int = 0
    # Phases in training order; the last phases typically up-weight high-quality sources.
    phase: tuple[MixturePhase, ...] = ()


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: its kind and its validated config."""

    kind: str
    config: Any  # the kind's frozen config dataclass
    params: dict[str, Any]  # the raw table (minus kind), handed to the builder in each worker


@dataclass(frozen=True)
class DataRecipe:
    """A whole data recipe; `root` is the directory relative paths are resolved against."""

    pipeline: PipelineSection
    sources: tuple[SourceSection, ...]
    stages: tuple[Stage, ...]
    output: OutputSection
    mixture: MixtureSection | None
    root: Path

    def fingerprint(self) -> str:
        """sha256 of everything that decides the outputs (not `workers`): a rerun must match it."""
        data = {"shards": self.pipeline.shards, "sources": [dataclasses.asdict(s) for s in self.sources],
                "stages": [[s.kind, s.params] for s in self.stages], "output": dataclasses.asdict(self.output),
                "mixture": dataclasses.asdict(self.mixture) if self.mixture else None}  # fmt: skip
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _stage_config(kind: str, params: dict[str, Any], source: str, name: str) -> Any:
    if kind == "dedup":
        return dataclass_from_table(dedup.DedupConfig, params, source, name, DataRecipeError)
    if kind == "decontam":
        return dataclass_from_table(decontam.DecontamConfig, params, source, name, DataRecipeError)
    if kind not in filters.FILTERS:
        valid = ", ".join([*filters.FILTERS, "dedup", "decontam"])
        raise DataRecipeError(f"{source}: {name}.kind: unknown stage {kind!r}; valid: {valid}")
    return dataclass_from_table(filters.FILTERS[kind], params, source, name, DataRecipeError)


def _stages(raw: Any, source: str) -> tuple[Stage, ...]:
    if not isinstance(raw, list) or not raw:
        raise DataRecipeError(f"{source}: expected at least one [[stage]] table")
    out = []
    for i, table in enumerate(raw):
        name = f"stage[{i}]"
        if not isinstance(table, dict) or not isinstance(table.get("kind"), str):
            raise DataRecipeError(f"{source}: {name}: expected a table with a string `kind`")
        params = {k: v for k, v in table.items() if k != "kind"}
        try:
            config = _stage_config(table["kind"], params, source, name)
        except (ValueError, TypeError) as e:  # a config's own range checks (FilterError, DedupError, ...)
            msg = str(e)
            raise DataRecipeError(msg if msg.startswith(source) else f"{source}: {name}: {msg}") from None
        out.append(Stage(table["kind"], config, params))
    return tuple(out)


def _sources(raw: Any, source: str) -> tuple[SourceSection, ...]:
    if not isinstance(raw, list) or not raw:
        raise DataRecipeError(f"{source}: expected at least one [[source]] table")
    out = []
    for i, table in enumerate(raw):
        sec = dataclass_from_table(SourceSection, table, source, f"source[{i}]", DataRecipeError)
        where = f"{source}: source[{i}]"
        if not sec.name or not all(c.isalnum() or c in "_-" for c in sec.name):
            raise DataRecipeError(f"{where}.name: expected letters, digits, '_' or '-', got {sec.name!r}")
        if not sec.paths:
            raise DataRecipeError(f"{where}.paths: expected at least one file, directory or glob")
        if sec.format not in FORMATS:
            raise DataRecipeError(f"{where}.format: expected one of {FORMATS}, got {sec.format!r}")
        text_field = sec.text_field or ("messages" if sec.format == "chat" else "text")
        out.append(dataclasses.replace(sec, text_field=text_field))
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise DataRecipeError(f"{source}: source names must be unique, got {names}")
    return tuple(out)


def _mixture(raw: Any, source: str, names: list[str]) -> MixtureSection | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise DataRecipeError(f"{source}: [mixture] must be a table")
    phases = raw.get("phase", [])
    if not isinstance(phases, list) or not phases:
        raise DataRecipeError(f"{source}: [mixture] needs at least one [[mixture.phase]]")
    parsed = tuple(
        dataclass_from_table(MixturePhase, p, source, f"mixture.phase[{i}]", DataRecipeError)
        for i, p in enumerate(phases)
    )
    rest = {k: v for k, v in raw.items() if k != "phase"}
    mix = dataclass_from_table(MixtureSection, rest, source, "mixture", DataRecipeError)
    if mix.tokens < 1:
        raise DataRecipeError(f"{source}: mixture.tokens: expected a positive token budget, got {mix.tokens}")
    if abs(sum(p.fraction for p in parsed) - 1.0) > 1e-9 or any(p.fraction <= 0 for p in parsed):
        raise DataRecipeError(f"{source}: mixture.phase fractions must be positive and sum to 1")
    for i, p in enumerate(parsed):
        unknown = sorted(set(p.weights) - set(names))
        if unknown:
            raise DataRecipeError(f"{source}: mixture.phase[{i}].weights: unknown source(s) {unknown}; "
                                  f"sources are {names}")  # fmt: skip
        if any(not isinstance(w, int | float) or w < 0 for w in p.weights.values()) or not any(
            p.weights.values()
        ):
            raise DataRecipeError(f"{source}: mixture.phase[{i}].weights: expected non-negative numbers, "
                                  "at least one positive")  # fmt: skip
    return dataclasses.replace(mix, phase=parsed)


def recipe_from_dict(raw: dict[str, Any], source: str = "<recipe>", root: Path | None = None) -> DataRecipe:
    """A DataRecipe from parsed TOML; every error is a one-line DataRecipeError naming the key."""
    unknown = sorted(set(raw) - {"pipeline", "source", "stage", "output", "mixture"})
    if unknown:
        raise DataRecipeError(f"{source}: unknown section(s) {unknown}; valid: pipeline, source, stage, "
                              "output, mixture")  # fmt: skip
    try:
        pipeline = dataclass_from_table(
            PipelineSection, raw.get("pipeline", {}), source, "pipeline", DataRecipeError
        )
    except DataRecipeError as e:  # __post_init__'s range checks do not know the file; name it here
        msg = str(e)
        raise DataRecipeError(msg if msg.startswith(source) else f"{source}: {msg}") from None
    sources = _sources(raw.get("source"), source)
    output = dataclass_from_table(OutputSection, raw.get("output", {}), source, "output", DataRecipeError)
    return DataRecipe(pipeline=pipeline, sources=sources, stages=_stages(raw.get("stage"), source),
                      output=output, mixture=_mixture(raw.get("mixture"), source, [s.name for s in sources]),
                      root=root or Path.cwd())  # fmt: skip


def load_recipe(path: str | Path) -> DataRecipe:
    """Read and validate a data recipe; DataRecipeError names the file and key."""
    path = Path(path)
    if path.is_dir():  # checked first: reading a directory raises IsADirectoryError, a traceback
        raise DataRecipeError(
            f"{path}: is a directory; expected a data recipe TOML file (recipes/data_*.toml)"
        )
    try:
        raw = read_toml(path, DataRecipeError)
    except OSError as e:  # unreadable (permissions, I/O): read_toml reports only a missing file itself
        raise DataRecipeError(f"{path}: cannot read the recipe ({e.strerror or e})") from None
    return recipe_from_dict(raw, str(path), path.resolve().parent)
