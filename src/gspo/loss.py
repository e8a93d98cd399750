"""GSPO, GSPO-token, a token-level (GRPO) baseline, and SAPO / CISPO / GMPO: log-probs in,
(loss, metrics) out.

The objectives are docs/spec.md's, batched: many groups, padded or packed sequences,
asymmetric clipping, and a divisor that stays right under data parallelism.
``gspo.reference`` is the pure-Python contract they are tested against. SAPO, CISPO
and GMPO are computed in gspo.objectives; this module validates and dispatches.

Shapes: B sequences, T padded length, N packed tokens.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gspo import objectives
from gspo.advantages import NORMS
from gspo.advantages import advantages as group_advantages
from gspo.advantages import as_tensor as group_as_tensor
from gspo.masking import Layout, packed_layout, padded_layout
from gspo.reference import MAX_LOG_RATIO, check_arguments, check_clip_range

# the values of `gspo train --loss`
VARIANTS = ("gspo", "gspo-token", "grpo", *objectives.VARIANTS)
GSPO_EPS = 3e-4  # eps_low's default for gspo, gspo-token and grpo (the GSPO paper's scale)

# Not compiled. torch.compile(gspo_loss) on CPU, measured by bench/loss.py in four runs
# on a quiet 2-core machine (torch 2.13, forward + backward, docs/benchmarks): first call 2.2-6.3 s
# (compilation; again for each new dtype or variant, and once more when shapes change, to
# a dynamic-shape graph); then slower than eager at 64 x 1024 in every run, and at
# 512 x 4096 faster only than a fresh process's cold eager calls (3.0-3.2 against 8.8-9.0
# ms, where the warm loop takes 2.0-2.7), mixed with one thread. No consistent saving
# repays the first call, so the eager path is the only one. Re-measure with
# `bench/loss.py --compile-sizes ...` (and on a GPU) before changing this.


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
    eps_low: float | None = None,
    eps_high: float | None = None,
    variant: str = "gspo",
    num_sequences: int | None = None,
    max_log_ratio: float = MAX_LOG_RATIO,
    kl_metric: bool = True,
    tau_pos: float | None = None,
    tau_neg: float | None = None,
    num_tokens: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The GSPO loss ``-(1/num_sequences) * sum_i L_i`` (or a variant's) and detached metrics.

    Padded form: ``logp``, ``logp_old`` [B,T] and ``mask`` [B,T] bool (True = a
    response token that counts). Packed form: ``logp``, ``logp_old`` [N] with
    ``seq_lens`` [B] or ``cu_seqlens`` [B+1]. Slots outside the valid tokens may
    hold any value, NaN and inf included: they change neither value nor gradient.

    ``logp`` and ``logp_old`` may be any float dtypes, also different ones (a bf16
    policy against float32 sampler log-probs is common): both are upcast to the
    compute dtype, float64 if either is float64 and float32 otherwise, *before*
    they are subtracted, so a padded and a packed bf16 batch give the same loss.

    Advantages: ``rewards`` [B] with ``group_size`` (contiguous groups) or
    ``group_ids`` [B], standardised per group by ``adv_norm`` (see gspo.advantages);
    or precomputed ``advantages`` [B] (or per token, [B,T]/[N], for the "gspo-token",
    "grpo", "sapo" and "cispo" variants).

    Variants (per sequence i with T_i valid tokens, A_i its advantage):
        "gspo"      GSPO: s_i = exp(mean_t(logp - logp_old)),
                    L_i = min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i)
        "gspo-token" GSPO-token: s_it = sg[s_i] * exp(logp_t - sg[logp_t]),
                    L_i = mean_t min(s_it A_it, clip(s_it) A_it); equal to
                    "gspo" in value and gradient when A_it = A_i
        "grpo"      token-level ratio r_it = exp(logp_t - logp_old_t),
                    L_i = mean_t min(r_it A_it, clip(r_it) A_it) (for A/B tests)
        "sapo"      SAPO (arXiv 2511.20347, its objective J): L_i = mean_t g(r_it) A_i,
                    g(r) = (4/tau) sigmoid(tau (r - 1)), tau = tau_pos if A_i > 0
                    else tau_neg (defaults 1.0, 1.05)
        "cispo"     CISPO (MiniMax-M1, arXiv 2506.13585, J_CISPO):
                    L = sum_i sum_t sg(w_it) A_i logp_it / num_tokens,
                    w_it = min(r_it, 1 + eps_high) (and >= 1 - eps_low if given)
        "gmpo"      GMPO (arXiv 2507.20673, J_GMPO): L_i = A_i exp(mean_t m_it),
                    m_it = s min(s d_it, s clip(d_it, -eps_low, eps_high)),
                    d_it = logp_t - logp_old_t, s = sign(A_i)
    docs/spec.md works an example of each; docs/objectives.md says how peers differ.

    Args:
        eps_low, eps_high: clip range [1 - eps_low, 1 + eps_high] with
            0 < eps_low < 1 and eps_high > 0 (the rule of
            ``gspo.reference.check_clip_range``, shared with ``gspo objective``);
            eps_low defaults to 3e-4 and eps_high to eps_low (the spec's symmetric
            epsilon). The GSPO paper uses 3e-4 / 4e-4, since a length-normalised
            ratio stays near 1. "cispo": eps_high caps the weight at 1 + eps_high
            (default 4.0: a cap of 5); eps_low, only if given, floors it at
            1 - eps_low. "gmpo": the clip range of the log-ratio, [-eps_low,
            eps_high], both > 0 (default 0.4; eps_high defaults to eps_low).
            "sapo" has no clip range and refuses both.
        tau_pos, tau_neg: "sapo" only: the gate's temperatures (> 0) for A > 0
            and A <= 0; defaults 1.0 and 1.05 (the SAPO paper's).
        num_sequences: the divisor; default B. Under data parallelism pass the
            global number of sequences across ranks (and sum gradients). Not for
            "cispo", which divides by tokens.
        num_tokens: "cispo" only: the divisor, default the number of valid tokens
            of this batch. Under data parallelism (or gradient accumulation) pass
            the global count of valid tokens across ranks and micro-batches (an
            all-reduce of each rank's count) and sum gradients.
        max_log_ratio: bound on |mean log-ratio| (|token log-ratio| for the
            token-level variants) before exp; see ``gspo.reference.MAX_LOG_RATIO``.
        kl_metric: compute ``approx_kl``, the one metric that needs its own pass
            over the tokens (an ``expm1`` per token: about as much time again as
            the loss at 512 x 4096, bench/loss.py). False leaves it out.

    Returns:
        (loss, metrics): loss is a 0-dim tensor in the compute dtype; metrics are
        detached 0-dim tensors: clip_frac_low, clip_frac_high (share of sequences,
        or tokens for "gspo-token"/"grpo", whose clip is active, i.e. its gradient is
        cut), ratio_mean, ratio_min, ratio_max, approx_kl (k3 estimate of
        KL(old || new) per token; only with kl_metric), adv_mean, adv_std,
        zero_adv_frac. "sapo", "cispo" and "gmpo" report the token ratios r_t and
        replace the clip fractions by what means something for each: "sapo"
        gate_weight_mean and gate_weight_low_frac (mean of the gate's gradient
        weight 4 s (1 - s), s = sigmoid(tau (r_t - 1)), and the share of tokens
        where it is below 0.5); "cispo" bound_frac_high and bound_frac_low (share
        of tokens whose weight sits at 1 + eps_high, or at 1 - eps_low); "gmpo"
        clip_frac_low and clip_frac_high as shares of tokens whose clip cuts the
        gradient (A < 0 below -eps_low, A > 0 above eps_high).

    Host syncs (``.item()``-like waits for the device): one for a padded batch
    with ``advantages``, the validity check of every input in a single boolean.
    A packed batch adds one (its lengths must cover N before they are used);
    ``rewards`` add one (``gspo.advantages`` checks them), ``group_ids`` more
    (``torch.unique`` and the group count).
    Errors are diagnosed after that one check fails, so valid calls pay nothing more.

    Equals, on valid tokens (the eager code it is tested against)::

        log_ratio = torch.where(mask, logp.float() - logp_old.float(), 0)
        s = exp(clamp(log_ratio.sum(-1) / mask.sum(-1).clamp(min=1), -20, 20))
        loss = -minimum(s * A, s.clamp(1 - eps_low, 1 + eps_high) * A).sum() / B
    """
    # Python sequences of numbers are accepted (gspo.advantages.as_tensor names a bad element).
    rewards = group_as_tensor("rewards", rewards, getattr(logp, "device", None))
    group_ids = group_as_tensor("group_ids", group_ids, getattr(logp, "device", None))
    dtype = _compute_dtype(logp, logp_old)
    _check_names(variant, adv_norm)
    if variant in objectives.VARIANTS or (tau_pos, tau_neg, num_tokens) != (None, None, None):
        check_arguments(variant, eps_low=eps_low, eps_high=eps_high, tau_pos=tau_pos,
                        tau_neg=tau_neg, num_sequences=num_sequences,
                        num_tokens=num_tokens)  # fmt: skip
    if variant in objectives.VARIANTS:
        params = objectives.resolve(variant, eps_low, eps_high, tau_pos, tau_neg, max_log_ratio)
    else:
        eps_low = GSPO_EPS if eps_low is None else eps_low
        eps_high = eps_low if eps_high is None else eps_high
        check_clip_range(eps_low, eps_high, max_log_ratio)
        lo, hi = 1.0 - eps_low, 1.0 + eps_high
    layout = _layout(logp, logp_old, mask, seq_lens, cu_seqlens, dtype)
    adv = _advantages(layout, logp, rewards, group_size, group_ids, advantages, adv_norm, variant)
    divisor = _divisor(num_sequences, layout.batch)
    if variant == "cispo":
        divisor = layout.count.sum() if num_tokens is None else _token_divisor(num_tokens)

    bound = max_log_ratio
    if variant == "gspo":  # the hot path: steps 2-5, backward written out
        out: dict[str, Tensor] = {}  # the forward's by-products (no gradient)
        loss = SequenceLoss.apply(
            logp, logp_old, adv, layout.mask, layout.seq_lens, layout.count,
            (dtype, bound, lo, hi, divisor, layout.num_tokens), out,
        )  # fmt: skip
        seq_log_ratio, ratio, clipped = out["seq_log_ratio"], out["ratio"], out["clipped"]
        log_ratio = out["log_ratio"]
        _check_valid(seq_log_ratio, adv, logp, logp_old, layout)
        metrics = _metrics(layout, ratio, clipped, adv, per_token=False)
    else:  # per token, then a mean per sequence; autograd
        log_ratio = _log_ratio(layout, logp, logp_old, dtype)
        seq_log_ratio = layout.seq_mean(log_ratio)
        _check_valid(seq_log_ratio, adv, logp, logp_old, layout, num_tokens)
    if variant in objectives.VARIANTS:  # SAPO, CISPO, GMPO
        loss, ratio, metrics = objectives.token_loss(variant, layout, logp, log_ratio, adv, params,
                                                     bound, divisor)  # fmt: skip
        metrics.update(_ratio_adv_metrics(layout, ratio, adv, per_token=True))
    elif variant != "gspo":
        ratio, adv_tok = _token_ratio(layout, logp, log_ratio, seq_log_ratio, adv, variant, bound,
                                      dtype)  # fmt: skip
        term, term_clipped = ratio * adv_tok, ratio.clamp(lo, hi) * adv_tok
        loss = -layout.seq_mean(layout.select(torch.minimum(term, term_clipped))).sum() / divisor
        clipped = layout.select(term_clipped.detach() < term.detach(), False)
        metrics = _metrics(layout, ratio.detach(), clipped, adv, per_token=True)
    if kl_metric:
        metrics["approx_kl"] = _approx_kl(layout, log_ratio, bound)
    return loss, metrics


def _log_ratio(layout: Layout, logp: Tensor, logp_old: Tensor, dtype: torch.dtype) -> Tensor:
    """Per-token log-ratio [B,T]/[N], exactly 0 on masked slots (docs/spec.md step 2).

    Upcast first, subtract second (a bf16 difference would round before the
    float32 sum), then select: garbage in a masked slot never reaches a sum, and
    the gradient of torch.where is exactly 0 there.
    """
    return layout.select(logp.to(dtype) - logp_old.detach().to(dtype))


class SequenceLoss(torch.autograd.Function):
    """GSPO's loss (variant "gspo") from per-token log-probs, padded or packed.

    Forward, docs/spec.md steps 2-5 as written (A = adv, D = divisor)::

        log_ratio = _log_ratio(layout, logp, logp_old, dtype)      # [B,T] or [N]
        seq_log_ratio = layout.seq_mean(log_ratio)                        # [B]
        s = seq_log_ratio.clamp(-bound, bound).exp()
        loss = -torch.minimum(s * A, s.clamp(lo, hi) * A).sum() / D

    Backward: every valid token of sequence b gets the same gradient,
    ``d loss / d logp[b, t] = -A_b * s_b / (D * T_b)`` where the unclipped branch
    is the minimum and |seq_log_ratio_b| <= bound (else 0: the clip or the clamp cuts
    it), and 0 on masked slots. That is one masked broadcast of a [B] coefficient,
    where autograd through the code above walks 13 nodes; on CPU each node costs
    about 10 us (measured backward at 8 x 16, one thread: 158 us through autograd,
    62 us here), the larger part of the loss at small batches (bench/loss.py).
    On a GPU the backward is two launches (scale, masked broadcast) instead of
    one or more per node; the forward launches what autograd's would.
    Tests check value and gradient against autograd through the same code and
    against the pure reference (float64 gradcheck included).

    Returns the loss; fills ``out`` with seq_log_ratio, ratio (s), clipped and
    log_ratio, which carry no gradient. ``clipped`` [B] bool: the clip is active
    (the clipped branch is the minimum).
    """

    @staticmethod
    def forward(ctx, logp, logp_old, adv, mask, seq_lens, count, consts, out):
        dtype, bound, lo, hi, divisor, num_tokens = consts
        layout, tokens = Layout(mask, seq_lens, count, num_tokens), count.clamp(min=1)
        log_ratio = _log_ratio(layout, logp, logp_old, dtype)
        seq_log_ratio = layout.seq_sum(log_ratio) / tokens
        clamped = seq_log_ratio.clamp(-bound, bound)
        ratio = clamped.exp()
        term, term_clipped = ratio * adv, ratio.clamp(lo, hi) * adv
        loss = torch.minimum(term, term_clipped).sum() / -divisor
        # d loss / d seq_log_ratio, divided by T_b for the per-token mean; 0 where clipped
        clipped = term_clipped < term
        passes = ~clipped & (clamped == seq_log_ratio)
        coef = torch.where(passes, term / (tokens * -divisor), 0.0)
        ctx.save_for_backward(coef, mask, seq_lens, count)
        ctx.num_tokens, ctx.logp_dtype = num_tokens, logp.dtype
        out.update(seq_log_ratio=seq_log_ratio, ratio=ratio, clipped=clipped, log_ratio=log_ratio)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        coef, mask, seq_lens, count = ctx.saved_tensors
        layout = Layout(mask, seq_lens, count, ctx.num_tokens)
        grad = layout.select(layout.expand(coef * grad_loss))  # [B,T] or [N]
        return grad.to(ctx.logp_dtype), None, None, None, None, None, None, None


def _token_ratio(layout, logp, log_ratio, seq_log_ratio, adv, variant, bound, dtype):
    """(ratio, advantage) per token for the "gspo-token" and "grpo" variants."""
    adv_full = layout.expand(adv) if adv.dim() == 1 else adv
    if variant == "grpo":
        return layout.select(log_ratio.clamp(-bound, bound).exp()), adv_full
    # GSPO-token (paper section 4.3): value s_i, gradient s_i * d logp_t. logp is
    # selected before the exp so that garbage cannot meet a zero gradient there.
    logp = layout.select(logp.to(dtype))
    seq_ratio = seq_log_ratio.clamp(-bound, bound).exp().detach()
    return layout.select(layout.expand(seq_ratio) * (logp - logp.detach()).exp()), adv_full


# ------------------------------------------------------------------ metrics


def k3(log_ratio: Tensor, bound: float = MAX_LOG_RATIO) -> Tensor:
    """The k3 estimator of KL per token (Schulman, "Approximating KL divergence"):
    ``(r - 1) - log r = expm1(x) - x >= 0`` with ``x = log r`` clamped to [-bound, bound].

    With tokens sampled from q and ``x = log p/q`` its mean estimates KL(q || p) without
    bias. expm1 keeps the small KL of a near on-policy batch (x ~ 1e-3, k3 ~ 5e-7) that
    exp(x) - 1 loses to float32 rounding; the clamp keeps extremes finite. Elementwise,
    any shape; the one k3 of gspo (the loss's approx_kl, the trainer's KL penalty and
    its sampler-mismatch metric).
    """
    x = log_ratio.clamp(-bound, bound)
    return torch.expm1(x) - x


def _approx_kl(layout: Layout, log_ratio: Tensor, bound: float) -> Tensor:
    """Mean of ``k3`` over the valid tokens; ``log_ratio`` is 0 on masked slots, where k3
    is then exactly 0."""
    return k3(log_ratio.detach(), bound).sum() / layout.count.sum()


def _metrics(layout: Layout, ratio, clipped, adv, per_token: bool) -> dict[str, Tensor]:
    """Metrics from tensors that carry no gradient (so no no_grad context is needed).

    ratio, clipped: [B] (per sequence) or, with per_token, [B,T]/[N] selected
    (clipped is False on masked slots). clipped: the clip is active, i.e. the clipped branch is
    the minimum and the gradient is cut; for A < 0 that happens below 1 - eps_low
    (clip_frac_low), for A > 0 above 1 + eps_high (clip_frac_high).
    """
    clipped = clipped.to(ratio.dtype)
    if not per_token:  # everything is [B]
        clip_low, clip_high = (clipped * (adv < 0)).mean(), (clipped * (adv > 0)).mean()
    else:
        low, high = ((ratio < 1) & (clipped > 0)), ((ratio > 1) & (clipped > 0))
        clip_low = layout.token_mean(low.to(ratio.dtype))
        clip_high = layout.token_mean(high.to(ratio.dtype))
    return {"clip_frac_low": clip_low, "clip_frac_high": clip_high,
            **_ratio_adv_metrics(layout, ratio, adv, per_token)}  # fmt: skip


def _ratio_adv_metrics(layout: Layout, ratio, adv, per_token: bool) -> dict[str, Tensor]:
    """ratio_mean/min/max over sequences ([B] ratio) or valid tokens (per_token: selected
    [B,T]/[N]), and adv_mean, adv_std, zero_adv_frac (per token when adv is)."""
    if not per_token:
        r_mean, (r_min, r_max) = ratio.mean(), torch.aminmax(ratio)
    else:
        r_mean = layout.token_mean(ratio)
        r_min, r_max = layout.token_min(ratio), layout.token_max(ratio)
    if per_token and adv.shape == ratio.shape:
        adv_mean = layout.token_mean(adv)  # per-token advantages, already selected
        adv_std = layout.token_mean(layout.select((adv - adv_mean).square())).sqrt()
        zero_adv = layout.token_mean(layout.select((adv == 0).to(adv.dtype)))
    else:
        adv_std, adv_mean = torch.std_mean(adv, correction=0)
        zero_adv = (adv == 0).to(adv.dtype).mean()
    return {
        "ratio_mean": r_mean,
        "ratio_min": r_min,
        "ratio_max": r_max,
        "adv_mean": adv_mean,
        "adv_std": adv_std,
        "zero_adv_frac": zero_adv,
    }


# --------------------------------------------------------------- validation


def _compute_dtype(logp: Tensor, logp_old: Tensor) -> torch.dtype:
    """float64 if either input is float64, else float32 (bf16 sums over many tokens drift)."""
    for name, x in (("logp", logp), ("logp_old", logp_old)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    wide = torch.float64 in (logp.dtype, logp_old.dtype)
    return torch.float64 if wide else torch.float32


def _check_names(variant, adv_norm) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if adv_norm not in NORMS:
        raise ValueError(f"adv_norm must be one of {NORMS}, got {adv_norm!r}")


def _layout(logp, logp_old, mask, seq_lens, cu_seqlens, dtype) -> Layout:
    if logp_old.shape != logp.shape:
        raise ValueError(
            f"logp_old has shape {tuple(logp_old.shape)} but logp has {tuple(logp.shape)}"
        )
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
    return padded_layout(mask, dtype)  # empty rows are refused by _check_valid


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
        if lens.shape[0] < 2:
            raise ValueError("cu_seqlens must be [B+1] offsets starting at 0, with B >= 1")
        first, lens = lens[0], lens.diff()
    else:
        first = lens.new_zeros(())
    if lens.shape[0] == 0:
        raise ValueError("the batch holds no sequences (B == 0)")
    # The lengths steer segment_reduce, so they are checked before use: one host sync.
    total, lowest, first = torch.stack([lens.sum(), lens.min(), first]).tolist()
    if first != 0:
        raise ValueError("cu_seqlens must be [B+1] offsets starting at 0, with B >= 1")
    if lowest < 1:
        i = int((lens < 1).nonzero()[0])
        raise ValueError(f"sequence {i} has {int(lens[i])} valid tokens; every sequence needs >= 1")
    if total != logp.shape[0]:
        raise ValueError(f"{name} cover {total} tokens but logp holds {logp.shape[0]}")
    return packed_layout(lens.long(), logp.shape[0], dtype)


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
    if per_token and variant not in ("gspo-token", "grpo", *objectives.PER_TOKEN_ADVANTAGES):
        raise ValueError(
            f"per-token advantages need variant='gspo-token', 'grpo', 'sapo' or 'cispo'; "
            f"{variant!r} is per sequence (its ratio, or for gmpo sign(A_i), is one per sequence)"
        )
    if adv.shape != (layout.batch,) and not per_token:
        raise ValueError(
            f"advantages must have shape [B]=({layout.batch},) or that of logp "
            f"{tuple(logp.shape)}, got {tuple(adv.shape)}"
        )
    adv = adv.detach().to(layout.count.dtype)
    return layout.select(adv) if per_token else adv  # finiteness: _check_valid


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


def _token_divisor(num_tokens) -> int:
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int):
        raise TypeError(f"num_tokens must be an int, got {type(num_tokens).__name__}")
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    return num_tokens  # >= this batch's valid tokens: checked in _check_valid's one sync


def _same_device(name: str, x: Tensor, logp: Tensor) -> None:
    if x.device != logp.device:
        raise ValueError(f"{name} is on {x.device} but logp is on {logp.device}")


def _check_valid(
    seq_log_ratio: Tensor, adv: Tensor, logp, logp_old, layout: Layout, num_tokens=None
) -> None:
    """Every check that needs the data, in one host sync; the diagnosis runs only on failure.

    A non-finite value on a valid token makes its sequence's sum non-finite, so
    testing the [B] sums covers every valid token of logp and logp_old. With
    ``num_tokens`` (CISPO's global divisor) the batch's valid tokens must not exceed it.
    """
    # NaN and inf survive a sum (inf - inf is NaN), so one sum of the [B] sums and
    # the advantages tells whether any of them is non-finite.
    if num_tokens is None:
        total, fewest = torch.stack([seq_log_ratio.sum() + adv.sum(), layout.count.min()]).tolist()
        if math.isfinite(total) and fewest > 0:  # the one host sync of a valid call
            return
    else:
        total, fewest, tokens = torch.stack(
            [seq_log_ratio.sum() + adv.sum(), layout.count.min(), layout.count.sum()]
        ).tolist()
        if tokens > num_tokens:
            raise ValueError(
                f"num_tokens={num_tokens} is smaller than this batch's {int(tokens)} valid "
                "tokens; pass the global count across data-parallel ranks"
            )
        if math.isfinite(total) and fewest > 0:
            return
    if layout.mask is not None and not (layout.count > 0).all():
        i = int((layout.count <= 0).nonzero()[0])
        raise ValueError(f"mask row {i} has 0 valid tokens; every sequence needs >= 1")
    for name, x in (("logp", logp), ("logp_old", logp_old)):
        bad = ~torch.isfinite(layout.select(x.detach()))
        if bad.any():
            where = tuple(int(v) for v in bad.nonzero()[0])
            raise ValueError(f"{name} is non-finite at valid position {where}")
    if not torch.isfinite(adv).all():
        raise ValueError("advantages must be finite (on valid tokens)")
    raise ValueError("the summed log-ratio overflowed; log-probs are far too large")
