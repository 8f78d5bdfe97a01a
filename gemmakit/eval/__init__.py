"""Evaluation: the LM protocol, the report's benchmarks, code execution, memorization and the report.

Where it sits: after `train` (rank 7): it reads models, tokenizers and token shards, and only the CLI
and the server import it. Modules: `lm` (protocol, GemmaLM) and `lm_http` (OpenAI-compatible servers),
`tasks` (registry, protocols, run_task), `metrics`, `execution` + `sandbox` (isolated code runs),
`humaneval`, `memorization`, `perplexity`, `runner` (results.json), `report`, `published`.

Names resolve lazily: importing this package loads nothing heavy (torch comes with `lm`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

_LAZY = {
    "LM": "gemmakit.eval.lm",
    "GemmaLM": "gemmakit.eval.lm",
    "OpenAICompatibleLM": "gemmakit.eval.lm_http",
    "EvalError": "gemmakit.eval.tasks",
    "get_task": "gemmakit.eval.tasks",
    "run_task": "gemmakit.eval.tasks",
    "evaluate": "gemmakit.eval.runner",
    "memorization": "gemmakit.eval.memorization",
    "run_program": "gemmakit.eval.execution",
}
__all__ = ["LM", "EvalError", "GemmaLM", "OpenAICompatibleLM", "evaluate", "get_task", "memorization",
           "run_program", "run_task"]  # fmt: skip

if TYPE_CHECKING:
    from gemmakit.eval.execution import run_program
    from gemmakit.eval.lm import LM, GemmaLM
    from gemmakit.eval.lm_http import OpenAICompatibleLM
    from gemmakit.eval.memorization import memorization
    from gemmakit.eval.runner import evaluate
    from gemmakit.eval.tasks import EvalError, get_task, run_task


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'gemmakit.eval' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
