"""User rewards: ``--reward module:function`` imported, several summed with weights, and
every batch's values checked (``score``) so that a broken reward stops the run with the
sample named, never with a NaN in the loss.

``reward(prompts, completions, **fields) -> list[float]``: the prompt texts (or chat
messages), the completions, and each field of the prompt rows as a list (gspo.train.tasks).
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

RewardFn = Callable[..., list]


class RewardError(RuntimeError):
    """A reward function failed; the message names the sample and the fix."""


def import_user(flag: str, spec: str):
    """``module:name`` from the current directory or the Python path (as ``python -m`` would:
    the console script alone does not put the directory on the path), for ``--reward`` and
    ``--env``; None when the module has no such name. The error names the flag and what was
    not found."""
    module_name, _, attr = spec.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(
            f"{flag} {spec!r}: cannot import module {module_name!r} ({err}) from {cwd} or the "
            "Python path; run from the directory that holds it, add it to PYTHONPATH, or fix "
            "the name"
        ) from None
    return getattr(module, attr, None)


def import_reward(spec: str) -> RewardFn:
    """The reward function ``module:function`` names (``import_user``)."""
    fn = import_user("--reward", spec)
    if not callable(fn):
        module_name, _, attr = spec.partition(":")
        raise ValueError(f"--reward {spec!r}: module {module_name!r} has no function {attr!r}")
    return fn


@dataclass(frozen=True)
class Rewards:
    """Several reward functions: the reward is ``sum_k weights[k] * fns[k](...)``; ``names``
    (the function names, or the full ``module:function`` where two share a name) key each
    one's own values in the metrics."""

    fns: tuple[RewardFn, ...]
    weights: tuple[float, ...]
    names: tuple[str, ...]


def load_rewards(specs: Sequence[str], weights: Sequence[float]) -> RewardFn | Rewards:
    """One imported function as it is; several as ``Rewards`` (weights default to 1)."""
    fns = tuple(import_reward(spec) for spec in specs)
    weights = tuple(float(w) for w in weights) or (1.0,) * len(fns)
    if len(fns) == 1 and weights == (1.0,):
        return fns[0]
    short = [spec.partition(":")[2] for spec in specs]
    names = tuple(s if short.count(s) == 1 else spec for s, spec in zip(short, specs, strict=True))
    return Rewards(fns, weights, names)


# ---------------------------------------------------------------- scoring


def _first_failing(reward_fn, texts, completions, fields) -> int | None:
    """Re-run the reward one sample at a time to name the sample that raises."""
    for i in range(len(texts)):
        one = {k: [v[i]] for k, v in fields.items()}
        try:
            reward_fn([texts[i]], [completions[i]], **one)
        except Exception:  # noqa: BLE001
            return i
    return None


class Scores(list):
    """The reward of each completion (a list of floats), with ``parts``: each reward
    function's own values by name when there are several (else empty)."""

    def __init__(self, values, parts: dict[str, list[float]] | None = None) -> None:
        super().__init__(values)
        self.parts = parts or {}


def score(
    reward_fn: RewardFn | Rewards, prompts: Sequence[dict], completions: Sequence[str]
) -> Scores:
    """Score every completion; several reward functions are each checked alone and summed
    with their weights."""
    if not isinstance(reward_fn, Rewards):
        return Scores(_score_one(reward_fn, prompts, completions))
    parts = {name: _score_one(fn, prompts, completions)
             for name, fn in zip(reward_fn.names, reward_fn.fns, strict=True)}  # fmt: skip
    total = [
        math.fsum(w * v for w, v in zip(reward_fn.weights, values, strict=True))
        for values in zip(*parts.values(), strict=True)
    ]
    return Scores(total, parts)


def _score_one(
    reward_fn: RewardFn, prompts: Sequence[dict], completions: Sequence[str]
) -> list[float]:
    """Call the reward once for the batch and check its answer; raise RewardError naming the
    offending sample (index and prompt) on an exception, a wrong count or a non-finite value."""
    texts = [p["prompt"] for p in prompts]
    keys = sorted({k for p in prompts for k in p if k != "prompt"})
    fields = {k: [p.get(k) for p in prompts] for k in keys}
    name = getattr(reward_fn, "__qualname__", repr(reward_fn))
    try:
        values = reward_fn(texts, list(completions), **fields)
    except Exception as err:  # noqa: BLE001 - any user error must stop the run with context
        i = _first_failing(reward_fn, texts, completions, fields)
        if i is None:
            where = f"the batch of {len(texts)} (no single sample fails alone)"
        else:
            where = f"sample index {i} (prompt {texts[i]!r}, completion {completions[i]!r})"
        raise RewardError(
            f"reward function {name} raised {type(err).__name__}: {err} on {where}; "
            "fix the reward function or the prompt fields"
        ) from err
    try:
        values = list(values)
    except TypeError:
        raise RewardError(f"reward function {name} returned {type(values).__name__}, "
                          "not a list of floats") from None  # fmt: skip
    if len(values) != len(texts):
        raise RewardError(
            f"reward function {name} returned {len(values)} values for {len(texts)} "
            f"completions (sample index 0 has prompt {texts[0]!r}); return one float each"
        )
    out = []
    for i, value in enumerate(values):
        value = finite(value)
        if value is None:
            raise RewardError(
                f"reward function {name} returned {values[i]!r} for sample index {i} "
                f"(prompt {texts[i]!r}, completion {completions[i]!r}); rewards must be "
                "finite floats"
            )
        out.append(value)
    return out


def finite(value) -> float | None:
    """``value`` as a float when it is a finite number, else None: what every reward, a
    function's or an environment's, must be."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None
