"""Run one task with one LM under one protocol: few-shot sampling, requests by type, scores, aggregates.

Where it sits: called by `eval.runner` (results.json, report) and the agreement test; it reads the
task's files, builds every request, calls each LM method once with all requests of its type (so the
adapter can sort and batch), scores each document and averages.

Few-shot sampling copies lm-eval 0.4.13's `ContextSampler` so the same seed picks the same examples:
one `random.Random(seed)` per task run, consumed document by document in order, `rng.sample(pool, n)`
per document (n + 1 and the evaluated document dropped, where the task says lm-eval does that). A
`limit` keeps the first documents, so their prompts do not depend on it.

Key trade-off: all requests of a task are built before the first model call, so the adapter sees
the whole batch (sorting saves ~30% padding) at the cost of holding every prompt in memory (a few MB
even for HellaSwag's 10k documents with 10 shots).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gemmakit.eval.lm import LM, GenerateRequest, LoglikelihoodRequest, Request, RollingRequest
from gemmakit.eval.metrics import mean, mean_stderr
from gemmakit.eval.tasks.base import Doc, EvalError, Task
from gemmakit.eval.tasks.protocols import Protocol, get_protocol
from gemmakit.eval.tasks.registry import get_task

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleLog:
    doc_index: int  # position of the document in the evaluation split
    requests: tuple[Request, ...]  # what the LM was asked, in the order `Task.build` returned
    responses: tuple[Any, ...]  # its answers: (loglikelihood, is_greedy) pairs, floats or strings
    scores: dict[str, float]  # this document's metric values


@dataclass(frozen=True)
class TaskResult:
    task: str  # task name
    protocol: str  # protocol name
    num_fewshot: int  # examples in each prompt
    primary_metric: str  # the headline metric under this protocol
    n: int  # documents scored
    metrics: dict[str, float]  # metric -> mean over documents
    stderr: dict[str, float]  # metric -> sample std / sqrt(n), lm-eval's mean_stderr; NaN if n < 2
    samples: tuple[SampleLog, ...]  # per document, for audits and the agreement test


def sample_fewshot(pool: Sequence[Doc], n: int, rng: random.Random, doc: Doc, exclude_doc: bool) -> list[Doc]:
    """lm-eval's `ContextSampler.sample`: n examples from `pool`, drawing from the shared `rng`."""
    if n == 0:
        return []
    need = n + 1 if exclude_doc else n
    if len(pool) < need:
        raise EvalError(f"{n}-shot prompts need {need} few-shot documents, the split has {len(pool)}")
    if not exclude_doc:
        return rng.sample(pool, n)
    picked = [d for d in rng.sample(pool, n + 1) if d != doc][:n]
    if len(picked) < n:  # the pool held several copies of `doc`
        picked = rng.sample([d for d in pool if d != doc], n)
    return picked


def run_task(
    task: Task | str,
    lm: LM,
    data_dir: str | Path,
    protocol: Protocol | str = "lm-eval",
    limit: int | None = None,
) -> TaskResult:
    """Evaluate `lm` on `task` (the first `limit` documents, or all) with `protocol`'s settings."""
    task = get_task(task) if isinstance(task, str) else task
    protocol = get_protocol(protocol) if isinstance(protocol, str) else protocol
    setting = protocol.for_task(task)
    if setting.metric not in task.metrics:
        known = ", ".join(task.metrics)
        raise EvalError(f"protocol {protocol.name!r}: {task.name} has no metric {setting.metric!r} ({known})")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise EvalError(f"limit: expected None or an integer >= 1, got {limit!r}")
    docs = task.load(data_dir, task.eval_split)[:limit]
    pool = task.load(data_dir, task.fewshot_split) if setting.num_fewshot else []
    rng = random.Random(protocol.fewshot_seed)
    per_doc: list[list[Request]] = []
    for doc in docs:
        fewshot = sample_fewshot(pool, setting.num_fewshot, rng, doc, task.fewshot_excludes_doc)
        requests = task.build(doc, fewshot)
        if protocol.max_gen_tokens is not None:
            requests = [_budget(r, protocol.max_gen_tokens) for r in requests]
        per_doc.append(requests)
    logger.info("%s: %d documents, %d-shot, %d requests", task.name, len(docs), setting.num_fewshot,
                sum(map(len, per_doc)))  # fmt: skip
    answers = _answer(lm, per_doc)
    scores = task.score_all(docs, answers)
    samples = tuple(
        SampleLog(i, tuple(reqs), tuple(ans), sc)
        for i, (reqs, ans, sc) in enumerate(zip(per_doc, answers, scores, strict=True))
    )
    metrics, stderr = {}, {}
    for metric in task.metrics:
        values = [s.scores[metric] for s in samples]
        metrics[metric], stderr[metric] = mean(values), mean_stderr(values)
    return TaskResult(task.name, protocol.name, setting.num_fewshot, setting.metric, len(samples),
                      metrics, stderr, samples)  # fmt: skip


def _budget(request: Request, max_tokens: int) -> Request:
    return replace(request, max_tokens=max_tokens) if isinstance(request, GenerateRequest) else request


def _answer(lm: LM, per_doc: list[list[Request]]) -> list[list[Any]]:
    """Every request answered, with one LM call per request type; answers in `per_doc`'s shape."""
    answers: list[list[Any]] = [[None] * len(reqs) for reqs in per_doc]
    methods = (
        (LoglikelihoodRequest, lm.loglikelihood),
        (RollingRequest, lm.loglikelihood_rolling),
        (GenerateRequest, lm.generate_until),
    )
    for kind, method in methods:
        where = [(d, j) for d, reqs in enumerate(per_doc) for j, r in enumerate(reqs) if isinstance(r, kind)]
        if not where:
            continue
        out = method([per_doc[d][j] for d, j in where])
        if len(out) != len(where):
            raise EvalError(f"{lm.name}: {method.__name__} answered {len(out)} of {len(where)} requests")
        for (d, j), answer in zip(where, out, strict=True):
            answers[d][j] = answer
    return answers
