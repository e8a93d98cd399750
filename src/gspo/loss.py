"""GSPO, GSPO-token and a token-level (GRPO) baseline: log-probs in, (loss, metrics) out.

The objective is SPEC.md's, batched: many groups, padded or packed sequences,
asymmetric clipping, and a divisor that stays right under data parallelism.
``gspo.reference.sequence_objective`` is the pure-Python contract it is tested
against.

Shapes: B sequences, T padded length, N packed tokens.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gspo.fused import k3_sum, seq_log_ratio
from gspo.groups import NORMS
from gspo.groups import advantages as group_advantages
from gspo.groups import as_tensor as group_as_tensor
from gspo.masking import Layout, packed_layout, padded_layout

VARIANTS = ("sequence", "token", "grpo")

# Bound on |mean log-ratio| before exp (SPEC.md step 2). exp(20) ~ 4.9e8, so a
# clamped ratio is still ~1e8 times outside any clip range [1 - eps, 1 + eps]
# with eps < 1: the clip decision and, for A > 0, the clipped value are unchanged,
# and results are exact wherever |mean log-ratio| <= 20. Beyond it the ratio (and
# the unclipped branch taken for A < 0) is held at e^20 with zero gradient, instead
# of overflowing to inf/NaN (e^89 overflows float32) and poisoning the whole batch.
MAX_LOG_RATIO = 20.0


def gspo_loss(
    logp: Tensor,
    logp_old: Tensor,
    mask: Tensor | None = None,
    *,
    seq_lens: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    rewards: Tensor | None = None,
    group_size: int | None = None,
    group_ids: Tensor | None = None,
    advantages: Tensor | None = None,
    adv_norm: str = "population",
    eps_low: float = 3e-4,
    eps_high: float | None = None,
    variant: str = "sequence",
    num_sequences: int | None = None,
    max_log_ratio: float = MAX_LOG_RATIO,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The GSPO loss ``-(1/num_sequences) * sum_i L_i`` and detached metrics.

    Padded form: ``logp``, ``logp_old`` [B,T] and ``mask`` [B,T] bool (True = a
    response token that counts). Packed form: ``logp``, ``logp_old`` [N] with
    ``seq_lens`` [B] or ``cu_seqlens`` [B+1]. Slots outside the valid tokens may
    hold any value, NaN and inf included.

    Advantages: ``rewards`` [B] with ``group_size`` (contiguous groups) or
    ``group_ids`` [B], standardised per group by ``adv_norm`` (see gspo.groups);
    or precomputed ``advantages`` [B] (or per token, [B,T]/[N], for the "token"
    and "grpo" variants).

    Variants (per sequence i with T_i valid tokens, A_i its advantage):
        "sequence"  GSPO: s_i = exp(mean_t(logp - logp_old)),
                    L_i = min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i)
        "token"     GSPO-token: s_it = sg[s_i] * exp(logp_t - sg[logp_t]),
                    L_i = mean_t min(s_it A_it, clip(s_it) A_it); equal to
                    "sequence" in value and gradient when A_it = A_i
        "grpo"      token-level ratio r_it = exp(logp_t - logp_old_t),
                    L_i = mean_t min(r_it A_it, clip(r_it) A_it) (for A/B tests)

    Args:
        eps_low, eps_high: clip range [1 - eps_low, 1 + eps_high]; eps_high
            defaults to eps_low (the spec's symmetric epsilon). The GSPO paper
            uses 3e-4 / 4e-4, since a length-normalised ratio stays near 1.
        num_sequences: the divisor; default B. Under data parallelism pass the
            global number of sequences across ranks (and sum gradients).
        max_log_ratio: bound on |log-ratio| before exp; see MAX_LOG_RATIO.

    Returns:
        (loss, metrics): loss is a 0-dim tensor in the compute dtype (float64 for
        float64 inputs, else float32); metrics are detached 0-dim tensors:
        clip_frac_low, clip_frac_high (share of sequences, or tokens for
        "token"/"grpo", whose clip is active, i.e. its gradient is cut), ratio_mean,
        ratio_min, ratio_max, approx_kl (k3 estimate of KL(old || new) per token),
        adv_mean, adv_std, zero_adv_frac.

    Equals, on valid tokens (the eager code it is tested against)::

        s = exp(((logp - logp_old) * mask).sum(-1) / mask.sum(-1))
        loss = -minimum(s * A, s.clamp(1 - eps_low, 1 + eps_high) * A).mean()
    """
    # Python sequences of numbers are accepted (gspo.groups.as_tensor names a bad element).
    rewards = group_as_tensor("rewards", rewards, getattr(logp, "device", None))
    group_ids = group_as_tensor("group_ids", group_ids, getattr(logp, "device", None))
    dtype = _compute_dtype(logp)
    eps_high = eps_low if eps_high is None else eps_high
    _check_scalars(eps_low, eps_high, variant, adv_norm, max_log_ratio)
    layout = _layout(logp, logp_old, mask, seq_lens, cu_seqlens, dtype)
    adv = _advantages(layout, logp, rewards, group_size, group_ids, advantages, adv_norm, variant)
    divisor = _divisor(num_sequences, layout.batch)

    lo, hi = 1.0 - eps_low, 1.0 + eps_high
    if variant == "sequence" and layout.mask is not None:
        # Hot path: one fused reduction forward, one masked broadcast backward.
        seq_lr, k3_sum = seq_log_ratio(logp, logp_old, layout, max_log_ratio)
        _check_finite(seq_lr, logp, logp_old, layout)
        kl = k3_sum.sum() / layout.count.sum()
        ratio = seq_lr.clamp(-max_log_ratio, max_log_ratio).exp()
        objective = torch.minimum(ratio * adv, ratio.clamp(lo, hi) * adv)
        adv_full = adv
    else:
        # The only per-token arithmetic before selection is the cast; everything
        # after works on selected values, so garbage cannot reach a sum or a gradient.
        logp = layout.select(logp.to(dtype))
        logp_old = layout.select(logp_old.detach().to(dtype))
        log_ratio = logp - logp_old
        seq_lr = layout.seq_mean(log_ratio)
        _check_finite(seq_lr, logp, logp_old, layout)
        kl = _approx_kl(layout, log_ratio, max_log_ratio)
        ratio, adv_full = _token_ratio(layout, logp, log_ratio, seq_lr, adv, variant, max_log_ratio)
        objective = torch.minimum(ratio * adv_full, ratio.clamp(lo, hi) * adv_full)
        if variant != "sequence":
            objective = layout.seq_mean(layout.select(objective))
    loss = -objective.sum() / divisor
    return loss, _metrics(layout, ratio, adv, adv_full, lo, hi, variant, kl)


def _token_ratio(layout, logp, log_ratio, seq_lr, adv, variant, bound):
    """(ratio, advantage) in the layout each variant's objective is taken in."""
    if variant == "sequence":  # packed GSPO: per sequence
        return seq_lr.clamp(-bound, bound).exp(), adv
    adv_full = layout.expand(adv) if adv.dim() == 1 else adv
    if variant == "grpo":
        return layout.select(log_ratio.clamp(-bound, bound).exp()), adv_full
    # GSPO-token (paper section 4.3): value s_i, gradient s_i * d logp_t.
    seq_ratio = seq_lr.clamp(-bound, bound).exp().detach()
    return layout.select(layout.expand(seq_ratio) * (logp - logp.detach()).exp()), adv_full


# ------------------------------------------------------------------ metrics


@torch.no_grad()
def _approx_kl(layout: Layout, log_ratio: Tensor, bound: float) -> Tensor:
    """Mean over valid tokens of k3 = (r - 1) - log r >= 0, r = p_new / p_old (Schulman)."""
    return k3_sum(layout.select(log_ratio.detach()), bound).sum() / layout.count.sum()


@torch.no_grad()
def _metrics(layout: Layout, ratio, adv, adv_full, lo, hi, variant, kl):
    ratio = ratio.detach()
    if variant == "sequence":
        low = (ratio < lo) & (adv_full < 0)
        high = (ratio > hi) & (adv_full > 0)
        clip_low, clip_high = low.float().mean(), high.float().mean()
        r_mean, r_min, r_max = ratio.mean(), ratio.min(), ratio.max()
    else:
        adv_tok = adv_full.expand_as(ratio)
        low = layout.select((ratio < lo) & (adv_tok < 0), False)
        high = layout.select((ratio > hi) & (adv_tok > 0), False)
        clip_low = layout.token_mean(low.to(ratio.dtype))
        clip_high = layout.token_mean(high.to(ratio.dtype))
        r_mean = layout.token_mean(ratio)
        r_min, r_max = layout.token_min(ratio), layout.token_max(ratio)
    if adv.shape == ratio.shape and variant != "sequence" and adv.shape != (layout.batch,):
        adv_mean = layout.token_mean(adv)  # per-token advantages, already selected
        adv_std = layout.token_mean(layout.select((adv - adv_mean).square())).sqrt()
        zero_adv = layout.token_mean(layout.select((adv == 0).to(adv.dtype)))
    else:
        adv_mean, adv_std, zero_adv = adv.mean(), adv.std(unbiased=False), (adv == 0).float().mean()
    return {
        "clip_frac_low": clip_low,
        "clip_frac_high": clip_high,
        "ratio_mean": r_mean,
        "ratio_min": r_min,
        "ratio_max": r_max,
        "approx_kl": kl,
        "adv_mean": adv_mean,
        "adv_std": adv_std,
        "zero_adv_frac": zero_adv,
    }


# --------------------------------------------------------------- validation


def _compute_dtype(logp: Tensor) -> torch.dtype:
    if not isinstance(logp, Tensor):
        raise TypeError(f"logp must be a torch.Tensor, got {type(logp).__name__}")
    if not logp.dtype.is_floating_point:
        raise ValueError(f"logp must be a floating-point tensor, got {logp.dtype}")
    # At least float32 whatever comes in (bf16 sums over thousands of tokens drift).
    return torch.float64 if logp.dtype == torch.float64 else torch.float32


def _check_scalars(eps_low, eps_high, variant, adv_norm, max_log_ratio) -> None:
    for name, value in (("eps_low", eps_low), ("eps_high", eps_high),
                        ("max_log_ratio", max_log_ratio)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if adv_norm not in NORMS:
        raise ValueError(f"adv_norm must be one of {NORMS}, got {adv_norm!r}")


def _layout(logp, logp_old, mask, seq_lens, cu_seqlens, dtype) -> Layout:
    if not isinstance(logp_old, Tensor):
        raise TypeError(f"logp_old must be a torch.Tensor, got {type(logp_old).__name__}")
    if logp_old.shape != logp.shape:
        raise ValueError(
            f"logp_old has shape {tuple(logp_old.shape)} but logp has {tuple(logp.shape)}"
        )
    if not logp_old.dtype.is_floating_point:
        raise ValueError(f"logp_old must be a floating-point tensor, got {logp_old.dtype}")
    _same_device("logp_old", logp_old, logp)
    packed = seq_lens is not None or cu_seqlens is not None
    if packed:
        if mask is not None:
            raise ValueError(
                "give mask (padded [B,T]) or seq_lens/cu_seqlens (packed [N]), not both"
            )
        return _packed_layout(logp, seq_lens, cu_seqlens, dtype)
    if mask is None:
        raise ValueError(
            "mask [B,T] is required for padded input (or pass seq_lens for packed [N])"
        )
    if logp.dim() != 2:
        raise ValueError(f"padded logp must have shape [B,T], got {tuple(logp.shape)}")
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a bool tensor (True = valid token), got {got}")
    if mask.shape != logp.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but logp has {tuple(logp.shape)}")
    _same_device("mask", mask, logp)
    if logp.shape[0] == 0:
        raise ValueError("the batch holds no sequences (B == 0)")
    layout = padded_layout(mask, dtype)
    _check_nonempty(layout.count, "mask row")
    return layout


def _packed_layout(logp, seq_lens, cu_seqlens, dtype) -> Layout:
    if seq_lens is not None and cu_seqlens is not None:
        raise ValueError("give seq_lens or cu_seqlens, not both")
    if logp.dim() != 1:
        raise ValueError(f"packed logp must have shape [N], got {tuple(logp.shape)}")
    name, lens = ("seq_lens", seq_lens) if seq_lens is not None else ("cu_seqlens", cu_seqlens)
    if not isinstance(lens, Tensor) or lens.dtype.is_floating_point or lens.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor")
    _same_device(name, lens, logp)
    if lens.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(lens.shape)}")
    if cu_seqlens is not None:
        if lens.shape[0] < 2 or int(lens[0]) != 0:
            raise ValueError("cu_seqlens must be [B+1] offsets starting at 0, with B >= 1")
        lens = lens.diff()
    if lens.shape[0] == 0:
        raise ValueError("the batch holds no sequences (B == 0)")
    _check_nonempty(lens, "sequence")
    if int(lens.sum()) != logp.shape[0]:
        raise ValueError(f"{name} cover {int(lens.sum())} tokens but logp holds {logp.shape[0]}")
    return packed_layout(lens.long(), dtype)


def _check_nonempty(count: Tensor, what: str) -> None:
    empty = count <= 0
    if empty.any():
        i = int(empty.nonzero()[0])
        raise ValueError(f"{what} {i} has {int(count[i])} valid tokens; every sequence needs >= 1")


def _advantages(layout, logp, rewards, group_size, group_ids, advantages, adv_norm, variant):
    if (rewards is None) == (advantages is None):
        raise ValueError(
            "give exactly one of rewards [B] (with group_size or group_ids) or advantages"
        )
    if rewards is not None:
        if not isinstance(rewards, Tensor):
            raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
        if rewards.shape != (layout.batch,):
            raise ValueError(
                f"rewards must have shape [B]=({layout.batch},), got {tuple(rewards.shape)}"
            )
        _same_device("rewards", rewards, logp)
        return group_advantages(rewards, group_size, group_ids, adv_norm).to(layout.count.dtype)
    if group_size is not None or group_ids is not None:
        raise ValueError("group_size/group_ids go with rewards; advantages are already per group")
    return _check_advantages(layout, logp, advantages, variant)


def _check_advantages(layout, logp, adv, variant) -> Tensor:
    if not isinstance(adv, Tensor):
        raise TypeError(f"advantages must be a torch.Tensor, got {type(adv).__name__}")
    _same_device("advantages", adv, logp)
    per_token = adv.shape == logp.shape and adv.dim() == logp.dim() and adv.shape != (layout.batch,)
    if per_token and variant == "sequence":
        raise ValueError(
            "per-token advantages need variant='token' or 'grpo'; GSPO's ratio is per sequence"
        )
    if adv.shape != (layout.batch,) and not per_token:
        raise ValueError(
            f"advantages must have shape [B]=({layout.batch},) or that of logp "
            f"{tuple(logp.shape)}, got {tuple(adv.shape)}"
        )
    adv = adv.detach().to(layout.count.dtype)
    valid = layout.select(adv) if per_token else adv
    if not torch.isfinite(valid).all():
        raise ValueError("advantages must be finite (on valid tokens)")
    return valid


def _divisor(num_sequences, batch) -> int:
    if num_sequences is None:
        return batch
    if isinstance(num_sequences, bool) or not isinstance(num_sequences, int):
        raise TypeError(f"num_sequences must be an int, got {type(num_sequences).__name__}")
    if num_sequences < batch:
        raise ValueError(
            f"num_sequences={num_sequences} is smaller than this batch's {batch} sequences; "
            "pass the global count across data-parallel ranks"
        )
    return num_sequences


def _same_device(name: str, x: Tensor, logp: Tensor) -> None:
    if x.device != logp.device:
        raise ValueError(f"{name} is on {x.device} but logp is on {logp.device}")


def _check_finite(seq_log_ratio: Tensor, logp: Tensor, logp_old: Tensor, layout: Layout) -> None:
    # One cheap [B] test; the per-token search runs only when something is wrong.
    if torch.isfinite(seq_log_ratio).all():
        return
    for name, x in (("logp", logp), ("logp_old", logp_old)):
        bad = ~torch.isfinite(layout.select(x.detach()))
        if bad.any():
            where = tuple(int(v) for v in bad.nonzero()[0])
            raise ValueError(f"{name} is non-finite at valid position {where}")
    raise ValueError("the summed log-ratio overflowed; log-probs are far too large")
