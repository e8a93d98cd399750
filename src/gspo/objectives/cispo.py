"""CISPO (MiniMax-M1, arXiv 2506.13585, J_CISPO): a capped, detached importance weight on
REINFORCE, ``L = sum_i sum_t sg(w_it) A_i logp_it / num_tokens``,
``w_it = min(r_it, 1 + eps_high)`` (and >= 1 - eps_low only if eps_low is given).
Reference: ``gspo.reference.cispo_terms``."""

from __future__ import annotations

from gspo.objectives.registry import Objective, positive, register, with_defaults
from gspo.reference import CISPO_EPS_HIGH, check_clip_range, cispo_terms

OPTIONS = {"eps_high": CISPO_EPS_HIGH, "eps_low": None}


def resolve(given: dict, max_log_ratio: float) -> dict:
    p = with_defaults(OPTIONS, given)
    positive("max_log_ratio", max_log_ratio)
    eps_high = positive("eps_high", p["eps_high"])
    if p["eps_low"] is not None:  # 1 - eps_low must stay a positive weight
        check_clip_range(p["eps_low"], eps_high, max_log_ratio)
    return {"eps_high": eps_high, "eps_low": p["eps_low"]}


def loss(x):
    import torch

    from gspo.batched import expand_adv, ratio_metrics, token_ratios

    layout, r = x.layout, token_ratios(x).detach()
    hi, eps_low = 1.0 + x.params["eps_high"], x.params["eps_low"]
    weight = r.clamp(min=None if eps_low is None else 1.0 - eps_low, max=hi)
    logp = layout.select(x.logp.to(x.dtype))
    loss = -layout.select(weight * expand_adv(x) * logp).sum() / x.divisor
    low = (r < 1.0 - eps_low) if eps_low is not None else torch.zeros_like(r, dtype=torch.bool)
    metrics = {
        "bound_frac_high": layout.token_mean(layout.select((r > hi).to(r.dtype))),
        "bound_frac_low": layout.token_mean(layout.select(low.to(r.dtype))),
    }
    return loss, {**metrics, **ratio_metrics(layout, layout.select(r), per_token=True)}


register(Objective(
    name="cispo",
    summary="cispo (clipped weight on REINFORCE)",
    loss=loss,
    options=OPTIONS,
    resolve=resolve,
    per_token_advantages=True,
    divisor="tokens",
    token_metrics=frozenset({"ratio_mean", "bound_frac_high", "bound_frac_low"}),
    reference=cispo_terms,
    explain=(("logp_t", None), ("w_t", "weight")),
    formula="sum_t w_t A_i logp_t",
    total="sum_i (sum_t w_t A_i logp_t) / sum_i T_i",
    rank=4,
))  # fmt: skip
