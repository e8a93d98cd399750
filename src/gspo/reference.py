"""The GSPO objective of docs/spec.md in pure Python, step by step (no torch, float64).

This is the one reference that every fast path (the PyTorch loss, the chunked
log-prob path) is tested against. It favours being obviously right over speed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Ragged = Sequence[Sequence[float]]

# The one clamp rule of the project, shared with gspo.loss.gspo_loss: the mean
# log-ratio of docs/spec.md step 2 is clamped to [-MAX_LOG_RATIO, MAX_LOG_RATIO]
# before exp. e^20 ~ 4.9e8 lies far outside any clip range [1 - eps, 1 + eps]
# (eps_low < 1), so the clip decision and, for A > 0, the clipped value are
# unchanged: results are exact wherever |mean log-ratio| <= 20. Beyond it the
# unclipped branch (taken for A < 0) is held at e^20 instead of overflowing to
# inf (e^710 in float64, e^89 in float32), which would print L = -inf here and
# turn a whole training batch into NaN there. The spec's formula has no such
# bound; this is the one place both implementations depart from it, on purpose.
MAX_LOG_RATIO = 20.0


@dataclass(frozen=True)
class SequenceTerms:
    """The per-sequence quantities of docs/spec.md steps 1-4."""

    advantage: float
    log_ratio: float  # mean over tokens of logp_new - logp_old
    ratio: float
    clipped_ratio: float
    objective: float  # L_i


def sequence_objective(
    log_probs_new: Ragged,
    log_probs_old: Ragged,
    rewards: Sequence[float],
    epsilon: float,
    *,
    epsilon_high: float | None = None,
    max_log_ratio: float = MAX_LOG_RATIO,
) -> float:
    """The GSPO objective L of one group (docs/spec.md), in float64.

    Args:
        log_probs_new: N ragged rows; row i holds the T_i >= 1 per-token
            log-probabilities of sequence i under the current policy.
        log_probs_old: the same shape, under the policy that sampled it.
        rewards: N scalar rewards.
        epsilon: clip range, 0 < epsilon < 1; the ratio is clipped to
            [1 - eps, 1 + eps] (see ``check_clip_range``).
        epsilon_high: optional upper range (asymmetric clipping,
            [1 - epsilon, 1 + epsilon_high]), > 0; defaults to epsilon, the spec.
        max_log_ratio: bound on |mean log-ratio| before exp; see MAX_LOG_RATIO.

    Returns:
        L = mean_i min(rho_i * A_i, clip(rho_i) * A_i). A training loss is -L.

    Raises:
        ValueError: naming the argument, for any malformed or non-finite input.
    """
    terms = sequence_terms(
        log_probs_new, log_probs_old, rewards, epsilon,
        epsilon_high=epsilon_high, max_log_ratio=max_log_ratio,
    )  # fmt: skip
    return _mean(t.objective for t in terms)


def sequence_terms(
    log_probs_new: Ragged,
    log_probs_old: Ragged,
    rewards: Sequence[float],
    epsilon: float,
    *,
    epsilon_high: float | None = None,
    max_log_ratio: float = MAX_LOG_RATIO,
) -> list[SequenceTerms]:
    """docs/spec.md steps 1-4 for each sequence: advantage, ratio, clipped ratio, L_i."""
    _validate(log_probs_new, log_probs_old, rewards)
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    check_clip_range(epsilon, epsilon_high, max_log_ratio, names=("epsilon", "epsilon_high"))
    adv = group_advantages(rewards)
    terms = []
    for a, new, old in zip(adv, log_probs_new, log_probs_old, strict=True):
        # Step 2: length-normalised (geometric-mean) sequence ratio.
        log_ratio = (math.fsum(new) - math.fsum(old)) / len(new)
        ratio = math.exp(min(max(log_ratio, -max_log_ratio), max_log_ratio))  # MAX_LOG_RATIO
        # Step 3: clip to [1 - eps, 1 + eps].
        clipped = min(max(ratio, 1.0 - epsilon), 1.0 + epsilon_high)
        # Step 4: pessimistic minimum. A == 0 gives 0 (not inf * 0 = NaN).
        objective = 0.0 if a == 0.0 else min(ratio * a, clipped * a)
        terms.append(SequenceTerms(a, log_ratio, ratio, clipped, objective))
    return terms


def group_advantages(rewards: Sequence[float]) -> list[float]:
    """docs/spec.md step 1: (r - mean) / population std, exactly 0 when all rewards are equal.

    Equality is tested on the rewards themselves, not on a computed sigma:
    ``sum([0.1] * 3) / 3`` is not 0.1 in floating point, so sigma of three equal
    rewards can come out as about 1e-17 and turn rounding noise into +-1 advantages.
    """
    rewards = [float(r) for r in rewards]
    if all(r == rewards[0] for r in rewards):
        return [0.0] * len(rewards)
    mu = _mean(rewards)
    # (r - mu) / sigma is scale-free: divide by the largest deviation first so that
    # squaring cannot underflow (spreads ~1e-200) or overflow (rewards ~1e200).
    scale = max(abs(r - mu) for r in rewards)
    dev = [(r - mu) / scale for r in rewards]
    sigma = math.sqrt(_mean(d * d for d in dev))
    return [d / sigma for d in dev]


def explain_objective(
    log_probs_new: Ragged,
    log_probs_old: Ragged,
    rewards: Sequence[float],
    epsilon: float,
) -> str:
    """A step-by-step table of docs/spec.md's worked example form, ending with L."""
    terms = sequence_terms(log_probs_new, log_probs_old, rewards, epsilon)
    header = ("i", "T_i", "reward", "A_i", "mean log-ratio", "rho_i", "clip(rho_i)", "L_i")
    rows = [
        (str(i), str(len(new)), f"{r:.6g}", f"{t.advantage:.6f}", f"{t.log_ratio:.6f}",
         f"{t.ratio:.6f}", f"{t.clipped_ratio:.6f}", f"{t.objective:.6f}")
        for i, (t, new, r) in enumerate(zip(terms, log_probs_new, rewards, strict=True))
    ]  # fmt: skip
    widths = [max(len(h), *(len(row[k]) for row in rows)) for k, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.append(f"clip range [{1 - epsilon:.6g}, {1 + epsilon:.6g}]")
    lines += [
        f"sequence {i}: mean log-ratio {t.log_ratio:.6g} clamped to "
        f"{math.copysign(MAX_LOG_RATIO, t.log_ratio):+g} before exp (MAX_LOG_RATIO)"
        for i, t in enumerate(terms)
        if abs(t.log_ratio) > MAX_LOG_RATIO
    ]
    lines.append(f"L = mean_i L_i = {_mean(t.objective for t in terms)!r}")
    return "\n".join(lines)


def _mean(values) -> float:
    values = list(values)
    return math.fsum(values) / len(values)


def check_clip_range(
    eps_low, eps_high, max_log_ratio=MAX_LOG_RATIO, *, names=("eps_low", "eps_high")
) -> None:
    """The clip-range rule shared with gspo_loss: 0 < eps_low < 1, eps_high > 0, both finite.

    docs/spec.md step 3 clips the ratio to [1 - eps_low, 1 + eps_high]. A ratio is
    positive, so the lower bound must be one: eps_low < 1 (at eps_low >= 1 the
    lower clip never acts and 1 - eps_low <= 0 is no ratio). eps_low > 0 as the
    spec says; eps_high > 0 (any upper bound above 1 is a ratio). max_log_ratio
    must be finite and > 0.
    """
    low_name, high_name = names
    for name, value in ((low_name, eps_low), (high_name, eps_high),
                        ("max_log_ratio", max_log_ratio)):  # fmt: skip
        _check_number(name, value)
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")
    if not eps_low < 1:
        raise ValueError(
            f"{low_name} must be < 1, got {eps_low!r}: the clip range's lower bound "
            f"1 - {low_name} must be a positive ratio"
        )


def _validate(log_probs_new, log_probs_old, rewards) -> None:
    for name, value in (("log_probs_new", log_probs_new), ("log_probs_old", log_probs_old),
                        ("rewards", rewards)):  # fmt: skip
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise TypeError(f"{name} must be a list, got {type(value).__name__}")
    n = len(log_probs_new)
    if n == 0:
        raise ValueError("log_probs_new holds no sequences; need at least one")
    if len(log_probs_old) != n or len(rewards) != n:
        raise ValueError(
            f"outer lengths differ: log_probs_new has {n} sequences, log_probs_old "
            f"{len(log_probs_old)}, rewards {len(rewards)}"
        )
    for i, (new, old) in enumerate(zip(log_probs_new, log_probs_old, strict=True)):
        for name, row in (("log_probs_new", new), ("log_probs_old", old)):
            if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
                raise TypeError(f"{name}[{i}] must be a list, got {type(row).__name__}")
        if len(new) != len(old):
            raise ValueError(
                f"sequence {i}: log_probs_new has {len(new)} tokens, log_probs_old {len(old)}"
            )
        if len(new) == 0:
            raise ValueError(f"sequence {i} is empty; every sequence needs at least one token")
        for t, (a, b) in enumerate(zip(new, old, strict=True)):
            _check_number(f"log_probs_new[{i}][{t}]", a)
            _check_number(f"log_probs_old[{i}][{t}]", b)
    for i, r in enumerate(rewards):
        _check_number(f"rewards[{i}]", r)


def _check_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
