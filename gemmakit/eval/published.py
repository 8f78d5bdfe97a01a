"""The Gemma reports' published pretrained-model scores, to print beside measured ones.

Where it sits: read by `eval.report` only. Numbers are copied from shared/reference/
ecosystem-evaluation-safety.md §3.1-3.2 (Gemma 1 report Table 6; Gemma 2 and Gemma 3 model cards) and
§3.4 (safety: Gemma 1.0 model card, Gemma 1 report Table 8 for 1.1 IT, Gemma 2 IT model card),
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


# The safety rows (shared/reference §3.4), as the reports print them: RealToxicity is the average
# toxicity x100 (lower is better), TruthfulQA is MC2, BBQ and WinoBias are one row per subtask. BOLD's
# metric is not stated in the reports; our `bold` measures toxicity, so its difference column is not a
# like-for-like comparison. Gemma 2's card lists the instruction-tuned models only (and no BOLD).
_SAFETY = ("realtoxicityprompts", "bold", "crows_pairs", "bbq_ambig", "bbq_disambig", "winogender",
           "truthfulqa", "winobias_1_2", "winobias_2_2", "toxigen")  # fmt: skip


def _row(values: str, tasks: tuple[str, ...] = _TASKS) -> dict[str, float]:
    """Scores in `tasks` order; "-" where the report has none."""
    return {t: float(v) for t, v in zip(tasks, values.split(), strict=True) if v != "-"}


def _safety(values: str) -> dict[str, float]:
    return _row(values, _SAFETY)


# preset name -> (source, protocol preset, scores in percent)
PUBLISHED: dict[str, tuple[str, str, dict[str, float]]] = {
    "gemma-2b": ("Gemma 1 report, Table 6; safety rows: Gemma 1.0 model card", "gemma1",
                 _row("42.3 71.4 77.3 49.7 69.4 65.4 65.3 47.8 73.2 42.1 53.2 12.5 22.0 29.2 17.7 11.8 24.2 35.2")
                 | _safety("6.86 45.57 45.82 62.58 54.62 51.25 44.84 56.12 91.10 29.77")),
    "gemma-7b": ("Gemma 1 report, Table 6; safety rows: Gemma 1.0 model card", "gemma1",
                 _row("64.3 81.2 81.2 51.8 83.2 72.3 71.3 52.8 81.5 53.2 63.4 23.0 32.3 44.4 46.4 24.3 41.7 55.1")
                 | _safety("7.90 49.08 51.33 92.54 71.99 54.17 31.81 59.09 92.23 39.59")),
    # Gemma 1.1 IT: safety only (report Table 8); the same shapes as gemma-2b/7b, so chosen by --preset
    "gemma-1.1-2b": ("Gemma 1 report, Table 8 (Gemma 1.1 IT)", "gemma1",
                     _safety("7.03 47.76 45.89 58.97 53.9 50.14 44.24 55.93 89.46 29.64")),
    "gemma-1.1-7b": ("Gemma 1 report, Table 8 (Gemma 1.1 IT)", "gemma1",
                     _safety("8.04 45.2 49.67 86.06 85.08 57.64 45.34 59.22 89.2 38.75")),
    "gemma-2-2b": ("Gemma 2 model card; safety rows: IT model", "gemma2",
                   _row("51.3 73.0 77.8 51.9 72.5 70.9 - - 80.1 55.4 59.4 16.7 17.7 29.6 23.9 15.0 30.6 41.9")
                   | _safety("8.16 - 37.67 83.20 69.31 52.91 43.72 59.28 88.57 48.32")),
    "gemma-2-9b": ("Gemma 2 model card; safety rows: IT model", "gemma2",
                   _row("71.3 81.9 81.7 53.4 84.2 80.6 - - 88.0 68.4 76.6 29.2 40.2 52.4 68.6 36.6 52.8 68.2")
                   | _safety("8.25 - 37.47 88.58 82.67 79.17 50.27 78.09 95.32 39.30")),
    "gemma-2-27b": ("Gemma 2 model card; safety rows: IT model", "gemma2",
                    _row("75.2 86.4 83.2 53.7 84.8 83.7 - - 88.6 71.4 83.7 34.5 51.8 62.6 74.0 42.3 55.1 74.9")
                    | _safety("8.84 - 36.67 85.99 86.94 77.22 51.60 81.94 97.22 38.42")),
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
