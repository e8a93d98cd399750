"""Sampler-vs-trainer mismatch: how far the rollout engine's log-probs are from the
trainer's, and optional importance corrections for it.

Even with the same weights, the engine that samples (vLLM kernels, KV cache, bf16 on GPU)
and the trainer's forward pass give slightly different log-probs. With
``delta = logp_old - logp_sampler`` on each response token (trainer minus sampler):

* ``mismatch_k3``: the mean over tokens of exp(delta) - 1 - delta, an unbiased and
  non-negative estimate of KL(sampler || trainer) per token from the sampler's own samples;
* ``mismatch_max_abs``: the largest |delta| in the batch;
* ``mismatch_seq_ratio_min`` / ``_max``: the extremes of each sequence's geometric-mean
  ratio exp(mean_t delta), the quantity GSPO clips (1 exactly when the two agree).

Corrections multiply each sample's advantage by a weight w >= 0 that is a constant (no
gradient). Because w >= 0, w * min(s A, clip(s) A) = min(s wA, clip(s) wA): weighting
the advantage weights the clipped objective term.

* ``seq-mask``: w = 1 if the geometric-mean ratio lies in [low, high], else 0. It is
  length-normalised like GSPO's own ratio, so small per-token differences do not add up and
  long responses are not dropped for being long; only sequences where the sampler's
  distribution really differs are.
* ``seq-tis``: w = min(prod_t exp(delta_t), cap), the sequence's true importance weight,
  truncated. The product is what corrects a whole sequence's probability, but its spread
  grows with length: long responses get weights far from 1, more of them hit the cap
  (biased towards the sampler) or shrink towards 0 (they barely count).
* ``token-tis``: w_t = min(exp(delta_t), cap) per token; needs a per-token loss
  (gspo-token, grpo). Length does not compound it, but it ignores how the tokens before t
  were sampled.

Shapes: B sequences, T response tokens; ``mask`` [B, T] True = a response token; masked
slots may hold garbage (NaN, inf).
"""

from __future__ import annotations

import math

import torch

from gspo.loss import k3
from gspo.masking import masked_mean


def _delta(logp_old: torch.Tensor, logp_sampler: torch.Tensor, mask: torch.Tensor):
    zero = torch.zeros((), dtype=torch.float32, device=logp_old.device)
    d = torch.where(mask, logp_old.float() - logp_sampler.float(), zero)
    count = mask.sum(dim=1).clamp(min=1)
    return d, count


def mismatch(logp_old, logp_sampler, mask) -> dict[str, float]:
    """The four mismatch metrics above, as floats."""
    d, count = _delta(logp_old, logp_sampler, mask)
    # float64 and expm1: at float32 rounding-level deltas (~1e-7) k3 ~ delta^2 / 2 ~ 1e-14,
    # which exp(d) - 1 - d in float32 rounds to exactly 0.
    d = d.double().clamp(-20.0, 20.0)  # exp stays finite; |delta| > 20 is a broken sampler
    seq_ratio = torch.exp(d.sum(dim=1) / count)
    return {
        "mismatch_k3": float(masked_mean(k3(d), mask)),
        "mismatch_max_abs": float(torch.where(mask, d.abs(), torch.zeros_like(d)).max()),
        "mismatch_seq_ratio_min": float(seq_ratio.min()),
        "mismatch_seq_ratio_max": float(seq_ratio.max()),
    }


def weights(kind: str, logp_old, logp_sampler, mask, *, low: float, high: float, cap: float):
    """(w, frac): w [B] (sequence kinds) or [B, T] (token-tis), None for ``none``; frac is
    the fraction of sequences (tokens for token-tis) masked or truncated."""
    if kind == "none":
        return None, 0.0
    d, count = _delta(logp_old, logp_sampler, mask)
    if kind == "seq-mask":
        geo = d.sum(dim=1) / count  # log of the geometric-mean ratio
        keep = (geo >= math.log(low)) & (geo <= math.log(high))
        return keep.float(), float(1.0 - keep.float().mean())
    log_cap = math.log(cap)
    if kind == "seq-tis":
        total = d.sum(dim=1)  # log of the product of token ratios
        return torch.exp(total.clamp(max=log_cap)), float((total > log_cap).float().mean())
    if kind == "token-tis":
        w = torch.where(mask, torch.exp(d.clamp(max=log_cap)), torch.ones_like(d))
        truncated = (mask & (d > log_cap)).sum() / mask.sum().clamp(min=1)
        return w, float(truncated)
    raise ValueError(f"--rollout-correction {kind!r}: use none, seq-mask, seq-tis or token-tis")


def weigh(adv: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """Advantages [B] times sequence weights [B], or times token weights -> [B, T]."""
    if w is None:
        return adv
    return adv * w if w.dim() == 1 else adv[:, None] * w
