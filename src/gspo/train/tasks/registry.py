"""The task registry: ``--task``'s choices are its keys (read when a parser is built, so a
task registered at run time is a choice too)."""

from __future__ import annotations

from gspo.train.tasks.arith import Arith
from gspo.train.tasks.base import Task
from gspo.train.tasks.copy import Copy
from gspo.train.tasks.digitsum import DigitSum
from gspo.train.tasks.wordproblems import WordProblems

TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Make ``task`` a choice of ``--task`` (by its ``name``); returns it."""
    if not isinstance(task, Task) or not task.name:
        raise TypeError("register a gspo.train.tasks.Task instance with a name")
    TASKS[task.name] = task
    return task


def names() -> tuple[str, ...]:
    return tuple(TASKS)


def get(task: str | Task) -> Task:
    """The registered task of that name (a Task passes through)."""
    if isinstance(task, Task):
        return task
    if task not in TASKS:
        raise ValueError(f"--task {task!r} is not a task; use one of {list(TASKS)}")
    return TASKS[task]


for _task in (DigitSum(), Copy(), Arith(), WordProblems()):
    register(_task)
