"""The objective registry: every value of ``gspo_loss(variant=...)`` and ``gspo train --loss``.

One module per objective in this package (``gspo/objectives/<name>.py``) builds an
``Objective`` record and calls ``register``; this module finds those modules by listing the
package's directory, so adding an objective touches no other file (docs/objectives.md, "Adding
an objective"). Pure Python: listing the names or checking a config imports no torch, and a
record's ``loss`` imports torch only when called.

Everything else reads the records: ``gspo_loss`` (dispatch, option checks, which advantages
it takes, its divisor), the trainer's config (``--loss`` choices, defaults, refusals),
``--compare``, micro-batch metric merging (``token_metrics``) and ``gspo objective``.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# options gspo_loss takes for every objective, besides each objective's own (the off-policy
# sequence mask of DeepSeek-V3.2, gspo.loss)
COMMON_OPTIONS: Mapping[str, str] = {
    "seq_mask_delta": "drop a sequence with negative advantage whose mean log(pi_old / pi) "
                      "exceeds this (DeepSeek-V3.2's off-policy sequence mask); none = off",
}  # fmt: skip


@dataclass(frozen=True)
class Inputs:
    """What ``gspo_loss`` hands an objective's ``loss``, checked and laid out.

    layout: gspo.masking.Layout (padded [B,T] or packed [N]); logp: the policy's log-probs
    as given (any float dtype, garbage on masked slots); log_ratio: logp - logp_old in the
    compute dtype, 0 on masked slots; seq_log_ratio [B]: its mean per sequence; adv: [B], or
    per token (the shape of logp, selected) where the objective takes them; params: from the
    objective's ``resolve``; bound: MAX_LOG_RATIO; divisor: the number of sequences (int), or
    for ``divisor == "tokens"`` the number of tokens (int or a 0-dim tensor); dtype: the
    compute dtype.
    """

    layout: Any
    logp: Any
    logp_old: Any
    log_ratio: Any
    seq_log_ratio: Any
    adv: Any
    params: dict
    bound: float
    divisor: Any
    dtype: Any


@dataclass(frozen=True)
class Objective:
    """One objective: its batched loss, its options and what the trainer must know of it.

    name: the value of ``variant=`` / ``--loss``. summary: one line for ``--loss``'s help.
    loss: ``Inputs -> (loss, metrics)``, the loss ``-L`` (0-dim) and detached metrics (its
    own and the ratio statistics; gspo_loss adds the advantage statistics and approx_kl).
    options: its keyword options and their defaults (None: unset, the objective decides).
    resolve: ``(given options, max_log_ratio) -> params`` with defaults filled in and each
    value checked (a ValueError / TypeError names the option). per_token_advantages: it
    takes advantages [B,T] / [N] as well as [B]. divisor: "sequences" (L is a mean over
    sequences: ``num_sequences``) or "tokens" (over all valid tokens: ``num_tokens``).
    token_metrics: its metrics that are means over tokens (micro-batches merge them weighted
    by tokens, the others by sequences). trainer_defaults: the values ``gspo train`` gives
    options it is not given (the default run's tuning). why_not: why an option of another
    objective does not apply here (a refusal names it). reference: the pure-Python terms
    function in gspo.reference (``gspo objective --loss``; None for the sequence objective's
    own path). explain: ``gspo objective --explain``'s extra columns, (header, TokenTerms
    field or None for logp_t); formula: what each sequence's line shows; total: how L is
    formed from the terms. rank: the order of ``--loss``'s choices.
    """

    name: str
    summary: str
    loss: Callable
    options: Mapping[str, float | None]
    resolve: Callable[[dict, float], dict]
    per_token_advantages: bool = False
    divisor: str = "sequences"
    token_metrics: frozenset = frozenset()
    trainer_defaults: Mapping[str, float] = field(default_factory=dict)
    why_not: Mapping[str, str] = field(default_factory=dict)
    reference: Callable | None = None
    explain: tuple = ()
    formula: str = "L_i"
    total: str = "mean_i L_i"
    rank: int = 100


_REGISTRY: dict[str, Objective] = {}
_LOADED = False


def register(objective: Objective) -> Objective:
    """Add ``objective`` (its module calls this when imported); a name is registered once."""
    if objective.divisor not in ("sequences", "tokens"):
        raise ValueError(f"{objective.name}: divisor must be 'sequences' or 'tokens'")
    if objective.name in _REGISTRY:  # a module runs once, so a second one is a name clash
        raise ValueError(f"objective {objective.name!r} is registered twice")
    _REGISTRY[objective.name] = objective
    return objective


def _load() -> None:
    """Import every module of this package (once): each registers its objectives."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    package = __name__.rpartition(".")[0]
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name != "registry" and not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")


def names() -> tuple[str, ...]:
    """Every objective's name, in ``--loss``'s order."""
    _load()
    return tuple(o.name for o in sorted(_REGISTRY.values(), key=lambda o: (o.rank, o.name)))


def get(name: str, what: str = "variant") -> Objective:
    """The record of ``name``; a ValueError lists the names (``what`` names the argument)."""
    _load()
    if name not in _REGISTRY:
        raise ValueError(f"{what} must be one of {names()}, got {name!r}")
    return _REGISTRY[name]


def option_names() -> tuple[str, ...]:
    """Every option of any objective, and the common ones."""
    _load()
    own = {name for o in _REGISTRY.values() for name in o.options}
    return tuple(sorted(own | set(COMMON_OPTIONS)))


def users(option: str) -> tuple[str, ...]:
    """The objectives that take ``option``."""
    return tuple(n for n in names() if option in _REGISTRY[n].options)


def check_options(name: str, given: Mapping[str, Any]) -> None:
    """Refuse an option of ``gspo_loss`` (given = not None) that objective ``name`` does not
    take, naming why; the divisor keywords by the objective's ``divisor``."""
    divisor = get(name).divisor
    for key, value in given.items():
        if value is None:
            continue
        if key in ("num_sequences", "num_tokens"):
            if (key == "num_tokens") == (divisor == "tokens"):
                continue
            why = ("this variant averages per sequence: pass num_sequences instead"
                   if key == "num_tokens" else f"{name} divides by the batch's token count: "
                   "pass num_tokens instead")  # fmt: skip
        elif key not in option_names():
            raise TypeError(f"gspo_loss() got an unexpected keyword argument {key!r}; the "
                            f"objectives' options are {list(option_names())}")  # fmt: skip
        else:
            why = refusal(name, key, flag=False)
            if why is None:
                continue
        raise ValueError(f"{key}={value!r} does not apply to variant={name!r}: {why}; remove it")


# ------------------------------------------------------------- checks for resolve()


def number(name: str, value, rule: str = "> 0") -> float:
    """``value`` as a float if it is a finite real number; else a TypeError / ValueError
    whose message states ``rule``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite and {rule}, got {value!r}")
    return float(value)


def positive(name: str, value) -> float:
    """``value`` if it is a finite number > 0, as a float."""
    value = number(name, value)
    if not value > 0:
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return value


def nonnegative(name: str, value) -> float:
    """``value`` if it is a finite number >= 0, as a float."""
    value = number(name, value, ">= 0")
    if value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return value


def with_defaults(objective_options: Mapping[str, float | None], given: Mapping) -> dict:
    """The objective's options, each the given value or its default."""
    return {k: (given[k] if given.get(k) is not None else d)
            for k, d in objective_options.items()}  # fmt: skip


# ------------------------------------------------- `gspo train --loss NAME:opt=value,...`


def parse_spec(spec: str, what: str = "--loss") -> tuple[str, dict[str, float]]:
    """``"NAME"`` or ``"NAME:option=value,..."`` -> (name, {option: float}); each option must
    be one the objective takes (or a common one). Errors name ``what``, the part and the fix."""
    if not isinstance(spec, str):
        raise ValueError(f"{what}: {spec!r} is not a loss name")
    name, _, text = spec.partition(":")
    if name not in names():
        raise ValueError(f"{what} / 'loss' = {spec!r} must be one of {list(names())}, "
                         "optionally as NAME:option=value,...")  # fmt: skip
    takes = {**get(name).options, **dict.fromkeys(COMMON_OPTIONS)}
    options: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in takes:
            raise ValueError(f"{what} {spec!r}: {item!r} is not option=value of {name}'s "
                             f"options {sorted(takes)}")  # fmt: skip
        if key in options:
            raise ValueError(f"{what} {spec!r}: {key} is given twice")
        try:
            options[key] = float(value)
        except ValueError:
            raise ValueError(f"{what} {spec!r}: {key}={value.strip()!r} is not a number") from None
    return name, options


def refusal(name: str, option: str, flag: bool = True) -> str | None:
    """Why objective ``name`` does not take ``option`` (None if it does)."""
    objective = get(name)
    if option in objective.options or option in COMMON_OPTIONS:
        return None
    prefix = "--loss " if flag else "variant="
    return objective.why_not.get(option, "it applies to "
                                 + " / ".join(prefix + u for u in users(option)) + " only")


def trainer_options(spec: str, flags: Mapping[str, float | None]) -> dict:
    """``gspo train``'s keywords of gspo_loss for ``--loss spec`` and the option flags given
    (``--eps-low`` ...; None = not given): the variant, the options, and the objective's
    ``trainer_defaults`` for those not given. Every check runs here, errors in the config's
    form (``--flag / name = value is invalid: fix``)."""
    from gspo.config import check

    name, given = parse_spec(spec)
    for key, value in flags.items():
        if value is None:
            continue
        why = refusal(name, key)
        check(why is None, key, value, f"--loss {name} does not use it ({why}): drop it")
        check(key not in given, key, value, f"--loss {spec} gives it too: give it once")
        given[key] = value
    try:
        get(name).resolve(given, 20.0)  # the defaults and checks (20: MAX_LOG_RATIO)
        if given.get("seq_mask_delta") is not None:
            positive("seq_mask_delta", given["seq_mask_delta"])
    except (TypeError, ValueError) as err:
        key = str(err).split(" ", 1)[0]  # the checks name the option first
        if flags.get(key) is not None:  # given as its own flag: name that flag
            check(False, key, flags[key], str(err))
        raise ValueError(f"--loss {spec}: {err}") from None
    defaults = {k: v for k, v in get(name).trainer_defaults.items() if k not in given}
    return {"variant": name, **defaults, **given}
