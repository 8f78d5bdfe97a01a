"""The Gemma reports' published pretrained-model scores, to print beside measured ones.

Where it sits: read by `eval.report` only. Numbers are copied from shared/reference/
ecosystem-evaluation-safety.md §3.1-3.2 (Gemma 1 report Table 6; Gemma 2 and Gemma 3 model cards),
as percentages, keyed by our task names; a benchmark a report does not list is absent, never zero.

Key trade-off: a published number is shown next to ours only when the model's shape matches one of
the report's sizes exactly (a preset name), and with the report's protocol named: the reports'
protocols differ from each other and from lm-eval in details (Gemma 3's appendix re-measures Gemma 2
2B BoolQ at 75.6 against the card's 72.5), so a gap of a few points is not by itself a bug.
"""

from __future__ import annotations

from typing import Any

_TASKS = ("mmlu", "hellaswag", "piqa", "siqa", "boolq", "winogrande", "commonsense_qa", "openbookqa",
          "arc_easy", "arc_challenge", "triviaqa", "nq_open", "humaneval", "mbpp", "gsm8k", "math", "agieval",
          "bbh")  # fmt: skip


def _row(values: str) -> dict[str, float]:
    """Scores in _TASKS order; "-" where the report has none."""
    return {t: float(v) for t, v in zip(_TASKS, values.split(), strict=True) if v != "-"}


# preset name -> (source, protocol preset, scores in percent)
PUBLISHED: dict[str, tuple[str, str, dict[str, float]]] = {
    "gemma-2b": ("Gemma 1 report, Table 6", "gemma1",
                 _row("42.3 71.4 77.3 49.7 69.4 65.4 65.3 47.8 73.2 42.1 53.2 12.5 22.0 29.2 17.7 11.8 24.2 35.2")),
    "gemma-7b": ("Gemma 1 report, Table 6", "gemma1",
                 _row("64.3 81.2 81.2 51.8 83.2 72.3 71.3 52.8 81.5 53.2 63.4 23.0 32.3 44.4 46.4 24.3 41.7 55.1")),
    "gemma-2-2b": ("Gemma 2 model card", "gemma2",
                   _row("51.3 73.0 77.8 51.9 72.5 70.9 - - 80.1 55.4 59.4 16.7 17.7 29.6 23.9 15.0 30.6 41.9")),
    "gemma-2-9b": ("Gemma 2 model card", "gemma2",
                   _row("71.3 81.9 81.7 53.4 84.2 80.6 - - 88.0 68.4 76.6 29.2 40.2 52.4 68.6 36.6 52.8 68.2")),
    "gemma-2-27b": ("Gemma 2 model card", "gemma2",
                    _row("75.2 86.4 83.2 53.7 84.8 83.7 - - 88.6 71.4 83.7 34.5 51.8 62.6 74.0 42.3 55.1 74.9")),
    "gemma-3-1b": ("Gemma 3 model card", "gemma3",
                   _row("- 62.3 73.8 48.9 63.2 58.2 - - 73.0 38.4 39.8 9.48 - - - - - 28.4")),
    "gemma-3-4b": ("Gemma 3 model card", "gemma3",
                   _row("59.6 77.2 79.6 51.9 72.3 64.7 - - 82.4 56.2 65.8 20.0 36.0 46.0 38.4 24.2 42.1 50.9")),
    "gemma-3-12b": ("Gemma 3 model card", "gemma3",
                    _row("74.5 84.2 81.8 53.4 78.8 74.3 - - 88.3 68.9 78.2 31.4 45.7 60.4 71.0 43.3 57.4 72.6")),
    "gemma-3-27b": ("Gemma 3 model card", "gemma3",
                    _row("78.6 85.6 83.3 54.9 82.4 78.8 - - 89.0 70.6 85.5 36.1 48.8 65.6 82.6 50.0 66.2 77.7")),
}  # fmt: skip


def published_for(preset: str | None) -> dict[str, Any] | None:
    """{"model", "source", "protocol", "scores"} for a preset the reports cover, else None."""
    if preset not in PUBLISHED:
        return None
    source, protocol, scores = PUBLISHED[preset]
    return {"model": preset, "source": source, "protocol": protocol, "scores": dict(scores)}
