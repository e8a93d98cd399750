"""GMPO (arXiv 2507.20673, J_GMPO): the geometric mean of clipped token ratios,
``L_i = A_i exp(mean_t m_it)``, ``m_it = s min(s d_it, s clip(d_it, -eps_low, eps_high))``,
``d_it = logp_t - logp_old_t``, ``s = sign(A_i)``. Reference: ``gspo.reference.gmpo_terms``."""

from __future__ import annotations

from gspo.objectives.registry import Objective, positive, register, with_defaults
from gspo.reference import GMPO_EPS, gmpo_terms

OPTIONS = {"eps_low": GMPO_EPS, "eps_high": None}  # eps_high defaults to eps_low


def resolve(given: dict, max_log_ratio: float) -> dict:
    # a clip range in log space, so only > 0 (e^-eps_low is positive for any eps_low)
    p = with_defaults(OPTIONS, given)
    positive("max_log_ratio", max_log_ratio)
    eps_low = positive("eps_low", p["eps_low"])
    eps_high = eps_low if p["eps_high"] is None else positive("eps_high", p["eps_high"])
    return {"eps_low": eps_low, "eps_high": eps_high}


def loss(x):
    import torch

    from gspo.batched import ratio_metrics

    layout = x.layout
    d = x.log_ratio.clamp(-x.bound, x.bound)  # MAX_LOG_RATIO: its gradient is 0 beyond
    c = d.clamp(-x.params["eps_low"], x.params["eps_high"])  # gradient 0 where it clips
    sign = torch.sign(layout.expand(x.adv))
    cut = layout.select(sign * c.detach() < sign * d.detach(), False)
    m = torch.where(cut, c, d)  # A = 0: m = d, and L_i = 0 * exp(...) = 0 all the same
    loss = -(x.adv * layout.seq_mean(m).exp()).sum() / x.divisor
    cut = cut.to(d.dtype)
    metrics = {
        "clip_frac_low": layout.token_mean(torch.where(sign < 0, cut, 0.0)),  # cut: selected
        "clip_frac_high": layout.token_mean(torch.where(sign > 0, cut, 0.0)),
    }
    ratio = layout.select(d.detach().exp())
    return loss, {**metrics, **ratio_metrics(layout, ratio, per_token=True)}


register(Objective(
    name="gmpo",
    summary="gmpo (geometric mean of clipped token ratios)",
    loss=loss,
    options=OPTIONS,
    resolve=resolve,
    token_metrics=frozenset({"clip_frac_low", "clip_frac_high", "ratio_mean"}),
    reference=gmpo_terms,
    explain=(("m_t", "value"), ("passes", "weight")),
    formula="L_i = A_i exp(mean_t m_t)",
    rank=5,
))  # fmt: skip
