"""Protocol presets: per task, how many few-shot examples and which metric is the headline number.

Where it sits: `tasks.run.run_task(task, lm, data_dir, protocol)` looks the task up here; the tasks
themselves know only lm-eval's defaults. Sources: shared/reference/ecosystem-evaluation-safety.md
§3.2 (Gemma 1 report Table 6, Gemma 2 and Gemma 3 model cards). "lm-eval" means lm-evaluation-harness
0.4.13's own defaults for every task (its YAML's num_fewshot), which the agreement test relies on.

Key trade-off: explicit tables, no inheritance between generations, so every reported number traces
to one row here, at the price of repeated rows. Where a report leaves the shot count unstated ("n/s")
we use lm-eval's default and say so in the row's note; the headline metric is never stated in the
reports (acc vs acc_norm), so it follows lm-eval / Open LLM Leaderboard conventions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from gemmakit.eval.tasks.base import EvalError, Task


@dataclass(frozen=True)
class TaskProtocol:
    num_fewshot: int  # examples before the evaluated question
    metric: str  # the headline metric, a key of the task's `metrics`
    note: str = ""  # the source of these settings, or what the report leaves unstated


@dataclass(frozen=True)
class Protocol:
    name: str  # "gemma1", "gemma2", "gemma3" or "lm-eval"
    tasks: Mapping[str, TaskProtocol] = field(default_factory=dict)  # task name -> settings
    task_defaults: bool = False  # tasks not in `tasks` use their lm-eval defaults instead of an error
    fewshot_seed: int = 1234  # lm-eval's default fewshot_random_seed: one random.Random per task run
    max_gen_tokens: int | None = None  # overrides every generative task's budget (None: lm-eval's 256)

    def for_task(self, task: Task) -> TaskProtocol:
        """The settings for `task`; EvalError if this protocol does not cover it."""
        if task.name in self.tasks:
            return self.tasks[task.name]
        if self.task_defaults:
            return TaskProtocol(task.default_fewshot, task.primary_metric, "lm-eval 0.4.13 default")
        covered = ", ".join(sorted(self.tasks))
        raise EvalError(f"protocol {self.name!r} has no settings for task {task.name!r}; it covers {covered}")


NS = "shots not stated in the report; lm-eval default"
# The safety benchmarks (Gemma 1.1 report Table 8, the Gemma 1.0 and Gemma 2 model cards): only BBQ
# Ambig states its shots (1-shot); "top-1" = accuracy of the most likely choice. BOLD and WinoBias are
# our own protocols (lm-eval has neither); RealToxicity and BOLD are scored by the pluggable classifier.
SAFETY = {
    "realtoxicityprompts": (0, "toxicity", "average toxicity, our classifier instead of Perspective; " + NS),
    "bold": (0, "toxicity", "our protocol (not in lm-eval); the report's BOLD metric is not stated"),
    "crows_pairs": (0, "pct_stereotype", "top-1; " + NS),
    "bbq_ambig": (1, "acc", "1-shot, top-1"),
    "bbq_disambig": (0, "acc", "top-1; " + NS),
    "winogender": (0, "acc", "top-1; " + NS),
    "truthfulqa": (0, "mc2", "MC2 (lm-eval's fixed 6-question QA preamble)"),
    "winobias_1_2": (0, "acc", "our protocol (not in lm-eval); " + NS),
    "winobias_2_2": (0, "acc", "our protocol (not in lm-eval); " + NS),
    "toxigen": (0, "acc", NS),
}


def _table(rows: dict[str, tuple[int, str, str]]) -> Mapping[str, TaskProtocol]:
    return MappingProxyType({task: TaskProtocol(*row) for task, row in rows.items()})


# fmt: off
PROTOCOLS: dict[str, Protocol] = {
    # Gemma 1 report, Table 6. ARC: "Mistral methodology" (0-shot per the Mistral paper, unverified).
    "gemma1": Protocol("gemma1", _table({
        "arc_easy": (0, "acc_norm", "n/s (Mistral methodology); " + NS),
        "arc_challenge": (0, "acc_norm", "n/s (Mistral methodology); " + NS),
        "hellaswag": (0, "acc_norm", "0-shot"),
        "winogrande": (0, "acc", "partial scoring; " + NS),
        "boolq": (0, "acc", "0-shot"),
        "gsm8k": (5, "exact_match_strict", "maj@1 = one greedy answer; " + NS),
        "mmlu": (5, "acc", "5-shot, top-1"),
        "piqa": (0, "acc_norm", "0-shot"),
        "siqa": (0, "acc", "0-shot"),
        "commonsense_qa": (7, "acc", "7-shot (Mistral methodology)"),
        "openbookqa": (0, "acc_norm", "n/s; " + NS),
        "triviaqa": (5, "exact_match", "5-shot"),
        "nq_open": (5, "exact_match", "5-shot"),
        "agieval": (0, "acc", "n/s (Mistral methodology: 3-5-shot English MC, unverified); " + NS),
        "humaneval": (0, "pass@1", "pass@1, one greedy sample; " + NS),
        "mbpp": (3, "pass@1", "3-shot"),
        "math": (4, "exact_match", "4-shot (Minerva prompt and answer check)"),
        "bbh": (3, "exact_match", "n/s (Mistral methodology: 3-shot, CoT unverified); lm-eval's 3-shot CoT; " + NS),
        **SAFETY,
    })),
    # Gemma 2 model card.
    "gemma2": Protocol("gemma2", _table({
        "arc_easy": (0, "acc_norm", "0-shot"),
        "arc_challenge": (25, "acc_norm", "25-shot"),
        "hellaswag": (10, "acc_norm", "10-shot"),
        "winogrande": (0, "acc", "partial score; " + NS),
        "boolq": (0, "acc", "0-shot"),
        "gsm8k": (5, "exact_match_strict", "5-shot maj@1"),
        "mmlu": (5, "acc", "5-shot, top-1"),
        "piqa": (0, "acc_norm", "0-shot"),
        "siqa": (0, "acc", "0-shot"),
        "triviaqa": (5, "exact_match", "5-shot"),
        "nq_open": (5, "exact_match", "5-shot"),
        "agieval": (3, "acc", "3-5-shot; 3 fixed same-subset examples (ours: lm-eval cannot few-shot AGIEval)"),
        "humaneval": (0, "pass@1", "pass@1; " + NS),
        "mbpp": (3, "pass@1", "3-shot"),
        "math": (4, "exact_match", "4-shot (Minerva)"),
        "bbh": (3, "exact_match", "\"BIG-Bench\" 3-shot CoT"),
        **SAFETY,
    })),
    # Gemma 3 model card. GSM8K 8-shot is probably chain-of-thought with fixed exemplars (lm-eval's
    # gsm8k_cot); the card does not say, so this samples 8 training examples in the gsm8k format.
    "gemma3": Protocol("gemma3", _table({
        "arc_easy": (0, "acc_norm", "0-shot"),
        "arc_challenge": (25, "acc_norm", "25-shot"),
        "hellaswag": (10, "acc_norm", "10-shot"),
        "winogrande": (5, "acc", "5-shot, partial scoring"),
        "boolq": (0, "acc", "0-shot"),
        "gsm8k": (8, "exact_match_strict", "8-shot (CoT not stated)"),
        "mmlu": (5, "acc", "5-shot"),
        "piqa": (0, "acc_norm", "0-shot"),
        "siqa": (0, "acc", "0-shot"),
        "triviaqa": (5, "exact_match", "5-shot"),
        "nq_open": (5, "exact_match", "5-shot"),
        "agieval": (3, "acc", "3-5-shot; 3 fixed same-subset examples (ours: lm-eval cannot few-shot AGIEval)"),
        "humaneval": (0, "pass@1", "0-shot"),
        "mbpp": (3, "pass@1", "3-shot"),
        "math": (4, "exact_match", "4-shot (Minerva)"),
        "bbh": (3, "exact_match", "few-shot (count not stated); lm-eval's 3-shot CoT"),
    })),
    "lm-eval": Protocol("lm-eval", task_defaults=True),
}
# fmt: on


def get_protocol(name: str) -> Protocol:
    """The preset called `name`; EvalError listing the valid names otherwise."""
    try:
        return PROTOCOLS[name]
    except (KeyError, TypeError):
        raise EvalError(f"unknown protocol {name!r}; expected one of {sorted(PROTOCOLS)}") from None
