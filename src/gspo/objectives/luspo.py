"""LUSPO (arXiv 2602.05261): GSPO with each sequence's term multiplied by its length,
``L_i = T_i min(s_i A_i, clip(s_i) A_i)``, undoing GSPO's pull toward short answers (every
token of sequence i then gets the gradient s_i A_i / N, whatever T_i). GSPO's options and
defaults; the batched loss is GSPO's SequenceLoss with a weight T_i. Reference:
``gspo.reference_2026.luspo_terms``.
"""

from __future__ import annotations

from gspo.objectives.gspo import CLIP_OPTIONS, TRAINER_CLIP, clip_range
from gspo.objectives.registry import Objective, register
from gspo.reference_2026 import luspo_terms


def loss(x):
    from gspo.batched import sequence_clip_loss

    return sequence_clip_loss(x, 1.0 - x.params["eps_low"], 1.0 + x.params["eps_high"],
                              weight=x.layout.count)  # fmt: skip


register(Objective(
    name="luspo",
    summary="luspo (gspo with each sequence's term times its length)",
    loss=loss,
    options=CLIP_OPTIONS,
    resolve=clip_range,
    trainer_defaults=TRAINER_CLIP,
    reference=luspo_terms,
    explain=(("s_i", "value"), ("passes", "weight")),
    formula="L_i = T_i min(s_i A_i, clip(s_i) A_i)",
    rank=9,
))  # fmt: skip
