"""Evaluate one model on several tasks under one protocol and write results.json (and the report).

Where it sits: `gemmakit eval` -> `evaluate(lm, tasks, ...)` -> `tasks.run_task` per benchmark (or
`perplexity` for `ppl:PATH` entries) -> `results.json` + `report.md`/`report.png` (`eval.report`).

results.json records, per task: the headline metric and its value, every metric with its standard
error (sample std / sqrt(n), as lm-eval), n, the protocol and shot count, and the sha256 of every data
file read; for the run: the model (its directory, config, manifest.json digest), the adapter, the
protocol, the limit, gemmakit's version. Per-document samples go to samples/<task>.jsonl, so a score
can be audited request by request. The directory is one artifact (`gemmakit.artifact.atomic_dir`):
written aside and swapped into place whole with a manifest.json, so a killed run leaves the previous
results intact and a rerun never mixes its samples with an earlier run's; `out` may be new, empty
or an earlier run's results, which it replaces.

Key trade-off: every file is hashed (sha256 at ~1 GB/s; the 17 benchmarks' files total well under
1 GB) so two results.json files can be compared knowing whether the data was the same; a run is
a few seconds slower for it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from gemmakit.artifact import atomic_dir, atomic_open, sha256_file, version, write_json
from gemmakit.eval.lm import LM
from gemmakit.eval.perplexity import perplexity, read_texts
from gemmakit.eval.tasks import EvalError, get_protocol, get_task, run_task

log = logging.getLogger(__name__)
RESULTS_FORMAT = "gemmakit-eval-results"
PPL_PREFIX = "ppl:"


def _finite(x: float) -> float | None:
    return x if isinstance(x, float | int) and math.isfinite(x) else None


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    return value


def model_info(model_dir: str | Path | None, preset: str | None = None) -> dict[str, Any]:
    """What was evaluated: the directory, its config.json and the digest of its manifest.json."""
    info: dict[str, Any] = {"dir": str(model_dir) if model_dir else None, "preset": preset}
    if model_dir:
        root = Path(model_dir)
        for name in ("config.json", "manifest.json"):
            if (root / name).is_file():
                info[name.removesuffix(".json") + "_sha256"] = sha256_file(root / name)
        if (root / "config.json").is_file():
            info["config"] = json.loads((root / "config.json").read_text(encoding="utf-8"))
    return info


def _task_entry(name: str, lm: LM, data_dir: Path, protocol: str, limit: int | None,
                samples_dir: Path, allow_unsafe_code: bool) -> dict[str, Any]:  # fmt: skip
    if name.startswith(PPL_PREFIX):
        path = Path(name[len(PPL_PREFIX) :])
        texts = read_texts(path, limit=limit)
        if not texts:
            raise EvalError(f"{path}: no documents to score")
        result = perplexity(lm, texts)
        data = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        return {"kind": "perplexity", "metric": "bits_per_byte", "value": result["bits_per_byte"],
                "n": result["docs"], "metrics": result, "stderr": {}, "protocol": None, "num_fewshot": 0,
                "data_sha256": {str(p): sha256_file(p) for p in data}}  # fmt: skip
    task = get_task(name)
    if allow_unsafe_code and hasattr(task, "code_execution"):  # HumanEval, MBPP: the user's explicit choice
        task.code_execution = dataclasses.replace(task.code_execution, allow_unsafe=True)
    res = run_task(task, lm, data_dir, protocol, limit)
    with atomic_open(samples_dir / f"{name}.jsonl") as f:
        for s in res.samples:
            rec = {"doc": s.doc_index, "requests": [_plain(r) for r in s.requests],
                   "responses": [list(r) if isinstance(r, tuple) else r for r in s.responses], "scores": s.scores}  # fmt: skip
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return {"kind": "task", "metric": res.primary_metric, "value": res.metrics[res.primary_metric], "n": res.n,
            "metrics": res.metrics, "stderr": {k: _finite(v) for k, v in res.stderr.items()},
            "protocol": res.protocol, "num_fewshot": res.num_fewshot,
            "data_sha256": {str(p): sha256_file(p) for p in task.expected_files(data_dir) if p.is_file()}}  # fmt: skip


def evaluate(lm: LM, tasks: Sequence[str], *, protocol: str, data_dir: str | Path, out: str | Path,
             limit: int | None = None, model: dict[str, Any] | None = None,
             on_task_start: Callable[[str], None] | None = None,
             allow_unsafe_code: bool = False) -> dict[str, Any]:  # fmt: skip
    """Run every task, write out/results.json, out/samples/ and the report; returns the results.
    `on_task_start(name)` is called before each task (the CLI labels its progress bar with it).
    `allow_unsafe_code` lets code tasks run model-written programs where no sandbox is available
    (`eval.execution`: otherwise they refuse before generating anything)."""
    from gemmakit.eval.report import write_report

    get_protocol(protocol)  # an unknown protocol fails before any model call
    for t in tasks:  # an unknown task name fails before any model call too
        if not t.startswith(PPL_PREFIX):
            get_task(t)
    out, data_dir = Path(out), Path(data_dir)
    if not _replaceable(out):
        raise EvalError(f"{out}: exists and holds files that are not eval results; choose a new or empty "
                        "output directory")  # fmt: skip
    results: dict[str, Any] = {"format": RESULTS_FORMAT, "version": 1, "protocol": protocol, "limit": limit,
                               "model": model or {}, "lm": getattr(lm, "name", type(lm).__name__),
                               "gemmakit_version": version(), "tasks": {}}  # fmt: skip
    with atomic_dir(
        out, overwrite=True, producer="gemmakit.eval.runner", extra={"format": RESULTS_FORMAT}
    ) as tmp:
        for name in tasks:
            if on_task_start is not None:
                on_task_start(name)
            start = time.perf_counter()
            entry = _task_entry(name, lm, data_dir, protocol, limit, tmp / "samples", allow_unsafe_code)
            entry["seconds"] = round(time.perf_counter() - start, 3)
            results["tasks"][name] = entry
            log.info("%s: %s = %.4f (n=%d)", name, entry["metric"], entry["value"], entry["n"])
        write_json(tmp / "results.json", results)
        write_report(tmp, results)
    return results


def _replaceable(out: Path) -> bool:
    """`out` is missing, empty, or an earlier run's results (evaluate replaces it whole)."""
    if not out.is_dir() or not any(out.iterdir()):
        return True
    try:
        return json.loads((out / "results.json").read_text(encoding="utf-8")).get("format") == RESULTS_FORMAT
    except (OSError, ValueError, AttributeError):
        return False
