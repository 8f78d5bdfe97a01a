"""The data pipeline: plan a recipe's work into shards, run the steps locally or on Ray, resume, finalize.

Where it sits: `gemmakit data run` -> `run(recipe, out)` -> per-shard steps (`data.shard_step`) and
global steps (dedup clustering, finalize) -> an output directory:

    plan.json               the shard count, the recipe fingerprint and the inputs (size per file)
    done/<step>/<shard>     empty completion markers, written after the step's outputs are fsynced
    work/                   survivors and signatures between segments, token parts, per-step stats
    quarantine/part-*.jsonl malformed input lines with file:line
    kept/part-*.jsonl       kept documents (original fields, the filtered text, "corpus")
    tokens/                 token shards for training (data.shards format; index.json written last)
    dedup/clusters-*.jsonl  duplicate clusters, kept document first
    mixture/                optional: token shards per mixture phase (data.mixture)
    stats.json, report.md, report.png

Splitting: each uncompressed JSONL file is cut into `shards` byte ranges (shard k reads the lines that
start in range k), and every other input (gzip/zstd JSONL, Parquet, a text directory) goes whole to one
shard, round-robin. Steps: the stages are cut into segments at each global stage (dedup); a segment runs
per shard in parallel, a global step runs once over all shards. Global order (for dedup's keep-first)
is shard 0's documents in order, then shard 1's, and so on.

Resumability: a (step, shard) is done when its marker exists; a rerun skips done units and recomputes
the rest, and every unit is a pure function of its inputs, so a run killed at any point and rerun gives
the same bytes as an uninterrupted one. A rerun must agree with plan.json: another shard count, another
recipe fingerprint or a changed input file is refused, because it would mix old and new sharding.

Executors: "local" runs units in `workers` spawned processes (or in-process with one worker); "ray" runs
the same function as Ray tasks (the output directory must be on a filesystem every node sees). Both
produce identical bytes because the unit function is the same and nothing depends on scheduling.

Key trade-off: a shard that fails (a corrupt gzip file) gets no marker and the run stops before the next
global step with a non-zero exit, naming it; the other shards' finished work is kept and reused by the
rerun (an output directory this run created in which no unit finished is removed: nothing to reuse).
A global stage means no shard can finish until every shard has reached it.
"""

from __future__ import annotations

import fcntl
import glob
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from gemmakit.artifact import atomic_open, fsync_path, write_json
from gemmakit.data import dedup
from gemmakit.data.recipe import GLOBAL_STAGES, DataRecipe, Stage
from gemmakit.data.shard_step import Unit, run_segment
from gemmakit.data.sources import SourceError, sniff
from gemmakit.errors import UserError

log = logging.getLogger(__name__)
PLAN_FORMAT, PLAN_VERSION = "gemmakit-data-run", 1
EXECUTORS = ("local", "ray")


class PipelineError(UserError, RuntimeError):
    """The run cannot start or did not complete; the message says which file, shard or setting, and why."""


@dataclass(frozen=True)
class Step:
    """One step of the run: a per-shard segment of filters, or a global stage."""

    name: str  # "seg0", "dedup0", ..., "final"
    kind: str  # "segment", "dedup" or "final"
    stages: tuple[Stage, ...] = ()  # the segment's filters, or the one global stage
    index: int = 0  # segment / dedup number


def steps_of(recipe: DataRecipe) -> list[Step]:
    """Segments of per-document stages separated by global stages, then "final"."""
    steps, current, n_seg, n_glob = [], [], 0, 0
    for stage in recipe.stages:
        if stage.kind in GLOBAL_STAGES:
            steps.append(Step(f"seg{n_seg}", "segment", tuple(current), n_seg))
            steps.append(Step(f"dedup{n_glob}", "dedup", (stage,), n_glob))
            current, n_seg, n_glob = [], n_seg + 1, n_glob + 1
        else:
            current.append(stage)
    steps.append(Step(f"seg{n_seg}", "segment", tuple(current), n_seg))
    steps.append(Step("final", "final"))
    return steps


def _expand(recipe: DataRecipe) -> list[tuple[int, Path]]:
    files = []
    for i, src in enumerate(recipe.sources):
        for pattern in src.paths:
            full = pattern if os.path.isabs(pattern) else str(recipe.root / pattern)
            if glob.has_magic(full):
                found = sorted(glob.glob(full))
                if not found:
                    raise PipelineError(f"source {src.name!r}: {pattern!r} matches no file")
                files += [(i, Path(p)) for p in found]
            elif not os.path.exists(full):
                raise PipelineError(f"source {src.name!r}: {full}: no such file or directory")
            else:
                files.append((i, Path(full)))
    return files


def plan(recipe: DataRecipe) -> tuple[list[list[Unit]], list[dict[str, Any]]]:
    """(units per shard, the inputs as recorded in plan.json)."""
    n = recipe.pipeline.shards
    units: list[list[Unit]] = [[] for _ in range(n)]
    inputs, turn = [], 0
    for src, path in _expand(recipe):
        kind = sniff(path)
        size = path.stat().st_size if kind != "directory" else sum(f.stat().st_size for f in path.rglob("*"))
        inputs.append({"source": recipe.sources[src].name, "path": str(path), "kind": kind, "size": size})
        if kind == "text":  # plain JSONL: every shard reads its byte range of the file
            for k in range(n):
                units[k].append(Unit(src, str(path), (size * k // n, size * (k + 1) // n)))
        else:
            units[turn % n].append(Unit(src, str(path)))
            turn += 1
    return units, inputs


def _check_plan(out: Path, recipe: DataRecipe, inputs: list[dict[str, Any]]) -> None:
    """Write plan.json on the first run; refuse a rerun that would mix two different shardings."""
    path = out / "plan.json"
    want = {"format": PLAN_FORMAT, "version": PLAN_VERSION, "shards": recipe.pipeline.shards,
            "fingerprint": recipe.fingerprint(), "inputs": inputs}  # fmt: skip
    if not path.exists():
        write_json(path, want)
        return
    try:
        have = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PipelineError(f"{path}: unreadable plan ({e}); use a new output directory") from None
    if have.get("format") != PLAN_FORMAT or have.get("version") != PLAN_VERSION:
        raise PipelineError(f"{path}: not a gemmakit data run (version {PLAN_VERSION}) plan")
    if have["shards"] != want["shards"]:
        raise PipelineError(
            f"{out}: this output was planned with shards={have['shards']}, the recipe now says "
            f"shards={want['shards']}; changing the shard count would re-split inputs under finished "
            "shards. Rerun with the old count, or use a new output directory for a full rerun."
        )
    if have["fingerprint"] != want["fingerprint"]:
        raise PipelineError(f"{out}: the recipe changed since this output was started (sources, stages or "
                            "outputs); use a new output directory")  # fmt: skip
    if have["inputs"] != want["inputs"]:
        changed = [a["path"] for a, b in zip(have["inputs"], want["inputs"], strict=False) if a != b]
        raise PipelineError(f"{out}: input files changed since this output was started ({changed[:3] or 'the list of files'}); "
                            "use a new output directory")  # fmt: skip


def _marker(out: Path, step: str, shard: int | None = None) -> Path:
    return out / "done" / step / (f"{shard:05d}" if shard is not None else "all")


def _mark(path: Path) -> None:
    with atomic_open(path, "wb"):
        pass


def _shard_task(recipe: DataRecipe, out: str, step_i: int, shard: int, units: list[Unit]) -> dict[str, Any]:
    """One (segment, shard): the function both executors run; writes the marker when its outputs are safe."""
    steps = steps_of(recipe)
    step = steps[step_i]
    nxt = steps[step_i + 1] if step_i + 1 < len(steps) else None
    prev = steps[step_i - 1] if step_i > 0 else None
    result = run_segment(recipe, Path(out), step.index, list(step.stages), shard, units,
                         last=nxt is not None and nxt.kind == "final",
                         next_dedup=nxt.stages[0].config if nxt is not None and nxt.kind == "dedup" else None,
                         prev_dedup=prev.stages[0].config if prev is not None else None)  # fmt: skip
    _mark(_marker(Path(out), step.name, shard))
    return result


Runner = Callable[[list[tuple[int, list[Unit]]], int], dict[int, str]]


def _local_runner(recipe: DataRecipe, out: Path, workers: int, stack: ExitStack) -> Runner:
    """Units in-process (one worker) or in one pool of spawned processes kept for the whole run: a spawn
    worker costs ~0.5 s to start and load the filters' models, paid once, not once per segment."""
    pools: list[ProcessPoolExecutor] = []

    def run_step(todo: list[tuple[int, list[Unit]]], step_i: int) -> dict[int, str]:
        errors: dict[int, str] = {}
        if workers == 1 or len(todo) == 1:
            for shard, units in todo:
                try:
                    _shard_task(recipe, str(out), step_i, shard, units)
                except (SourceError, OSError, ValueError) as e:
                    errors[shard] = str(e)
            return errors
        if not pools:
            size = min(workers, recipe.pipeline.shards)
            pools.append(
                stack.enter_context(ProcessPoolExecutor(max_workers=size, mp_context=get_context("spawn")))
            )
        futures = {shard: pools[0].submit(_shard_task, recipe, str(out), step_i, shard, units)
                   for shard, units in todo}  # fmt: skip
        for shard, fut in futures.items():
            try:
                fut.result()
            except (SourceError, OSError, ValueError) as e:
                errors[shard] = str(e)
            except BrokenProcessPool:  # a worker was killed (the OOM killer?); a rerun redoes its shards
                errors[shard] = "its worker process died (out of memory?); rerun to redo it"
        return errors

    return run_step


def _ray_runner(recipe: DataRecipe, out: Path, address: str | None) -> Runner:
    try:
        import ray
    except ImportError:
        raise PipelineError("--executor ray needs Ray: pip install 'gemmakit[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    task = ray.remote(num_cpus=1, max_retries=0)(_shard_task)

    def run_step(todo: list[tuple[int, list[Unit]]], step_i: int) -> dict[int, str]:
        refs = {shard: task.remote(recipe, str(out), step_i, shard, units) for shard, units in todo}
        errors: dict[int, str] = {}
        for shard, ref in refs.items():
            try:
                ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                cause = e.cause if isinstance(e.cause, Exception) else e
                if not isinstance(cause, SourceError | OSError | ValueError):
                    raise cause from None
                errors[shard] = str(cause)
        return errors

    return run_step


def _dedup_step(out: Path, step: Step, n_shards: int, seg: int) -> None:
    cfg = step.stages[0].config
    work = out / "work"
    sigs = [np.load(work / f"seg{seg}" / f"sig-{s:05d}.npy", allow_pickle=False) for s in range(n_shards)]
    dropped, clusters = dedup.find_duplicates(sigs, cfg)
    ids = [_ids(work / f"seg{seg}" / f"part-{s:05d}.jsonl") for s in range(n_shards)]
    for s, mask in enumerate(dropped):
        with atomic_open(work / step.name / f"dropped-{s:05d}.npy", "wb") as f:
            np.save(f, np.asarray(mask, dtype=bool), allow_pickle=False)
    with atomic_open(out / "dedup" / f"clusters-{step.index}.jsonl") as f:
        for cluster in clusters:
            members = [{"shard": s, "id": ids[s][i]} for s, i in cluster]
            f.write(json.dumps({"kept": members[0]["id"], "size": len(members), "members": members}) + "\n")


def _ids(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["id"] for line in f]


def _clean_stale(out: Path) -> None:
    """Remove temp files and directories a killed run left (".name.tmp-*", ".name.old-*"): never read,
    and removing them makes a resumed run's tree identical to an uninterrupted one."""
    for path in sorted(out.rglob(".*"), reverse=True):
        if ".tmp" in path.name or ".old-" in path.name:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    """One run per output directory at a time (an advisory lock on out/.lock, released by the kernel
    if the process dies)."""
    try:
        f = open(out / ".lock", "a")  # noqa: SIM115 (closed by the with below)
    except OSError as e:  # a read-only or foreign output directory
        raise PipelineError(f"--output {out}: cannot write there ({e.strerror or e})") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PipelineError(f"{out}: another run is using this output directory") from None
        yield


def run(recipe: DataRecipe, out: str | Path, *, executor: str = "local", workers: int | None = None,
        ray_address: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Run (or resume) a recipe into `out`; returns the merged stats. PipelineError if any shard failed."""
    if executor not in EXECUTORS:
        raise PipelineError(f"--executor: expected one of {EXECUTORS}, got {executor!r}")
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise PipelineError(
            f"--output {out}: exists and is not a directory; name a new or existing directory"
        )
    units, inputs = plan(recipe)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # read-only filesystem, no permission, a parent that is a file
        raise PipelineError(f"--output {out}: cannot create the directory ({e.strerror or e})") from None
    try:
        with _locked(out):
            _check_plan(out, recipe, inputs)
            _clean_stale(out)
            return _run_steps(recipe, out, units, executor, workers, ray_address)
    except BaseException:
        # A directory this call made and in which no unit finished holds nothing a rerun could reuse;
        # leaving it would only look like a (broken) output. With any marker it stays, for the resume.
        if created and not any(p.is_file() for p in (out / "done").rglob("*")):
            shutil.rmtree(out, ignore_errors=True)
        raise


def _run_steps(recipe: DataRecipe, out: Path, units: list[list[Unit]], executor: str, workers: int | None,
               ray_address: str | None) -> dict[str, Any]:  # fmt: skip
    if _marker(out, "final").exists():
        log.info("%s: already complete; nothing to do", out)
        return json.loads((out / "stats.json").read_text(encoding="utf-8"))
    with ExitStack() as stack:
        runner = (_ray_runner(recipe, out, ray_address) if executor == "ray"
                  else _local_runner(recipe, out, workers or recipe.pipeline.workers, stack))  # fmt: skip
        _steps_loop(recipe, out, units, runner)
    fsync_path(out)
    return json.loads((out / "stats.json").read_text(encoding="utf-8"))


def _steps_loop(recipe: DataRecipe, out: Path, units: list[list[Unit]], runner: Runner) -> None:
    from gemmakit.data.finalize import finalize

    n = recipe.pipeline.shards
    steps = steps_of(recipe)
    for i, step in enumerate(steps):
        if step.kind == "segment":
            todo = [(s, units[s] if step.index == 0 else []) for s in range(n)
                    if not _marker(out, step.name, s).exists()]  # fmt: skip
            log.info("%s: %d of %d shards to do", step.name, len(todo), n)
            errors = runner(todo, i) if todo else {}
            if errors:
                lines = "; ".join(f"shard {s}: {msg}" for s, msg in sorted(errors.items()))
                raise PipelineError(f"{len(errors)} of {n} shards failed at {step.name} (no completion marker; "
                                    f"fix and rerun to redo only them): {lines}")  # fmt: skip
        elif not _marker(out, step.name).exists():
            if step.kind == "dedup":
                _dedup_step(out, step, n, step.index)
            else:
                finalize(recipe, out, steps)
            _mark(_marker(out, step.name))
