"""Benchmarks: the task framework, the tasks, protocol presets and `run_task`.

Where it sits: between the data files on disk and `eval.runner`/the CLI; tasks talk to models only
through `eval.lm.LM`. `TASKS` is an explicit lazy registry: a task module is imported when the task
is first asked for, never as a side effect of importing this package.
"""

from gemmakit.eval.tasks.base import EvalError, MultipleChoiceTask, Task, read_rows
from gemmakit.eval.tasks.protocols import PROTOCOLS, Protocol, TaskProtocol, get_protocol
from gemmakit.eval.tasks.registry import TASKS, get_task
from gemmakit.eval.tasks.run import SampleLog, TaskResult, run_task, sample_fewshot

__all__ = [
    "PROTOCOLS",
    "TASKS",
    "EvalError",
    "MultipleChoiceTask",
    "Protocol",
    "SampleLog",
    "Task",
    "TaskProtocol",
    "TaskResult",
    "get_protocol",
    "get_task",
    "read_rows",
    "run_task",
    "sample_fewshot",
]
