"""The token-level (GRPO / PPO) baseline: ``r_it = exp(logp_t - logp_old_t)``,
``L_i = mean_t min(r_it A_it, clip(r_it) A_it)``, for A/B tests against GSPO."""

from __future__ import annotations

from gspo.objectives.gspo import CLIP_OPTIONS, TRAINER_CLIP, clip_range
from gspo.objectives.gspo_token import TOKEN_METRICS
from gspo.objectives.registry import Objective, register


def loss(x):
    from gspo.batched import token_clip_loss, token_ratios

    ratio = x.layout.select(token_ratios(x))
    return token_clip_loss(x, ratio, 1.0 - x.params["eps_low"], 1.0 + x.params["eps_high"])


register(Objective(
    name="grpo",
    summary="grpo (token ratios)",
    loss=loss,
    options=CLIP_OPTIONS,
    resolve=clip_range,
    per_token_advantages=True,
    token_metrics=TOKEN_METRICS,
    trainer_defaults=TRAINER_CLIP,
    rank=2,
))  # fmt: skip
