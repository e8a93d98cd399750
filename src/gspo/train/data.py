"""Checks on the data before the first step: prompts that fit the model, and warnings for
settings that do not mean what they seem to.

Prompt lengths are counted as the model sees them (chat template and ``--system-prompt``
included). Too-long prompts are *dropped*, not truncated from the left: a cut prompt asks
another question than the one its reward fields (``answer``, tests, ...) were written for,
and left-truncation would cut the chat template's opening and the system message first.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from gspo.train.rewards import Prompt
from gspo.train.rollout import encode_prompts


class TrainWarning(UserWarning):
    """A setting that runs, but probably not as the user meant (``gspo train`` prints it
    as one line at start)."""


def position_limit(model) -> int | None:
    """The most positions the model has (None if its config does not say)."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def prompt_lengths(tokenizer, prompts: Sequence[Prompt], system_prompt: str | None) -> list[int]:
    """Tokens of each prompt as the rollout engines feed it (rollout.encode_prompts)."""
    if not prompts:
        return []
    return [len(ids) for ids in encode_prompts(tokenizer, prompts, system_prompt)]


def fit_prompts(
    pool: list[Prompt], held_out: list[Prompt], tokenizer, model, config
) -> tuple[list[Prompt], list[Prompt], int]:
    """(pool, held_out, number dropped): prompts over ``config.max_prompt_tokens`` are
    dropped; every prompt left, plus ``config.max_new_tokens``, must fit the model's
    positions, else a ValueError names the longest prompt and the fixes."""
    limit = position_limit(model)
    cap = config.max_prompt_tokens
    kept, dropped, longest = [], 0, (0, None)
    for part in (pool, held_out):
        lengths = prompt_lengths(tokenizer, part, config.system_prompt)
        keep = [p for p, n in zip(part, lengths, strict=True) if cap is None or n <= cap]
        dropped += len(part) - len(keep)
        kept.append(keep)
        for p, n in zip(part, lengths, strict=True):
            if (cap is None or n <= cap) and n > longest[0]:
                longest = (n, p["prompt"])
    pool, held_out = kept
    if not pool or not held_out:
        raise ValueError(
            f"--max-prompt-tokens {cap} drops {dropped} prompts and leaves "
            f"{len(pool)} to train on and {len(held_out)} held out; raise it (or shorten them)"
        )
    if limit is not None and longest[0] + config.max_new_tokens > limit:
        text = repr(longest[1])
        text = text if len(text) <= 80 else text[:77] + "..."
        room = limit - config.max_new_tokens
        fix = (f"--max-prompt-tokens {room} drops longer prompts, or shorten the prompts, or "
               "lower --max-new-tokens" if room > 0 else
               f"lower --max-new-tokens below {limit}")  # fmt: skip
        raise ValueError(
            f"a prompt of {longest[0]} tokens ({text}) plus --max-new-tokens "
            f"{config.max_new_tokens} exceeds the model's {limit} positions; {fix}"
        )
    return pool, held_out, dropped


def start_warnings(config, pool_size: int, dropped: int = 0) -> None:
    """Settings that run but do not do what their names suggest, and the prompts dropped by
    --max-prompt-tokens (rank 0 calls this, so a run warns once)."""
    if dropped:
        warn(f"--max-prompt-tokens {config.max_prompt_tokens}: dropped {dropped} longer "
             f"prompts ({pool_size} left to train on)")  # fmt: skip
    if pool_size < config.prompts_per_step:
        warn(f"only {pool_size} training prompts for --prompts-per-step "
             f"{config.prompts_per_step}: the same prompt appears more than once in a step "
             "(as separate groups); lower --prompts-per-step or add prompts")  # fmt: skip
    if config.steps < config.warmup_steps:
        peak = config.lr * config.steps / config.warmup_steps
        warn(f"--steps {config.steps} < --warmup-steps {config.warmup_steps}: the learning "
             f"rate stops at {peak:.3g} and never reaches --lr {config.lr:g}; lower "
             "--warmup-steps")  # fmt: skip


def warn(message: str) -> None:
    warnings.warn(message, TrainWarning, stacklevel=3)
