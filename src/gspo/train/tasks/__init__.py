"""Tasks: where prompts come from and how completions are scored, one file per task.

    base.py       the Task class (prompts, held_out, reward, from_row, eval_metrics), Prompt
    registry.py   the registry behind --task: register(task), get(name), names()
    digitsum.py   the default task (digits that sum to a target), learnable from a random start
    copy.py       copy a 3-letter word
    arith.py      school arithmetic for pretrained chat models, exact rational answers
    wordproblems.py  multi-step school word problems (GSM8K kind), exact answers, arith's reward
    files.py      prompts from --prompts JSONL files and --dataset local data sets

Adding a task is one file with a Task subclass plus its line in registry.py (or a
``register(MyTask())`` from your own code before the command runs).

The data order is a pure function of (seed, position): position ``i`` of the stream is
element ``perm_e[i mod n]`` of the pool, with ``perm_e`` a permutation seeded by
``(seed, e = i // n)``. A resumed run therefore sees exactly the prompts a straight run would.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from gspo.train.rewards import RewardFn, Rewards, load_rewards
from gspo.train.tasks.base import Prompt, Task
from gspo.train.tasks.files import load_dataset_prompts, load_prompts_file
from gspo.train.tasks.registry import TASKS, get, names, register

__all__ = ["TASKS", "Prompt", "Task", "build_task", "get", "held_out_prompts", "names",
           "prompts_at", "register"]  # fmt: skip

POOL_SIZE = 4096  # prompts drawn from a built-in task's generator for the training stream


def build_task(
    *,
    task: str | Task,
    prompts_file: str | None,
    reward: str | Sequence[str] | None,
    eval_size: int,
    seed: int,
    reward_weights: Sequence[float] = (),
    levels: Sequence[int] = (),
    dataset: str | None = None,
    dataset_split: str | None = None,
    prompt_field: str | None = None,
    answer_field: str | None = None,
    env: bool = False,
) -> tuple[list[Prompt], list[Prompt], RewardFn | Rewards]:
    """(training pool, fixed held-out prompts, reward function(s)); ``levels`` picks the
    difficulty of tasks that have levels (arith). The prompts come from ``prompts_file``
    (JSONL), ``dataset`` (a file or a saved data set, its columns chosen by the ``*_field``
    arguments) or else the task itself; the reward is the user's ``reward`` if given, else
    the task's. ``env`` (--env): a file's rows may hold only the environment's fields, its
    ``reset()`` writing the first message (files.task_prompt)."""
    task = get(task)
    specs = [reward] if isinstance(reward, str) else list(reward or ())
    reward_fn = load_rewards(specs, reward_weights) if specs else task.reward
    if dataset is not None:
        rows, held_out = load_dataset_prompts(dataset, task=task, split=dataset_split,
                                              prompt_field=prompt_field,
                                              answer_field=answer_field, env=env)  # fmt: skip
        if held_out is not None:  # the data set's own held-out split
            return rows, held_out[:eval_size], reward_fn
    elif prompts_file is not None:
        rows = load_prompts_file(prompts_file, task, env=env)
    else:
        pool = task.prompts(POOL_SIZE, seed, levels)
        return pool, task.held_out(eval_size, seed, levels), reward_fn
    held = max(1, min(eval_size, len(rows) // 10))  # the file's last 10% (capped) is held out
    return rows[:-held], rows[-held:], reward_fn


def held_out_prompts(task: str | Task, n: int, seed: int,
                     levels: Sequence[int] = ()) -> list[Prompt]:  # fmt: skip
    """The task's fixed held-out prompts: what `gspo train` evaluates and `gspo eval` asks."""
    return get(task).held_out(n, seed, levels)


def prompts_at(pool: Sequence[Prompt], seed: int, start: int, count: int) -> list[Prompt]:
    """Prompts ``start .. start+count-1`` of the endless shuffled stream over ``pool``."""
    n = len(pool)
    out, cache = [], {}
    for i in range(start, start + count):
        epoch = i // n
        if epoch not in cache:
            order = list(range(n))
            random.Random(f"{seed}/{epoch}").shuffle(order)  # str seeds hash deterministically
            cache[epoch] = order
        out.append(pool[cache[epoch][i % n]])
    return out
