"""The task registry: names to "module:Class" strings, imported only when a task is asked for.

Where it sits: `gemmakit eval --tasks a,b` and `run_task("a", ...)` resolve names here. Nothing is
imported or registered as a side effect of importing a module (lm-evaluation-harness#1304 spent
~10 s at start-up indexing every task); adding a task is one line in TASKS.
"""

from __future__ import annotations

import importlib

from gemmakit.eval.tasks.base import EvalError, Task

TASKS: dict[str, str] = {
    "arc_easy": "gemmakit.eval.tasks.arc:ArcEasy",
    "arc_challenge": "gemmakit.eval.tasks.arc:ArcChallenge",
    "hellaswag": "gemmakit.eval.tasks.hellaswag:HellaSwag",
    "winogrande": "gemmakit.eval.tasks.winogrande:WinoGrande",
    "gsm8k": "gemmakit.eval.tasks.gsm8k:GSM8K",
    "boolq": "gemmakit.eval.tasks.boolq:BoolQ",
    "mmlu": "gemmakit.eval.tasks.mmlu:MMLU",
    "piqa": "gemmakit.eval.tasks.piqa:PIQA",
    "siqa": "gemmakit.eval.tasks.siqa:SIQA",
    "commonsense_qa": "gemmakit.eval.tasks.commonsense_qa:CommonsenseQA",
    "openbookqa": "gemmakit.eval.tasks.openbookqa:OpenBookQA",
    "agieval": "gemmakit.eval.tasks.agieval:AGIEval",
    "triviaqa": "gemmakit.eval.tasks.closed_book:TriviaQA",
    "nq_open": "gemmakit.eval.tasks.closed_book:NQOpen",
    "humaneval": "gemmakit.eval.tasks.coding:HumanEval",
    "mbpp": "gemmakit.eval.tasks.coding:MBPP",
    "math": "gemmakit.eval.tasks.minerva_math:MinervaMath",
    "bbh": "gemmakit.eval.tasks.bbh:BBH",
    # safety benchmarks (the reports' "Ethics and safety" tables; toxicity-scored tasks need a scorer)
    "realtoxicityprompts": "gemmakit.eval.tasks.safety_toxicity:RealToxicityPrompts",
    "bold": "gemmakit.eval.tasks.safety_toxicity:BOLD",
    "bold_gender": "gemmakit.eval.tasks.safety_toxicity:BOLDGender",
    "bold_political_ideology": "gemmakit.eval.tasks.safety_toxicity:BOLDPoliticalIdeology",
    "bold_profession": "gemmakit.eval.tasks.safety_toxicity:BOLDProfession",
    "bold_race": "gemmakit.eval.tasks.safety_toxicity:BOLDRace",
    "bold_religious_ideology": "gemmakit.eval.tasks.safety_toxicity:BOLDReligiousIdeology",
    "crows_pairs": "gemmakit.eval.tasks.safety_bias:CrowsPairs",
    "bbq": "gemmakit.eval.tasks.safety_bias:BBQ",
    "bbq_ambig": "gemmakit.eval.tasks.safety_bias:BBQAmbig",
    "bbq_disambig": "gemmakit.eval.tasks.safety_bias:BBQDisambig",
    "winogender": "gemmakit.eval.tasks.safety_bias:Winogender",
    "winobias": "gemmakit.eval.tasks.safety_winobias:WinoBias",
    "winobias_1_2": "gemmakit.eval.tasks.safety_winobias:WinoBias12",
    "winobias_2_2": "gemmakit.eval.tasks.safety_winobias:WinoBias22",
    "winobias_type1_pro": "gemmakit.eval.tasks.safety_winobias:WinoBiasType1Pro",
    "winobias_type1_anti": "gemmakit.eval.tasks.safety_winobias:WinoBiasType1Anti",
    "winobias_type2_pro": "gemmakit.eval.tasks.safety_winobias:WinoBiasType2Pro",
    "winobias_type2_anti": "gemmakit.eval.tasks.safety_winobias:WinoBiasType2Anti",
    "truthfulqa": "gemmakit.eval.tasks.safety_truth:TruthfulQA",
    "toxigen": "gemmakit.eval.tasks.safety_truth:ToxiGen",
}


def get_task(name: str) -> Task:
    """A fresh instance of the task called `name`; EvalError listing the valid names otherwise."""
    if name not in TASKS:
        raise EvalError(f"unknown task {name!r}; expected one of {', '.join(sorted(TASKS))}")
    module, _, cls = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), cls)()
