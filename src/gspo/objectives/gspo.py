"""GSPO (arXiv 2507.18071), docs/spec.md steps 1-5: the clipped, length-normalised
sequence ratio ``s_i = exp(mean_t(logp - logp_old))``,
``L_i = min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i)``, ``L = mean_i L_i``.

Reference: ``gspo.reference.sequence_terms``. The batched loss is
``gspo.batched.SequenceLoss`` (its backward written out: the hot path)."""

from __future__ import annotations

from gspo.objectives.registry import Objective, register, with_defaults
from gspo.reference import check_clip_range

EPS = 3e-4  # eps_low's default (the GSPO paper's scale); eps_high defaults to eps_low
CLIP_OPTIONS = {"eps_low": None, "eps_high": None}
# `gspo train`'s clip range when --eps-low/--eps-high are not given (the default run's
# tuning; the paper's 3e-4 / 4e-4 is gspo_loss's default)
TRAINER_CLIP = {"eps_low": 0.003, "eps_high": 0.004}


def clip_range(given: dict, max_log_ratio: float) -> dict:
    """eps_low (default 3e-4) and eps_high (default eps_low), checked by the spec's rule."""
    p = with_defaults(CLIP_OPTIONS, given)
    eps_low = EPS if p["eps_low"] is None else p["eps_low"]
    eps_high = eps_low if p["eps_high"] is None else p["eps_high"]
    check_clip_range(eps_low, eps_high, max_log_ratio)
    return {"eps_low": eps_low, "eps_high": eps_high}


def loss(x):
    from gspo.batched import sequence_clip_loss

    return sequence_clip_loss(x, 1.0 - x.params["eps_low"], 1.0 + x.params["eps_high"])


register(Objective(
    name="gspo",
    summary="gspo (sequence ratio)",
    loss=loss,
    options=CLIP_OPTIONS,
    resolve=clip_range,
    trainer_defaults=TRAINER_CLIP,
    rank=0,
))  # fmt: skip
