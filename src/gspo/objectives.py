"""SAPO, CISPO and GMPO: the sequence-aware token objectives of docs/spec.md, batched.

``gspo.loss.gspo_loss(..., variant="sapo" | "cispo" | "gmpo")`` validates the inputs,
builds the layout and the advantages, and calls ``token_loss`` here; the pure-Python
``gspo.reference.sapo_terms`` / ``cispo_terms`` / ``gmpo_terms`` are the contract the
tests hold it to, values and gradients. Plain autograd: a few elementwise ops on the
per-token log-ratio and at most one per-sequence mean, so no hand-written backward.

Shapes: B sequences, T padded length, N packed tokens. ``log_ratio`` arrives already
selected (0 on masked slots, whatever logp held there), so every per-token tensor
below is finite on masked slots and is selected again before any sum.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gspo.masking import Layout
from gspo.reference import CISPO_EPS_HIGH, GMPO_EPS, SAPO_TAU_NEG, SAPO_TAU_POS, check_clip_range

VARIANTS = ("sapo", "cispo", "gmpo")
PER_TOKEN_ADVANTAGES = ("sapo", "cispo")  # GMPO's sign(A_i) and exp(mean) are per sequence

def resolve(variant, eps_low, eps_high, tau_pos, tau_neg, max_log_ratio) -> dict:
    """The variant's parameters with defaults filled in and validated (errors name them)."""
    _positive("max_log_ratio", max_log_ratio)
    if variant == "sapo":
        tau_pos = SAPO_TAU_POS if tau_pos is None else tau_pos
        tau_neg = SAPO_TAU_NEG if tau_neg is None else tau_neg
        _positive("tau_pos", tau_pos)
        _positive("tau_neg", tau_neg)
        return {"tau_pos": float(tau_pos), "tau_neg": float(tau_neg)}
    if variant == "cispo":
        eps_high = CISPO_EPS_HIGH if eps_high is None else eps_high
        _positive("eps_high", eps_high)
        if eps_low is not None:  # 1 - eps_low must stay a positive weight
            check_clip_range(eps_low, eps_high, max_log_ratio)
        return {"eps_low": eps_low, "eps_high": float(eps_high)}
    # gmpo: a clip range in log space, so only > 0 (e^-eps_low is positive for any eps_low)
    eps_low = GMPO_EPS if eps_low is None else eps_low
    eps_high = eps_low if eps_high is None else eps_high
    _positive("eps_low", eps_low)
    _positive("eps_high", eps_high)
    return {"eps_low": float(eps_low), "eps_high": float(eps_high)}


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")


def token_loss(
    variant: str,
    layout: Layout,
    logp: Tensor,
    log_ratio: Tensor,
    adv: Tensor,
    params: dict,
    bound: float,
    divisor,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """(loss, ratio, metrics) of SAPO / CISPO / GMPO; the loss is -L.

    Args:
        logp: [B,T] or [N], the policy's log-probs (CISPO's L holds them, not only ratios).
        log_ratio: logp - logp_old in the compute dtype, 0 on masked slots.
        adv: [B], or per token (selected, the shape of logp) for SAPO and CISPO.
        params: from ``resolve``.
        bound: MAX_LOG_RATIO, the clamp on each token's log-ratio before exp.
        divisor: SAPO / GMPO: the number of sequences (int); CISPO: the number of
            tokens (int, or the local count as a 0-dim tensor).

    Returns:
        loss (0-dim, compute dtype), ratio r_t [B,T]/[N] detached and selected (0 on
        masked slots), and the variant's own metrics (see gspo_loss).
    """
    x = log_ratio.clamp(-bound, bound)  # MAX_LOG_RATIO: its gradient is 0 beyond
    ratio = x.exp()  # exp(0) = 1 on masked slots: finite, selected below
    adv_tok = layout.expand(adv) if adv.dim() == 1 else adv
    if variant == "sapo":
        # SAPO objective (docs/spec.md): g(r) = (4/tau) sigmoid(tau (r - 1)), tau by the sign of A.
        tau = torch.where(adv_tok > 0, adv_tok.new_tensor(params["tau_pos"]),
                          adv_tok.new_tensor(params["tau_neg"]))  # fmt: skip
        s = torch.sigmoid(tau * (ratio - 1.0))
        term = layout.select(s * (4.0 / tau) * adv_tok)
        loss = -layout.seq_mean(term).sum() / divisor
        s = s.detach()
        weight = layout.select(4.0 * s * (1.0 - s))  # d g / d logp = weight * r
        metrics = {
            "gate_weight_mean": layout.token_mean(weight),
            "gate_weight_low_frac": layout.token_mean(layout.select((weight < 0.5).to(s.dtype))),
        }
    elif variant == "cispo":
        # CISPO objective (docs/spec.md): sg(w_t) A logp_t over all tokens, w_t the capped ratio.
        hi, eps_low = 1.0 + params["eps_high"], params["eps_low"]
        weight = ratio.detach().clamp(min=None if eps_low is None else 1.0 - eps_low, max=hi)
        term = layout.select(weight * adv_tok * layout.select(logp.to(log_ratio.dtype)))
        loss = -term.sum() / divisor
        r = ratio.detach()
        low = (r < 1.0 - eps_low) if eps_low is not None else torch.zeros_like(r, dtype=torch.bool)
        metrics = {
            "bound_frac_high": layout.token_mean(layout.select((r > hi).to(r.dtype))),
            "bound_frac_low": layout.token_mean(layout.select(low.to(r.dtype))),
        }
    else:
        # GMPO objective (docs/spec.md): m_t = s min(s d_t, s clip(d_t)), L_i = A_i exp(mean_t m_t).
        c = x.clamp(-params["eps_low"], params["eps_high"])  # gradient 0 where it clips
        sign = torch.sign(layout.expand(adv))
        cut = layout.select(sign * c.detach() < sign * x.detach(), False)
        m = torch.where(cut, c, x)  # A = 0: m = x, and L_i = 0 * exp(...) = 0 all the same
        loss = -(adv * layout.seq_mean(m).exp()).sum() / divisor
        cut = cut.to(x.dtype)
        metrics = {
            "clip_frac_low": layout.token_mean(torch.where(sign < 0, cut, 0.0)),  # cut: selected
            "clip_frac_high": layout.token_mean(torch.where(sign > 0, cut, 0.0)),
        }
    return loss, layout.select(ratio.detach()), metrics
