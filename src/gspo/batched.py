"""The batched building blocks the objectives share (gspo/objectives/*): the per-token
log-ratio, GSPO's sequence loss with its backward written out, the token ratio of
GSPO-token and GRPO, k3, and the ratio / clip / advantage metrics.

Shapes: B sequences, T padded length, N packed tokens. Every per-token tensor here is
selected (0, or False, on masked slots) before it reaches a sum.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gspo.masking import Layout
from gspo.reference import MAX_LOG_RATIO


def log_ratio(layout: Layout, logp: Tensor, logp_old: Tensor, dtype: torch.dtype) -> Tensor:
    """Per-token log-ratio [B,T]/[N], exactly 0 on masked slots (docs/spec.md step 2).

    Upcast first, subtract second (a bf16 difference would round before the
    float32 sum), then select: garbage in a masked slot never reaches a sum, and
    the gradient of torch.where is exactly 0 there.
    """
    return layout.select(logp.to(dtype) - logp_old.detach().to(dtype))


class SequenceLoss(torch.autograd.Function):
    """GSPO's loss (variant "gspo") from per-token log-probs, padded or packed.

    Forward, docs/spec.md steps 2-5 as written (A = adv, D = divisor)::

        log_ratio = log_ratio(layout, logp, logp_old, dtype)             # [B,T] or [N]
        seq_log_ratio = layout.seq_mean(log_ratio)                        # [B]
        s = seq_log_ratio.clamp(-bound, bound).exp()
        loss = -(weight * torch.minimum(s * A, s.clamp(lo, hi) * A)).sum() / D

    ``weight`` [B] is 1 for GSPO and each sequence's token count T_i for LUSPO.
    Backward: every valid token of sequence b gets the same gradient,
    ``d loss / d logp[b, t] = -weight_b * A_b * s_b / (D * T_b)`` where the unclipped
    branch is the minimum and |seq_log_ratio_b| <= bound (else 0: the clip or the clamp
    cuts it), and 0 on masked slots. That is one masked broadcast of a [B] coefficient,
    where autograd through the code above walks 13 nodes; on CPU each node costs
    about 10 us (measured backward at 8 x 16, one thread: 158 us through autograd,
    62 us here), the larger part of the loss at small batches (bench/loss.py).
    On a GPU the backward is two launches (scale, masked broadcast) instead of
    one or more per node; the forward launches what autograd's would.
    Tests check value and gradient against autograd through the same code and
    against the pure reference (float64 gradcheck included).

    ``consts`` ends with the log-ratio when the caller has it (gspo_loss does), else None.
    Returns the loss; fills ``out`` with seq_log_ratio, ratio (s), clipped and
    log_ratio, which carry no gradient. ``clipped`` [B] bool: the clip is active
    (the clipped branch is the minimum).
    """

    @staticmethod
    def forward(ctx, logp, logp_old, adv, mask, seq_lens, count, consts, out):
        dtype, bound, lo, hi, divisor, num_tokens, weight, lr = consts
        layout, tokens = Layout(mask, seq_lens, count, num_tokens), count.clamp(min=1)
        if lr is None:
            lr = log_ratio(layout, logp, logp_old, dtype)
        lr = lr.detach()
        seq_log_ratio = layout.seq_sum(lr) / tokens
        clamped = seq_log_ratio.clamp(-bound, bound)
        ratio = clamped.exp()
        term, term_clipped = ratio * adv, ratio.clamp(lo, hi) * adv
        best = torch.minimum(term, term_clipped)
        loss = (best if weight is None else best * weight).sum() / -divisor
        # d loss / d seq_log_ratio, divided by T_b for the per-token mean; 0 where clipped
        clipped = term_clipped < term
        passes = ~clipped & (clamped == seq_log_ratio)
        scale = tokens if weight is None else tokens / weight
        coef = torch.where(passes, term / (scale * -divisor), 0.0)
        ctx.save_for_backward(coef, mask, seq_lens, count)
        ctx.num_tokens, ctx.logp_dtype = num_tokens, logp.dtype
        out.update(seq_log_ratio=seq_log_ratio, ratio=ratio, clipped=clipped, log_ratio=lr)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        coef, mask, seq_lens, count = ctx.saved_tensors
        layout = Layout(mask, seq_lens, count, ctx.num_tokens)
        grad = layout.select(layout.expand(coef * grad_loss))  # [B,T] or [N]
        return grad.to(ctx.logp_dtype), None, None, None, None, None, None, None


def sequence_clip_loss(x, lo: float, hi: float, weight: Tensor | None = None):
    """(loss, metrics) of GSPO (``weight`` None) or LUSPO (``weight`` = T_i [B]) from
    ``x`` (gspo.objectives.registry.Inputs) through SequenceLoss; the metrics are
    per sequence."""
    layout, out = x.layout, {}
    loss = SequenceLoss.apply(
        x.logp, x.logp_old, x.adv, layout.mask, layout.seq_lens, layout.count,
        (x.dtype, x.bound, lo, hi, x.divisor, layout.num_tokens, weight, x.log_ratio), out,
    )  # fmt: skip
    return loss, clip_metrics(layout, out["ratio"], out["clipped"], x.adv, per_token=False)


def token_clip_loss(x, ratio: Tensor, lo: float, hi: float):
    """(loss, metrics) of a per-token clipped ratio (GSPO-token, GRPO): ``L_i = mean_t
    min(r_t A_t, clip(r_t) A_t)``, the mean over sequences divided by ``x.divisor``."""
    layout = x.layout
    adv_tok = layout.expand(x.adv) if x.adv.dim() == 1 else x.adv
    term, term_clipped = ratio * adv_tok, ratio.clamp(lo, hi) * adv_tok
    loss = -layout.seq_mean(layout.select(torch.minimum(term, term_clipped))).sum() / x.divisor
    clipped = layout.select(term_clipped.detach() < term.detach(), False)
    return loss, clip_metrics(layout, ratio.detach(), clipped, x.adv, per_token=True)


def token_ratios(x) -> Tensor:
    """r_t = exp(clamp(log_ratio_t, -bound, bound)) [B,T]/[N], 1 on masked slots; its
    gradient is 0 beyond the bound (MAX_LOG_RATIO)."""
    return x.log_ratio.clamp(-x.bound, x.bound).exp()


def expand_adv(x) -> Tensor:
    """The advantages per token [B,T]/[N] (broadcast from [B] if they are per sequence)."""
    return x.layout.expand(x.adv) if x.adv.dim() == 1 else x.adv


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


def clip_metrics(layout: Layout, ratio, clipped, adv, per_token: bool) -> dict[str, Tensor]:
    """clip_frac_low / clip_frac_high and the ratio statistics, from tensors that carry no
    gradient.

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
            **ratio_metrics(layout, ratio, per_token)}  # fmt: skip


def ratio_metrics(layout: Layout, ratio, per_token: bool) -> dict[str, Tensor]:
    """ratio_mean/min/max over sequences ([B] ratio) or valid tokens (per_token: selected
    [B,T]/[N])."""
    ratio = ratio.detach()
    if not per_token:
        r_mean, (r_min, r_max) = ratio.mean(), torch.aminmax(ratio)
    else:
        r_mean = layout.token_mean(ratio)
        r_min, r_max = layout.token_min(ratio), layout.token_max(ratio)
    return {"ratio_mean": r_mean, "ratio_min": r_min, "ratio_max": r_max}


def adv_metrics(layout: Layout, adv) -> dict[str, Tensor]:
    """adv_mean, adv_std (population) and zero_adv_frac: over sequences for adv [B], over
    valid tokens for per-token advantages (already selected; a packed batch of one-token
    sequences, where [N] is [B], gives the same either way)."""
    if adv.shape == (layout.batch,):
        adv_std, adv_mean = torch.std_mean(adv, correction=0)
        return {"adv_mean": adv_mean, "adv_std": adv_std,
                "zero_adv_frac": (adv == 0).to(adv.dtype).mean()}  # fmt: skip
    adv_mean = layout.token_mean(adv)
    adv_std = layout.token_mean(layout.select((adv - adv_mean).square())).sqrt()
    zero_adv = layout.token_mean(layout.select((adv == 0).to(adv.dtype)))
    return {"adv_mean": adv_mean, "adv_std": adv_std, "zero_adv_frac": zero_adv}
