"""What a task is: where prompts come from and how completions are scored.

A prompt is a dict ``{"prompt": str | list[message], **fields}``: a text, or chat messages
``[{"role": ..., "content": ...}]`` (TRL's conversational format) that the tokenizer's chat
template renders; the fields go to the reward as lists, one value per completion:
``reward(prompts, completions, **fields) -> list[float]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Prompt = dict  # {"prompt": str | list[{"role": str, "content": str}], **fields}
RewardFn = Callable[..., list]

# Held-out prompts are drawn with this offset added to the seed, independently of the pool.
HELD_OUT_SEED_OFFSET = 1_000_003


class Task:
    """A built-in task. Subclass it, set ``name``, write ``prompts`` and ``reward``, and
    register an instance (``gspo.train.tasks.register``): it is then a choice of
    ``gspo train --task`` and ``gspo eval --task``.

    ``levels``: the difficulty levels ``--task-levels`` may pick (none: the task has none).
    ``question_field``: set when the task reads a user's rows itself (``--prompts`` /
    ``--dataset`` without ``--reward``): the column that holds the question, which
    ``from_row`` turns into a prompt.
    ``max_new_tokens``: room for a complete answer to this task's questions, in tokens:
    `gspo eval`'s ``--max-new-tokens`` when neither the flag nor a training config gives
    one (each sampled token costs a decoding step: 256 for a 6-token answer is hours).
    """

    name: str = ""
    levels: tuple[int, ...] = ()
    question_field: str | None = None
    max_new_tokens: int = 256  # a free-form answer (a user's task)

    def prompts(self, n: int, seed: int, levels: Sequence[int] = ()) -> list[Prompt]:
        """``n`` training prompts, reproducible from ``seed``."""
        raise NotImplementedError

    def held_out(self, n: int, seed: int, levels: Sequence[int] = ()) -> list[Prompt]:
        """The fixed held-out prompts (`gspo train` evaluates them, `gspo eval` asks them):
        by default drawn like the training prompts with an offset seed."""
        return self.prompts(n, seed + HELD_OUT_SEED_OFFSET, levels)

    def reward(self, prompts: Sequence, completions: Sequence[str], **fields) -> list[float]:
        raise NotImplementedError

    def from_row(self, row: dict, where: str) -> Prompt:
        """A user's row as a prompt (only for tasks with a ``question_field``); ``where``
        starts an error message."""
        return row

    def eval_metrics(self, prompt: Prompt, completion: str) -> dict[str, bool]:
        """Per-completion checks `gspo eval` reports beside accuracy (e.g. the format)."""
        return {}
