"""The objectives of 2026 in pure Python, step by step (no torch, float64): DPPO's
Binary-TV and Binary-KL masks, VESPO, LUSPO, the MaxRL advantage and DeepSeek-V3.2's
off-policy sequence mask (docs/spec.md, "The objectives of 2026").

The same contract as ``gspo.reference`` (whose helpers and ``TokenTerms`` these share):
each ``*_terms`` function takes ragged log-probs and advantages and returns, per
sequence, the per-token ratio, the token's factor in L, its gradient weight, and
``dL/dlogp_new[t]`` of the objective L of the whole batch; ``L = fsum(shares)``. The
batched losses (gspo/objectives/dppo.py, vespo.py, luspo.py) are tested against them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from gspo.reference import (
    MAX_LOG_RATIO,
    Ragged,
    TokenTerms,
    _check_positive,
    _mean,
    _token_ratios,
    _validate,
    check_clip_range,
)

# Defaults, each from its source (docs/objectives.md says where):
DPPO_TV_DELTA = 0.15  # verl's DPPO example: Binary-TV bound on |p - p_old|
DPPO_KL_DELTA = 0.05  # verl's DPPO example: Binary-KL bound on KL(p_old || p)
VESPO_K_POS, VESPO_LAMBDA_POS = 2.0, 3.0  # TRL's vespo defaults (A >= 0)
VESPO_K_NEG, VESPO_LAMBDA_NEG = 3.0, 2.0  # (A < 0)


def binary_kl(logp_old: float, logp: float) -> float:
    """KL(Bernoulli(p_old) || Bernoulli(p)) of the sampled token's probability, from its
    log-probs: ``p_old log(p_old / p) + (1 - p_old) log((1 - p_old) / (1 - p))``, with
    ``1 - p = -expm1(logp)`` (exact near p = 1). inf where p = 1 > p_old."""
    p_old = math.exp(logp_old)
    kl = p_old * (logp_old - logp)
    if p_old < 1.0:
        q_old, q = -math.expm1(logp_old), -math.expm1(logp)
        kl += q_old * (math.log(q_old) - math.log(q)) if q > 0 else math.inf
    return kl


def dppo_terms(
    log_probs_new: Ragged,
    log_probs_old: Ragged,
    advantages: Sequence[float],
    *,
    divergence: str = "tv",
    delta_low: float | None = None,
    delta_high: float | None = None,
    max_log_ratio: float = MAX_LOG_RATIO,
) -> list[TokenTerms]:
    """DPPO (arXiv 2602.04879): L_i = (1/T_i) sum_t M_t r_t A_i, L = mean_i L_i.

    M_t = 0 (the token leaves the loss) where the update already left the trust region in
    the direction the advantage pushes: "tv" (Binary-TV) A_i > 0 and p_t - p_old_t >
    delta_high, or A_i <= 0 and p_t - p_old_t < -delta_low (p = exp(logp)); "kl"
    (Binary-KL) the same sides with KL(p_old_t || p_t) > delta (``binary_kl``). Else
    M_t = 1. dL/dlogp_t = M_t r_t A_i / (T_i N) (0 beyond the MAX_LOG_RATIO clamp).
    ``value`` is M_t r_t A_i, ``weight`` M_t. Defaults: 0.15 (tv), 0.05 (kl), delta_low
    = delta_high.
    """
    _validate(log_probs_new, log_probs_old, advantages, "advantages")
    if divergence not in ("tv", "kl"):
        raise ValueError(f"divergence must be 'tv' or 'kl', got {divergence!r}")
    default = DPPO_TV_DELTA if divergence == "tv" else DPPO_KL_DELTA
    delta_high = default if delta_high is None else delta_high
    delta_low = delta_high if delta_low is None else delta_low
    for name, value in (("delta_low", delta_low), ("delta_high", delta_high),
                        ("max_log_ratio", max_log_ratio)):  # fmt: skip
        _check_positive(name, value)
    n, out = len(log_probs_new), []
    for a, new, old in zip(advantages, log_probs_new, log_probs_old, strict=True):
        d, r, passes = _token_ratios(new, old, max_log_ratio)
        keep = [_dppo_keeps(x, y, a, divergence, delta_low, delta_high)
                for x, y in zip(new, old, strict=True)]  # fmt: skip
        value = tuple(r_t * a if k else 0.0 for r_t, k in zip(r, keep, strict=True))
        grad = tuple(r_t * a / (len(new) * n) if k and p else 0.0
                     for r_t, k, p in zip(r, keep, passes, strict=True))  # fmt: skip
        objective_i = _mean(value)
        out.append(TokenTerms(a, d, r, value, tuple(float(k) for k in keep), grad,
                              objective_i, objective_i / n))  # fmt: skip
    return out


def _dppo_keeps(new, old, a, divergence, delta_low, delta_high) -> bool:
    up = math.exp(new) > math.exp(old)  # the update raised the token's probability
    if divergence == "tv":
        moved = math.exp(new) - math.exp(old)
        return moved <= delta_high if a > 0 else moved >= -delta_low
    kl = binary_kl(old, new)
    if a > 0:  # only a rise beyond the region is cut
        return kl <= delta_high or not up
    return kl <= delta_low or math.exp(new) >= math.exp(old)


def vespo_terms(
    log_probs_new: Ragged,
    log_probs_old: Ragged,
    advantages: Sequence[float],
    *,
    k_pos: float = VESPO_K_POS,
    lambda_pos: float = VESPO_LAMBDA_POS,
    k_neg: float = VESPO_K_NEG,
    lambda_neg: float = VESPO_LAMBDA_NEG,
    num_tokens: int | None = None,
    max_log_ratio: float = MAX_LOG_RATIO,
) -> list[TokenTerms]:
    """VESPO (arXiv 2602.10693): L = sum_i sum_t sg(phi(w_i)) A_i logp_t / num_tokens.

    log w_i = clamp(sum_t clamp(d_t), -bound, bound) (a sum: the sequence's importance
    weight, not GSPO's per-token mean), phi(w) = w^k exp(lambda (1 - w)) = exp(k log w +
    lambda (1 - w)), with (k, lambda) = (k_pos, lambda_pos) for A_i >= 0 and (k_neg,
    lambda_neg) for A_i < 0; phi(1) = 1, so on-policy this is REINFORCE. phi is detached:
    dL/dlogp_t = phi(w_i) A_i / num_tokens (num_tokens = sum_i T_i by default, the
    global count under data parallelism). ``value`` and ``weight`` are phi(w_i) per token.
    """
    _validate(log_probs_new, log_probs_old, advantages, "advantages")
    for name, v in (("k_pos", k_pos), ("lambda_pos", lambda_pos), ("k_neg", k_neg),
                    ("lambda_neg", lambda_neg)):  # fmt: skip
        _check_nonnegative(name, v)
    _check_positive("max_log_ratio", max_log_ratio)
    num_tokens = _num_tokens(log_probs_new, num_tokens)
    out = []
    for a, new, old in zip(advantages, log_probs_new, log_probs_old, strict=True):
        d, r, _ = _token_ratios(new, old, max_log_ratio)
        phi = vespo_phi(_log_weight(d, max_log_ratio), a, k_pos, lambda_pos, k_neg, lambda_neg)
        objective_i = math.fsum(phi * a * lp for lp in new)
        grad = tuple(phi * a / num_tokens for _ in new)
        out.append(TokenTerms(a, d, r, (phi,) * len(new), (phi,) * len(new), grad,
                              objective_i, objective_i / num_tokens))  # fmt: skip
    return out


def _log_weight(d: Sequence[float], bound: float) -> float:
    """log w = sum_t d_t, each d_t and the sum clamped to [-bound, bound] (MAX_LOG_RATIO)."""
    total = math.fsum(min(max(x, -bound), bound) for x in d)
    return min(max(total, -bound), bound)


def vespo_phi(log_w: float, a: float, k_pos, lambda_pos, k_neg, lambda_neg) -> float:
    """phi(w) = exp(k log w + lambda (1 - w)), (k, lambda) by the sign of a (>= 0: pos)."""
    k, lam = (k_pos, lambda_pos) if a >= 0 else (k_neg, lambda_neg)
    return math.exp(k * log_w + lam * (1.0 - math.exp(log_w)))


def luspo_terms(
    log_probs_new: Ragged,
    log_probs_old: Ragged,
    advantages: Sequence[float],
    *,
    eps_low: float = 3e-4,
    eps_high: float | None = None,
    max_log_ratio: float = MAX_LOG_RATIO,
) -> list[TokenTerms]:
    """LUSPO (arXiv 2602.05261): GSPO's term times the sequence's length,
    L_i = T_i min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i), L = mean_i L_i,
    s_i = exp(mean_t d_t). dL/dlogp_t = s_i A_i / N where the unclipped branch is the
    minimum (the T_i cancels GSPO's 1/T_i), else 0. ``value`` is s_i, ``weight`` 1.0
    where the gradient passes. eps_high defaults to eps_low (GSPO's defaults)."""
    _validate(log_probs_new, log_probs_old, advantages, "advantages")
    eps_high = eps_low if eps_high is None else eps_high
    check_clip_range(eps_low, eps_high, max_log_ratio)
    n, out = len(log_probs_new), []
    for a, new, old in zip(advantages, log_probs_new, log_probs_old, strict=True):
        d, r, _ = _token_ratios(new, old, max_log_ratio)
        mean = math.fsum(d) / len(new)
        s = math.exp(min(max(mean, -max_log_ratio), max_log_ratio))
        clipped = min(max(s, 1.0 - eps_low), 1.0 + eps_high)
        passes = s * a <= clipped * a and abs(mean) <= max_log_ratio and a != 0
        objective_i = 0.0 if a == 0 else len(new) * min(s * a, clipped * a)
        grad = tuple(s * a / n if passes else 0.0 for _ in new)
        out.append(TokenTerms(a, d, r, (s,) * len(new), (float(passes),) * len(new), grad,
                              objective_i, objective_i / n))  # fmt: skip
    return out


def maxrl_advantages(rewards: Sequence[float]) -> list[float]:
    """MaxRL (arXiv 2602.02710): A_i = (r_i - mean) / mean for one group; all 0 where the
    mean is <= 0 (no success: no signal; prime-rl's rule) or the rewards are all equal."""
    rewards = [float(r) for r in rewards]
    mean = _mean(rewards)
    if mean <= 0 or all(r == rewards[0] for r in rewards):
        return [0.0] * len(rewards)
    return [(r - mean) / mean for r in rewards]


def seq_mask(
    log_probs_new: Ragged, log_probs_old: Ragged, advantages: Sequence[float], delta: float
) -> list[bool]:
    """DeepSeek-V3.2's off-policy sequence mask (arXiv 2512.02556): True (kept) unless
    A_i < 0 and D_i = (1/T_i) sum_t (logp_old_t - logp_new_t) > delta. D_i is the k1
    estimate of KL(pi_old || pi) on pi_old's samples; a masked sequence's advantage is 0."""
    _validate(log_probs_new, log_probs_old, advantages, "advantages")
    _check_positive("delta", delta)
    rows = zip(advantages, log_probs_new, log_probs_old, strict=True)
    return [not (a < 0 and math.fsum(o - x for x, o in zip(new, old, strict=True)) / len(new)
                 > delta) for a, new, old in rows]  # fmt: skip


def _check_nonnegative(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")


def _num_tokens(log_probs_new: Ragged, num_tokens: int | None) -> int:
    total = sum(len(row) for row in log_probs_new)
    if num_tokens is None:
        return total
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < total:
        raise ValueError(f"num_tokens must be an int >= the {total} tokens given, got "
                         f"{num_tokens!r}")  # fmt: skip
    return num_tokens
