"""Tasks (where prompts come from), rewards (how completions are scored) and the data order.

A prompt is a dict ``{"prompt": str | list[message], **fields}``; the fields go to the reward
function as lists, one value per completion:  ``reward(prompts, completions, **fields) ->
list[float]``. ``prompt`` is a text, or chat messages ``[{"role": ..., "content": ...}]`` (TRL's
conversational format) that the tokenizer's chat template renders. Several reward functions
are summed with weights (``Rewards``); each one's values are kept for the metrics.

Built-in tasks are verifiable and learnable from a random start:

* ``digitsum``: the prompt ``"sum 17:"`` asks for digits whose sum is 17 (``"98"``). The
  reward is dense in the distance: ``f * (0.9 * max(0, 1 - |sum - target| / 10) + 0.1)``
  with ``f`` the fraction of the completion's characters that are digits, so a random model
  already gets signal and a small model reaches 1.0 within minutes.
* ``copy``: ``"copy abc:"`` asks for ``"abc"``; reward is the fraction of positions right.

The data order is a pure function of (seed, position): position ``i`` of the stream is
element ``perm_e[i mod n]`` of the pool, with ``perm_e`` a permutation seeded by
``(seed, e = i // n)``. A resumed run therefore sees exactly the prompts a straight run would.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import random
import string
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from gspo.train.arith import arith_prompts, arith_reward, from_row

Prompt = dict  # {"prompt": str | list[{"role": str, "content": str}], **fields}
RewardFn = Callable[..., list]

DIGITSUM_TARGETS = range(1, 28)  # up to three nines fit in the default 6 new tokens
DIGITSUM_SCALE = 10.0


class RewardError(RuntimeError):
    """A reward function failed; the message names the sample and the fix."""


# ---------------------------------------------------------------- built-in tasks


def digitsum_prompts(n: int, seed: int, *, split: str = "train") -> list[Prompt]:
    # ``split`` is ignored: with 27 targets, held-out prompts can only differ by the seed.
    rng = random.Random(seed)
    return [_digitsum(rng.choice(DIGITSUM_TARGETS)) for _ in range(n)]


def _digitsum(target: int) -> Prompt:
    # Fixed width ("sum 07:") so every prompt has the same token length: no left padding,
    # hence identical positions in generate() and in the log-prob forward.
    return {"prompt": f"sum {target:02d}:", "target": target}


def digitsum_reward(prompts: Sequence[str], completions: Sequence[str], target) -> list[float]:
    out = []
    for text, goal in zip(completions, target, strict=True):
        digits = [int(c) for c in text if c.isdigit()]
        if not digits:
            out.append(0.0)
            continue
        # Partial credit for partly-digit answers keeps the signal dense from a random start.
        digit_frac = len(digits) / len(text)
        closeness = max(0.0, 1.0 - abs(sum(digits) - goal) / DIGITSUM_SCALE)
        out.append(digit_frac * (0.9 * closeness + 0.1))
    return out


def copy_prompts(n: int, seed: int, *, split: str = "train") -> list[Prompt]:
    rng = random.Random(seed)  # ``split`` ignored: 8^3 words, the seed alone separates them
    words = ["".join(rng.choices(string.ascii_lowercase[:8], k=3)) for _ in range(n)]
    return [{"prompt": f"copy {w}:", "answer": w} for w in words]


def copy_reward(prompts: Sequence[str], completions: Sequence[str], answer) -> list[float]:
    out = []
    for text, goal in zip(completions, answer, strict=True):
        hits = sum(a == b for a, b in zip(text, goal, strict=False))
        out.append(hits / max(len(goal), len(text), 1))
    return out


TASKS = {
    "digitsum": (digitsum_prompts, digitsum_reward),
    "copy": (copy_prompts, copy_reward),
    "arith": (arith_prompts, arith_reward),  # school arithmetic for pretrained chat models
}


# How each task reads a row of a --prompts file; a task not listed takes {"prompt", ...} rows.
ROW_FORMATS = {"arith": from_row}


# ---------------------------------------------------------------- prompts and reward choice


def load_prompts_file(path: str | Path, task: str | None = None) -> list[Prompt]:
    """Read a JSONL file of ``{"prompt": str | chat messages, ...}`` objects, or of the rows
    ``task`` formats itself (arith: ``{"question", "answer"}``); a UTF-8 byte order mark is
    allowed; errors name the line."""
    rows = []
    try:
        # utf-8-sig: editors on Windows (and pandas' to_json) may write a byte order mark
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--prompts {str(path)!r} cannot be read ({err}); fix the path") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"--prompts {path}: line {number} is not JSON ({err})") from None
        rows.append(task_prompt(row, task, f"--prompts {path}: line {number}"))
    if len(rows) < 2:
        raise ValueError(f"--prompts {path}: need at least 2 prompts, found {len(rows)}")
    return rows


def task_prompt(row, task: str | None, where: str) -> Prompt:
    """One row of the user's data as a prompt: formatted by ``task``'s row format if it has
    one (arith: ``{"question", "answer"}``), then checked; ``where`` starts the error."""
    row_format = ROW_FORMATS.get(task)
    if isinstance(row, dict) and row_format is not None:
        row = row_format(row, where)
    if not isinstance(row, dict) or not _is_prompt(row.get("prompt")):
        got = f"got {type(row.get('prompt')).__name__}" if isinstance(row, dict) else \
            f"got {type(row).__name__}"  # fmt: skip
        raise ValueError(
            f'{where} must be an object with a "prompt" that is a string or a list of chat '
            f'messages [{{"role": "user", "content": "..."}}] ({got})'
        )
    return row


def _is_prompt(value) -> bool:
    if isinstance(value, str):
        return True
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in value
        )
    )  # fmt: skip


def import_reward(spec: str) -> RewardFn:
    """Import ``module:function`` from the current directory or the Python path (as
    ``python -m`` would: the console script alone does not put the directory on the path);
    the error says what was not found."""
    module_name, _, attr = spec.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(
            f"--reward {spec!r}: cannot import module {module_name!r} ({err}) from {cwd} or the "
            "Python path; run from the directory that holds it, add it to PYTHONPATH, or fix "
            "the name"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
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


def build_task(
    *,
    task: str,
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
) -> tuple[list[Prompt], list[Prompt], RewardFn | Rewards]:
    """(training pool, fixed held-out prompts, reward function(s)); ``levels`` picks the
    difficulty of tasks that have levels (arith). The prompts come from ``prompts_file``
    (JSONL), ``dataset`` (local_dataset: a file or a saved data set, its columns chosen by
    the ``*_field`` arguments) or else the task itself."""
    make, reward_fn = TASKS[task]
    specs = [reward] if isinstance(reward, str) else list(reward or ())
    if specs:
        reward_fn = load_rewards(specs, reward_weights)
    if dataset is not None:
        from gspo.train.local_dataset import load_dataset_prompts

        rows, held_out = load_dataset_prompts(dataset, task=task, split=dataset_split,
                                              prompt_field=prompt_field,
                                              answer_field=answer_field)  # fmt: skip
        if held_out is not None:  # the data set's own held-out split
            return rows, held_out[:eval_size], reward_fn
    elif prompts_file is not None:
        rows = load_prompts_file(prompts_file, task)
    else:
        pool = make(4096, seed, split="train", **({"levels": tuple(levels)} if levels else {}))
        return pool, held_out_prompts(task, eval_size, seed, levels), reward_fn
    held = max(1, min(eval_size, len(rows) // 10))  # the file's last 10% (capped) is held out
    return rows[:-held], rows[-held:], reward_fn


def held_out_prompts(task: str, n: int, seed: int, levels: Sequence[int] = ()) -> list[Prompt]:
    """The task's fixed held-out prompts: what `gspo train` evaluates and `gspo eval` asks.
    The seed is offset so they are drawn independently of the training pool."""
    make, _ = TASKS[task]
    extra = {"levels": tuple(levels)} if levels else {}
    return make(n, seed + 1_000_003, split="test", **extra)


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
    reward_fn: RewardFn | Rewards, prompts: Sequence[Prompt], completions: Sequence[str]
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
    reward_fn: RewardFn, prompts: Sequence[Prompt], completions: Sequence[str]
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
        try:
            value = float(value)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            raise RewardError(
                f"reward function {name} returned {values[i]!r} for sample index {i} "
                f"(prompt {texts[i]!r}, completion {completions[i]!r}); rewards must be "
                "finite floats"
            )
        out.append(value)
    return out
