"""GSPO-token (GSPO paper, section 4.3): ``s_it = sg[s_i] * exp(logp_t - sg[logp_t])``,
``L_i = mean_t min(s_it A_it, clip(s_it) A_it)``; equal to "gspo" in value and gradient
when ``A_it = A_i``, and it takes per-token advantages."""

from __future__ import annotations

from gspo.objectives.gspo import CLIP_OPTIONS, TRAINER_CLIP, clip_range
from gspo.objectives.registry import Objective, register

TOKEN_METRICS = frozenset({"clip_frac_low", "clip_frac_high", "ratio_mean"})


def loss(x):
    from gspo.batched import token_clip_loss

    layout = x.layout
    # value s_i, gradient s_i * d logp_t; logp is selected before the exp so that garbage
    # cannot meet a zero gradient there
    logp = layout.select(x.logp.to(x.dtype))
    seq_ratio = x.seq_log_ratio.clamp(-x.bound, x.bound).exp().detach()
    ratio = layout.select(layout.expand(seq_ratio) * (logp - logp.detach()).exp())
    return token_clip_loss(x, ratio, 1.0 - x.params["eps_low"], 1.0 + x.params["eps_high"])


register(Objective(
    name="gspo-token",
    summary="gspo-token (the sequence ratio per token, per-token advantages)",
    loss=loss,
    options=CLIP_OPTIONS,
    resolve=clip_range,
    per_token_advantages=True,
    token_metrics=TOKEN_METRICS,
    trainer_defaults=TRAINER_CLIP,
    rank=1,
))  # fmt: skip
