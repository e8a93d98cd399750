"""The objectives of docs/spec.md in pure Python, step by step (no torch, float64).

GSPO (``sequence_objective``) and the sequence-aware token objectives SAPO, CISPO
and GMPO (``objective``, ``objective_terms``). This is the one reference that every
fast path (the PyTorch loss, the chunked log-prob path) is tested against: values,
and for SAPO / CISPO / GMPO the gradient of L in each log-probability too. It
favours being obviously right over speed.
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


# ------------------------------------------- SAPO, CISPO, GMPO (token-level ratios)

# Defaults, each from its source (docs/spec.md says where):
SAPO_TAU_POS, SAPO_TAU_NEG = 1.0, 1.05  # SAPO paper's temperatures (A > 0, A <= 0)
CISPO_EPS_HIGH = 4.0  # weight cap 1 + 4 = 5: the cap TRL recommends (ScaleRL's eps_max = 5)
GMPO_EPS = 0.4  # GMPO paper: clip the log-ratio to [-0.4, 0.4]


@dataclass(frozen=True)
class TokenTerms:
    """One sequence's quantities in the SAPO / CISPO / GMPO sections of docs/spec.md.

    Per token t (tuples of length T_i): ``log_ratio`` d_t = logp_new - logp_old as
    given (before the MAX_LOG_RATIO clamp), ``ratio`` r_t = exp(clamp(d_t)), ``value``
    the token's factor in L_i (SAPO: the gate g(r_t); CISPO: the weight w_t; GMPO: m_t),
    ``weight`` (SAPO: the gate's gradient weight 4 s (1 - s); CISPO: w_t; GMPO: 1.0
    where the token's gradient passes, 0.0 where the clip or the clamp cuts it) and
    ``gradient`` dL/dlogp_new[t] of the objective L of the whole batch (a training
    loss -L has the opposite sign). Per sequence: ``objective`` L_i (CISPO: the
    unnormalised sum_t w_t A_i logp_t) and ``share``, its part of L: L = fsum(shares).
    """

    advantage: float
    log_ratio: tuple[float, ...]
    ratio: tuple[float, ...]
    value: tuple[float, ...]
    weight: tuple[float, ...]
    gradient: tuple[float, ...]
    objective: float
    share: float


def objective(
    log_probs_new: Ragged,
    log_probs_old: Ragged,
    rewards: Sequence[float],
    loss: str = "gspo",
    **params,
) -> float:
    """The objective L of one group (docs/spec.md), in float64, for ``loss`` a registered
    objective with a reference (gspo.objectives).

    Advantages come from ``rewards`` by step 1 (``group_advantages``). ``params`` are the
    loss's own: gspo ``epsilon`` (and ``epsilon_high``); the others the options of their
    terms function (sapo ``tau_pos``, ``tau_neg``; cispo ``eps_high``, ``eps_low``; ...).
    A training loss is -L.

    Raises:
        ValueError / TypeError: naming the argument, for a malformed input, an unknown
        loss, or a parameter that does not apply to it.
    """
    if loss == "gspo":
        return sequence_objective(log_probs_new, log_probs_old, rewards, **params)
    _validate(log_probs_new, log_probs_old, rewards)
    adv = group_advantages(rewards)
    return math.fsum(t.share for t in objective_terms(log_probs_new, log_probs_old, adv, loss,
                                                      **params))  # fmt: skip


def objective_terms(
    log_probs_new: Ragged, log_probs_old: Ragged, advantages: Sequence[float], loss: str, **params
) -> list[TokenTerms]:
    """The terms of any number of sequences with given ``advantages`` [N] (several groups at
    once; L averages, or for the token-divided objectives sums over tokens, across all),
    by the registered objective's reference function."""
    return _reference(loss)(log_probs_new, log_probs_old, advantages, **params)


def _reference(loss: str):
    from gspo.objectives import registry

    found = registry.get(loss, "loss").reference if loss in registry.names() else None
    if found is None:
        takers = [n for n in registry.names() if registry.get(n).reference is not None]
        raise ValueError(f"loss must be one of {('gspo', *takers)}, got {loss!r}")
    return found


def sapo_terms(
    log_probs_new: Ragged,
    log_probs_old: Ragged,
    advantages: Sequence[float],
    *,
    tau_pos: float = SAPO_TAU_POS,
    tau_neg: float = SAPO_TAU_NEG,
    max_log_ratio: float = MAX_LOG_RATIO,
) -> list[TokenTerms]:
    """SAPO (arXiv 2511.20347, its objective J): L_i = (1/T_i) sum_t g(r_t) A_i, L = mean_i L_i.

    g(r) = (4/tau) sigmoid(tau (r - 1)), tau = tau_pos if A_i > 0 else tau_neg (> 0).
    dL/dlogp_t = 4 s (1 - s) r_t A_i / (T_i N) with s = sigmoid(tau (r_t - 1)): at
    r_t = 1 it is A_i / (T_i N), the plain policy gradient.
    """
    _validate(log_probs_new, log_probs_old, advantages, "advantages")
    for name, value in (("tau_pos", tau_pos), ("tau_neg", tau_neg)):
        _check_positive(name, value)
    _check_positive("max_log_ratio", max_log_ratio)
    n, out = len(log_probs_new), []
    for a, new, old in zip(advantages, log_probs_new, log_probs_old, strict=True):
        tau, size = (tau_pos if a > 0 else tau_neg), len(new)
        d, r, passes = _token_ratios(new, old, max_log_ratio)
        s = [_sigmoid(tau * (x - 1.0)) for x in r]
        gate = [4.0 / tau * x for x in s]
        weight = [4.0 * x * (1.0 - x) for x in s]
        grad = [w * x * a / (size * n) if p else 0.0
                for w, x, p in zip(weight, r, passes, strict=True)]  # fmt: skip
        objective_i = _mean(g * a for g in gate)
        out.append(TokenTerms(a, d, r, tuple(gate), tuple(weight), tuple(grad), objective_i,
                              objective_i / n))  # fmt: skip
    return out


def cispo_terms(
    log_probs_new: Ragged,
    log_probs_old: Ragged,
    advantages: Sequence[float],
    *,
    eps_high: float = CISPO_EPS_HIGH,
    eps_low: float | None = None,
    num_tokens: int | None = None,
    max_log_ratio: float = MAX_LOG_RATIO,
) -> list[TokenTerms]:
    """CISPO (MiniMax-M1, arXiv 2506.13585, J_CISPO):
    L = (sum_i sum_t sg(w_t) A_i logp_t) / num_tokens, num_tokens = sum_i T_i by default.

    w_t = min(r_t, 1 + eps_high), and max(w_t, 1 - eps_low) only when eps_low is given
    (MiniMax-M1 sets no lower bound). dL/dlogp_t = w_t A_i / num_tokens: at r_t = 1
    (w_t = 1) the plain policy gradient A_i / sum T. ``num_tokens`` >= sum_i T_i is the
    global count under data parallelism.
    """
    _validate(log_probs_new, log_probs_old, advantages, "advantages")
    _check_positive("eps_high", eps_high)
    if eps_low is not None:
        check_clip_range(eps_low, eps_high, max_log_ratio)
    _check_positive("max_log_ratio", max_log_ratio)
    total = sum(len(row) for row in log_probs_new)
    if num_tokens is None:
        num_tokens = total
    elif isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < total:
        raise ValueError(f"num_tokens must be an int >= the {total} tokens given, got "
                         f"{num_tokens!r}")  # fmt: skip
    out = []
    for a, new, old in zip(advantages, log_probs_new, log_probs_old, strict=True):
        d, r, _ = _token_ratios(new, old, max_log_ratio)
        w = [min(x, 1.0 + eps_high) for x in r]
        if eps_low is not None:
            w = [max(x, 1.0 - eps_low) for x in w]
        objective_i = math.fsum(x * a * lp for x, lp in zip(w, new, strict=True))
        grad = tuple(x * a / num_tokens for x in w)
        out.append(TokenTerms(a, d, r, tuple(w), tuple(w), grad, objective_i,
                              objective_i / num_tokens))  # fmt: skip
    return out


def gmpo_terms(
    log_probs_new: Ragged,
    log_probs_old: Ragged,
    advantages: Sequence[float],
    *,
    eps_low: float = GMPO_EPS,
    eps_high: float | None = None,
    max_log_ratio: float = MAX_LOG_RATIO,
) -> list[TokenTerms]:
    """GMPO (arXiv 2507.20673, J_GMPO): L_i = A_i exp((1/T_i) sum_t m_t), L = mean_i L_i.

    c_t = clip(d_t, -eps_low, eps_high) (log space, both > 0), s = sign(A_i),
    m_t = s min(s d_t, s c_t): the pessimistic side of the clip, as PPO's min. A token
    whose m_t is the clip bound passes no gradient; the others get
    dL/dlogp_t = A_i exp(mean_t m_t) / (T_i N). eps_high defaults to eps_low.
    """
    _validate(log_probs_new, log_probs_old, advantages, "advantages")
    eps_high = eps_low if eps_high is None else eps_high
    for name, value in (("eps_low", eps_low), ("eps_high", eps_high),
                        ("max_log_ratio", max_log_ratio)):  # fmt: skip
        _check_positive(name, value)
    n, out = len(log_probs_new), []
    for a, new, old in zip(advantages, log_probs_new, log_probs_old, strict=True):
        d, r, passes = _token_ratios(new, old, max_log_ratio)
        sign = (a > 0) - (a < 0)
        m, weight = [], []
        for x, p in zip(d, passes, strict=True):
            x = min(max(x, -max_log_ratio), max_log_ratio)  # MAX_LOG_RATIO
            c = min(max(x, -eps_low), eps_high)
            cut = sign * c < sign * x  # A > 0: x above eps_high; A < 0: x below -eps_low
            m.append(sign * min(sign * x, sign * c))
            weight.append(1.0 if p and not cut and sign != 0 else 0.0)
        scale = math.exp(_mean(m))
        objective_i = a * scale
        grad = tuple(a * scale / (len(new) * n) if w else 0.0 for w in weight)
        out.append(TokenTerms(a, d, r, tuple(m), tuple(weight), grad, objective_i,
                              objective_i / n))  # fmt: skip
    return out


def _token_ratios(new, old, bound):
    """(d_t, r_t = exp(clamp(d_t)), whether the clamp lets d_t's gradient pass) per token."""
    d = tuple(a - b for a, b in zip(new, old, strict=True))
    r = tuple(math.exp(min(max(x, -bound), bound)) for x in d)
    return d, r, tuple(abs(x) <= bound for x in d)


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def explain_token_objective(
    log_probs_new: Ragged, log_probs_old: Ragged, rewards: Sequence[float], loss: str, **params
) -> str:
    """A per-token table for SAPO / CISPO / GMPO (docs/spec.md's worked examples), then
    each L_i and L."""
    _validate(log_probs_new, log_probs_old, rewards)
    from gspo.objectives import registry

    terms = objective_terms(log_probs_new, log_probs_old, group_advantages(rewards), loss,
                            **params)  # fmt: skip
    record = registry.get(loss, "loss")
    extra = record.explain
    header = ("i", "t", "A_i", "d_t", "r_t", *(h for h, _ in extra), "dL/dlogp_t")
    rows = []
    for i, (term, new) in enumerate(zip(terms, log_probs_new, strict=True)):
        for t, lp in enumerate(new):
            cells = [str(i), str(t), f"{term.advantage:.6f}", f"{term.log_ratio[t]:.6f}",
                     f"{term.ratio[t]:.6f}"]  # fmt: skip
            for head, field in extra:
                value = lp if field is None else getattr(term, field)[t]
                cells.append(("yes" if value else "no") if head == "passes" else f"{value:.6f}")
            rows.append((*cells, f"{term.gradient[t]:.6f}"))
    widths = [max(len(h), *(len(row[k]) for row in rows)) for k, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines += [f"sequence {i}: {record.formula} = {t.objective:.6f}" for i, t in enumerate(terms)]
    lines += [
        f"sequence {i} token {k}: log-ratio {x:.6g} clamped to "
        f"{math.copysign(MAX_LOG_RATIO, x):+g} before exp (MAX_LOG_RATIO)"
        for i, t in enumerate(terms)
        for k, x in enumerate(t.log_ratio)
        if abs(x) > MAX_LOG_RATIO
    ]
    total = math.fsum(t.share for t in terms)
    lines.append(f"L = {record.total} = {total!r}")
    return "\n".join(lines)


def _check_positive(name: str, value) -> None:
    _check_number(name, value)
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


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


def _validate(log_probs_new, log_probs_old, rewards, rewards_name="rewards") -> None:
    for name, value in (("log_probs_new", log_probs_new), ("log_probs_old", log_probs_old),
                        (rewards_name, rewards)):  # fmt: skip
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise TypeError(f"{name} must be a list, got {type(value).__name__}")
    n = len(log_probs_new)
    if n == 0:
        raise ValueError("log_probs_new holds no sequences; need at least one")
    if len(log_probs_old) != n or len(rewards) != n:
        raise ValueError(
            f"outer lengths differ: log_probs_new has {n} sequences, log_probs_old "
            f"{len(log_probs_old)}, {rewards_name} {len(rewards)}"
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
        _check_number(f"{rewards_name}[{i}]", r)


def _check_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
