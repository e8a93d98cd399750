"""VESPO (arXiv 2602.10693): a smooth sequence-level weight on REINFORCE,
``L = sum_i sum_t sg(phi(w_i)) A_i logp_t / num_tokens``, ``w_i = exp(sum_t (logp_t -
logp_old_t))`` (a sum, where GSPO averages), ``phi(w) = w^k exp(lambda (1 - w))`` with
(k, lambda) = (k_pos, lambda_pos) for A >= 0 and (k_neg, lambda_neg) for A < 0; TRL's
defaults 2, 3, 3, 2. phi(1) = 1: on-policy it is REINFORCE over all tokens. Reference:
``gspo.reference_2026.vespo_terms``.
"""

from __future__ import annotations

from gspo.objectives.registry import Objective, nonnegative, positive, register, with_defaults
from gspo.reference_2026 import (
    VESPO_K_NEG,
    VESPO_K_POS,
    VESPO_LAMBDA_NEG,
    VESPO_LAMBDA_POS,
    vespo_terms,
)

OPTIONS = {"k_pos": VESPO_K_POS, "lambda_pos": VESPO_LAMBDA_POS, "k_neg": VESPO_K_NEG,
           "lambda_neg": VESPO_LAMBDA_NEG}  # fmt: skip
NO_CLIP = "VESPO has no clip range; its weight is shaped by k_pos, lambda_pos, k_neg, lambda_neg"


def resolve(given: dict, max_log_ratio: float) -> dict:
    positive("max_log_ratio", max_log_ratio)
    return {k: nonnegative(k, v) for k, v in with_defaults(OPTIONS, given).items()}


def loss(x):
    import torch

    from gspo.batched import expand_adv, ratio_metrics

    layout, p, adv = x.layout, x.params, expand_adv(x)
    # log w_i: each token's log-ratio and the sum clamped to MAX_LOG_RATIO; phi is detached
    d = x.log_ratio.detach().clamp(-x.bound, x.bound)
    log_w = layout.seq_sum(d).clamp(-x.bound, x.bound)  # [B]
    log_w_tok = layout.expand(log_w)
    nonneg = adv >= 0
    k = torch.where(nonneg, adv.new_tensor(p["k_pos"]), adv.new_tensor(p["k_neg"]))
    lam = torch.where(nonneg, adv.new_tensor(p["lambda_pos"]), adv.new_tensor(p["lambda_neg"]))
    phi = layout.select(torch.exp(k * log_w_tok + lam * (1.0 - log_w_tok.exp())))
    logp = layout.select(x.logp.to(x.dtype))
    loss = -layout.select(phi * adv * logp).sum() / x.divisor
    metrics = {"phi_mean": layout.token_mean(phi)}
    return loss, {**metrics, **ratio_metrics(layout, log_w.exp(), per_token=False)}


register(Objective(
    name="vespo",
    summary="vespo (smooth weight of the sequence's importance weight on REINFORCE)",
    loss=loss,
    options=OPTIONS,
    resolve=resolve,
    per_token_advantages=True,
    divisor="tokens",
    token_metrics=frozenset({"phi_mean"}),
    why_not={"eps_low": NO_CLIP, "eps_high": NO_CLIP},
    reference=vespo_terms,
    explain=(("logp_t", None), ("phi(w_i)", "weight")),
    formula="sum_t phi(w_i) A_i logp_t",
    total="sum_i (sum_t phi(w_i) A_i logp_t) / sum_i T_i",
    rank=8,
))  # fmt: skip
