"""SAPO (arXiv 2511.20347, its objective J): a soft gate instead of a clip,
``L_i = mean_t g(r_t) A_i``, ``g(r) = (4/tau) sigmoid(tau (r - 1))``, tau = tau_pos if
A_i > 0 else tau_neg. Reference: ``gspo.reference.sapo_terms``."""

from __future__ import annotations

from gspo.objectives.registry import Objective, positive, register, with_defaults
from gspo.reference import SAPO_TAU_NEG, SAPO_TAU_POS, sapo_terms

OPTIONS = {"tau_pos": SAPO_TAU_POS, "tau_neg": SAPO_TAU_NEG}  # the SAPO paper's
NO_CLIP = "SAPO has no clip range; its gate is shaped by tau_pos and tau_neg"


def resolve(given: dict, max_log_ratio: float) -> dict:
    positive("max_log_ratio", max_log_ratio)
    return {k: positive(k, v) for k, v in with_defaults(OPTIONS, given).items()}


def loss(x):
    import torch

    from gspo.batched import expand_adv, ratio_metrics, token_ratios

    layout, ratio, adv = x.layout, token_ratios(x), expand_adv(x)
    tau = torch.where(adv > 0, adv.new_tensor(x.params["tau_pos"]),
                      adv.new_tensor(x.params["tau_neg"]))  # fmt: skip
    s = torch.sigmoid(tau * (ratio - 1.0))
    term = layout.select(s * (4.0 / tau) * adv)
    loss = -layout.seq_mean(term).sum() / x.divisor
    s = s.detach()
    weight = layout.select(4.0 * s * (1.0 - s))  # d g / d logp = weight * r
    metrics = {
        "gate_weight_mean": layout.token_mean(weight),
        "gate_weight_low_frac": layout.token_mean(layout.select((weight < 0.5).to(s.dtype))),
    }
    return loss, {**metrics, **ratio_metrics(layout, layout.select(ratio), per_token=True)}


register(Objective(
    name="sapo",
    summary="sapo (soft gate)",
    loss=loss,
    options=OPTIONS,
    resolve=resolve,
    per_token_advantages=True,
    token_metrics=frozenset({"ratio_mean", "gate_weight_mean", "gate_weight_low_frac"}),
    why_not={"eps_low": NO_CLIP, "eps_high": NO_CLIP},
    reference=sapo_terms,
    explain=(("g(r_t)", "value"), ("4s(1-s)", "weight")),
    formula="L_i = mean_t g(r_t) A_i",
    rank=3,
))  # fmt: skip
