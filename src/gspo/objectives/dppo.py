"""DPPO (Qi et al., arXiv 2602.04879): the trust region bounds how far the sampled token's
*probability* moved, not its ratio. ``L_i = mean_t M_t r_t A_t``, ``L = mean_i L_i``; a
token leaves the loss (M_t = 0) when its update already left the region in the direction
its advantage pushes:

    "dppo-tv"  Binary-TV: A > 0 and p - p_old > delta_high, or A <= 0 and p - p_old < -delta_low
    "dppo-kl"  Binary-KL: the same sides, with KL(Bernoulli(p_old) || Bernoulli(p)) > delta

p = exp(logp). Defaults are verl's DPPO example (0.15 for TV, 0.05 for KL; delta_low =
delta_high). The divergence is to ``logp_old``: the policy that sampled when the trainer
passes the sampler's log-probs (docs/objectives.md, "Which log-probs"). Reference:
``gspo.reference_2026.dppo_terms``.
"""

from __future__ import annotations

import functools

from gspo.objectives.registry import Objective, positive, register, with_defaults
from gspo.reference_2026 import DPPO_KL_DELTA, DPPO_TV_DELTA, dppo_terms

NOT_A_RATIO = "DPPO bounds the token probability's move, not its ratio: use delta_low / delta_high"
TOKEN_METRICS = frozenset({"mask_frac_low", "mask_frac_high", "ratio_mean"})


def _resolve(default: float):
    options = {"delta_low": None, "delta_high": default}

    def resolve(given: dict, max_log_ratio: float) -> dict:
        p = with_defaults(options, given)
        positive("max_log_ratio", max_log_ratio)
        high = positive("delta_high", p["delta_high"])
        low = high if p["delta_low"] is None else positive("delta_low", p["delta_low"])
        return {"delta_low": low, "delta_high": high}

    return options, resolve


def binary_kl(logp_old, logp):
    """KL(Bernoulli(p_old) || Bernoulli(p)) elementwise from log-probs (no gradient), with
    1 - p = -expm1(logp); inf where p = 1 > p_old (as gspo.reference_2026.binary_kl)."""
    import torch

    q_old, q = -torch.expm1(logp_old), -torch.expm1(logp)
    tail = torch.where(q_old > 0, q_old * (torch.log(q_old) - torch.log(q)), 0.0)
    return logp_old.exp() * (logp_old - logp) + tail


def _loss(x, divergence: str):
    import torch

    from gspo.batched import expand_adv, ratio_metrics, token_ratios

    layout, adv = x.layout, expand_adv(x)
    ratio = token_ratios(x)  # its gradient is the policy gradient's r_t d logp_t
    # the mask selects, it is not optimised: detached, and 0 (p = 1) on masked slots
    logp = layout.select(x.logp.detach().to(x.dtype))
    logp_old = layout.select(x.logp_old.detach().to(x.dtype))
    lo, hi = x.params["delta_low"], x.params["delta_high"]
    if divergence == "tv":
        moved = logp.exp() - logp_old.exp()
        keep = torch.where(adv > 0, moved <= hi, moved >= -lo)
    else:
        kl, up = binary_kl(logp_old, logp), logp > logp_old
        keep = torch.where(adv > 0, (kl <= hi) | ~up, (kl <= lo) | (logp >= logp_old))
    keep = layout.select(keep, False)
    term = torch.where(keep, ratio * adv, 0.0)
    loss = -layout.seq_mean(term).sum() / x.divisor
    cut = layout.select(~keep, False)
    one = ratio.detach()
    metrics = {
        "mask_frac_low": layout.token_mean((cut & (adv < 0)).to(one.dtype)),
        "mask_frac_high": layout.token_mean((cut & (adv > 0)).to(one.dtype)),
    }
    return loss, {**metrics, **ratio_metrics(layout, layout.select(one), per_token=True)}


for _name, _divergence, _default, _rank in (("dppo-tv", "tv", DPPO_TV_DELTA, 6),
                                            ("dppo-kl", "kl", DPPO_KL_DELTA, 7)):  # fmt: skip
    _options, _resolver = _resolve(_default)
    register(Objective(
        name=_name,
        summary=f"{_name} (DPPO's Binary-{_divergence.upper()} mask on token ratios)",
        loss=functools.partial(_loss, divergence=_divergence),
        options=_options,
        resolve=_resolver,
        per_token_advantages=True,
        token_metrics=TOKEN_METRICS,
        why_not={"eps_low": NOT_A_RATIO, "eps_high": NOT_A_RATIO},
        reference=functools.partial(dppo_terms, divergence=_divergence),
        explain=(("M_t r_t A_i", "value"), ("passes", "weight")),
        formula="L_i = mean_t M_t r_t A_i",
        rank=_rank,
    ))  # fmt: skip
