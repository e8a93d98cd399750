"""gspo_loss: log-probs in, (loss, metrics) out, for every objective of the registry
(gspo.objectives: GSPO, GSPO-token, a token-level GRPO baseline, SAPO, CISPO, GMPO,
DPPO, VESPO, LUSPO).

The objectives are docs/spec.md's, batched: many groups, padded or packed sequences,
asymmetric clipping, and a divisor that stays right under data parallelism.
``gspo.reference`` is the pure-Python contract they are tested against. Each objective's
terms live in its own module of gspo.objectives; this module validates the inputs, builds
the layout and the advantages, applies the options every objective shares (the off-policy
sequence mask) and dispatches.

Shapes: B sequences, T padded length, N packed tokens.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gspo.advantages import NORMS
from gspo.advantages import advantages as group_advantages
from gspo.advantages import as_tensor as group_as_tensor
from gspo.batched import SequenceLoss, adv_metrics, k3
from gspo.batched import log_ratio as _log_ratio
from gspo.masking import Layout, packed_layout, padded_layout
from gspo.objectives import registry
from gspo.reference import MAX_LOG_RATIO

__all__ = ["SequenceLoss", "gspo_loss", "k3"]

# Not compiled. torch.compile(gspo_loss) on CPU, measured by bench/loss.py in four runs
# on a quiet 2-core machine (torch 2.13, forward + backward, docs/benchmarks): first call 2.2-6.3 s
# (compilation; again for each new dtype or variant, and once more when shapes change, to
# a dynamic-shape graph); then slower than eager at 64 x 1024 in every run, and at
# 512 x 4096 faster only than a fresh process's cold eager calls (3.0-3.2 against 8.8-9.0
# ms, where the warm loop takes 2.0-2.7), mixed with one thread. No consistent saving
# repays the first call, so the eager path is the only one. Re-measure with
# `bench/loss.py --compile-sizes ...` (and on a GPU) before changing this.


def __getattr__(name: str):
    if name == "VARIANTS":  # the registry's names (read, not a list kept here)
        return registry.names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    variant: str = "gspo",
    num_sequences: int | None = None,
    num_tokens: int | None = None,
    max_log_ratio: float = MAX_LOG_RATIO,
    kl_metric: bool = True,
    seq_mask_delta: float | None = None,
    **options: float | None,
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
    ``group_ids`` [B], standardised per group by ``adv_norm`` (see gspo.advantages;
    "maxrl" divides by the group's mean reward); or precomputed ``advantages`` [B]
    (or per token, [B,T]/[N], for the variants that take them: "gspo-token", "grpo",
    "sapo", "cispo", "dppo-tv", "dppo-kl", "vespo").

    Variants (the registry, gspo.objectives; per sequence i with T_i valid tokens,
    A_i its advantage, r_t = exp(logp_t - logp_old_t)):
        "gspo"      GSPO: s_i = exp(mean_t(logp - logp_old)),
                    L_i = min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i)
        "gspo-token" GSPO-token: s_it = sg[s_i] * exp(logp_t - sg[logp_t]),
                    L_i = mean_t min(s_it A_it, clip(s_it) A_it); equal to
                    "gspo" in value and gradient when A_it = A_i
        "grpo"      token-level ratio, L_i = mean_t min(r_t A_t, clip(r_t) A_t)
        "sapo"      SAPO (arXiv 2511.20347): L_i = mean_t g(r_t) A_i,
                    g(r) = (4/tau) sigmoid(tau (r - 1)), tau = tau_pos if A_i > 0
                    else tau_neg (defaults 1.0, 1.05)
        "cispo"     CISPO (arXiv 2506.13585): L = sum_i sum_t sg(w_t) A_i logp_t /
                    num_tokens, w_t = min(r_t, 1 + eps_high) (>= 1 - eps_low if given)
        "gmpo"      GMPO (arXiv 2507.20673): L_i = A_i exp(mean_t m_t), m_t the
                    log-ratio clipped to [-eps_low, eps_high] on the pessimistic side
        "dppo-tv"   DPPO Binary-TV (arXiv 2602.04879): L_i = mean_t M_t r_t A_i, M_t = 0
                    where A > 0 and p_t - p_old_t > delta_high, or A < 0 and
                    p_t - p_old_t < -delta_low (p = exp(logp)); defaults 0.15
        "dppo-kl"   DPPO Binary-KL: the same with the Bernoulli KL(p_old || p) > delta
                    on the side the advantage pushes; defaults 0.05
        "vespo"     VESPO (arXiv 2602.10693): L = sum_i sum_t sg(phi(w_i)) A_i logp_t /
                    num_tokens, w_i = exp(sum_t (logp_t - logp_old_t)),
                    phi(w) = w^k exp(lambda (1 - w)), (k, lambda) = (k_pos, lambda_pos)
                    for A >= 0 (2, 3), (k_neg, lambda_neg) for A < 0 (3, 2)
        "luspo"     LUSPO (arXiv 2602.05261): GSPO's L_i times T_i
    docs/spec.md works an example of each; docs/objectives.md says how peers differ.

    Args:
        variant: a name of ``gspo.objectives.names()``.
        **options: the variant's own options (a ValueError names one that does not
            apply, and why): eps_low, eps_high: clip range [1 - eps_low, 1 + eps_high]
            with 0 < eps_low < 1 and eps_high > 0 (``gspo.reference.check_clip_range``);
            for gspo, gspo-token, grpo and luspo eps_low defaults to 3e-4 and eps_high
            to eps_low (the spec's symmetric epsilon; the GSPO paper uses 3e-4 / 4e-4).
            "cispo": eps_high caps the weight at 1 + eps_high (default 4.0); eps_low,
            only if given, floors it at 1 - eps_low. "gmpo": the clip range of the
            log-ratio, [-eps_low, eps_high], both > 0 (default 0.4). tau_pos, tau_neg:
            "sapo"'s temperatures (> 0). delta_low, delta_high: DPPO's bounds (> 0).
            k_pos, lambda_pos, k_neg, lambda_neg: VESPO's shape (>= 0).
        seq_mask_delta: any variant: DeepSeek-V3.2's off-policy sequence mask. A sequence
            (a token, for per-token advantages) with A < 0 whose divergence
            ``D_i = mean_t (logp_old_t - logp_t)`` (detached; a k1 estimate of
            KL(pi_old || pi) on pi_old's samples) exceeds it has its advantage set to 0:
            it leaves the loss but still counts in the divisor. None (default) = off.
            ``logp_old`` is the policy that sampled when the caller passes the sampler's
            log-probs (docs/objectives.md says which under ``gspo train``).
        num_sequences: the divisor of the per-sequence variants; default B. Under data
            parallelism pass the global number of sequences across ranks (and sum
            gradients).
        num_tokens: the divisor of the per-token variants ("cispo", "vespo"), default the
            number of valid tokens of this batch. Under data parallelism (or gradient
            accumulation) pass the global count of valid tokens across ranks and
            micro-batches and sum gradients.
        max_log_ratio: bound on |mean log-ratio| (|token log-ratio| for the
            token-level variants, |sum log-ratio| for vespo) before exp; see
            ``gspo.reference.MAX_LOG_RATIO``.
        kl_metric: compute ``approx_kl``, the one metric that needs its own pass
            over the tokens (an ``expm1`` per token: about as much time again as
            the loss at 512 x 4096, bench/loss.py). False leaves it out.

    Returns:
        (loss, metrics): loss is a 0-dim tensor in the compute dtype; metrics are
        detached 0-dim tensors: the variant's own (clip_frac_low, clip_frac_high for
        the clipping variants: share of sequences, or tokens for the token-level ones,
        whose clip is active; "sapo" gate_weight_mean and gate_weight_low_frac;
        "cispo" bound_frac_high and bound_frac_low; "dppo-*" mask_frac_low and
        mask_frac_high, the share of tokens masked for A < 0 and A > 0; "vespo"
        phi_mean, the mean weight over sequences), ratio_mean, ratio_min, ratio_max
        (of s_i for gspo and luspo, of r_t otherwise; vespo: of w_i), approx_kl (k3
        estimate of KL(old || new) per token; only with kl_metric), adv_mean, adv_std,
        zero_adv_frac (before the sequence mask), and with seq_mask_delta
        seq_mask_frac (share of sequences masked).

    Host syncs (``.item()``-like waits for the device): one for a padded batch
    with ``advantages``, the validity check of every input in a single boolean.
    A packed batch adds one (its lengths must cover N before they are used);
    ``rewards`` add one (``gspo.advantages`` checks them), ``group_ids`` more
    (``torch.unique`` and the group count).
    Errors are diagnosed after that one check fails, so valid calls pay nothing more.

    Equals, on valid tokens, for "gspo" (the eager code it is tested against)::

        log_ratio = torch.where(mask, logp.float() - logp_old.float(), 0)
        s = exp(clamp(log_ratio.sum(-1) / mask.sum(-1).clamp(min=1), -20, 20))
        loss = -minimum(s * A, s.clamp(1 - eps_low, 1 + eps_high) * A).sum() / B
    """
    # Python sequences of numbers are accepted (gspo.advantages.as_tensor names a bad element).
    rewards = group_as_tensor("rewards", rewards, getattr(logp, "device", None))
    group_ids = group_as_tensor("group_ids", group_ids, getattr(logp, "device", None))
    dtype = _compute_dtype(logp, logp_old)
    objective = _check_names(variant, adv_norm)
    tokens_divide = objective.divisor == "tokens"
    registry.check_options(variant, {**options, "num_sequences": num_sequences,
                                     "num_tokens": num_tokens})  # fmt: skip
    params = objective.resolve(options, max_log_ratio)
    if seq_mask_delta is not None:
        registry.positive("seq_mask_delta", seq_mask_delta)
    layout = _layout(logp, logp_old, mask, seq_lens, cu_seqlens, dtype)
    adv = _advantages(layout, logp, rewards, group_size, group_ids, advantages, adv_norm,
                      objective)  # fmt: skip
    if tokens_divide:
        divisor = layout.count.sum() if num_tokens is None else _token_divisor(num_tokens)
    else:
        divisor = _divisor(num_sequences, layout.batch)
    log_ratio = _log_ratio(layout, logp, logp_old, dtype)
    seq_log_ratio = layout.seq_mean(log_ratio)
    _check_valid(seq_log_ratio, adv, logp, logp_old, layout, num_tokens if tokens_divide
                 else None)  # fmt: skip
    metrics_adv = adv_metrics(layout, adv)
    extra = {}
    if seq_mask_delta is not None:
        adv, extra["seq_mask_frac"] = _seq_mask(layout, adv, seq_log_ratio, seq_mask_delta)
    inputs = registry.Inputs(layout=layout, logp=logp, logp_old=logp_old, log_ratio=log_ratio,
                             seq_log_ratio=seq_log_ratio, adv=adv, params=params,
                             bound=max_log_ratio, divisor=divisor, dtype=dtype)  # fmt: skip
    loss, metrics = objective.loss(inputs)
    metrics.update(metrics_adv)
    metrics.update(extra)
    if kl_metric:
        metrics["approx_kl"] = _approx_kl(layout, log_ratio, max_log_ratio)
    return loss, metrics


def _seq_mask(layout: Layout, adv: Tensor, seq_log_ratio: Tensor, delta: float):
    """DeepSeek-V3.2's off-policy sequence mask (arXiv 2512.02556, section 3.1): the
    advantage is set to 0 where A < 0 and ``D_i = mean_t (logp_old - logp) > delta``;
    returns (adv, share of sequences masked). D_i is detached (it selects, it is not
    optimised)."""
    far = (-seq_log_ratio.detach()) > delta  # [B]
    far_tok = layout.select(layout.expand(far), False) if adv.shape != far.shape else far
    drop = far_tok & (adv < 0)
    if adv.shape == far.shape:
        frac = drop.to(adv.dtype).mean()
    else:  # per-token advantages: a sequence is masked where any of its tokens is
        frac = (layout.seq_sum(drop.to(adv.dtype)) > 0).to(adv.dtype).mean()
    return torch.where(drop, 0.0, adv), frac


def _approx_kl(layout: Layout, log_ratio: Tensor, bound: float) -> Tensor:
    """Mean of ``k3`` over the valid tokens; ``log_ratio`` is 0 on masked slots, where k3
    is then exactly 0."""
    return k3(log_ratio.detach(), bound).sum() / layout.count.sum()


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


def _check_names(variant, adv_norm) -> registry.Objective:
    objective = registry.get(variant)  # a ValueError lists the names
    if adv_norm not in NORMS:
        raise ValueError(f"adv_norm must be one of {NORMS}, got {adv_norm!r}")
    return objective


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


def _advantages(layout, logp, rewards, group_size, group_ids, advantages, adv_norm, objective):
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
    return _check_advantages(layout, logp, advantages, objective)


def _check_advantages(layout, logp, adv, objective) -> Tensor:
    if not isinstance(adv, Tensor):
        raise TypeError(f"advantages must be a torch.Tensor, got {type(adv).__name__}")
    _same_device("advantages", adv, logp)
    per_token = adv.shape == logp.shape and adv.dim() == logp.dim() and adv.shape != (layout.batch,)
    if per_token and not objective.per_token_advantages:
        takers = " or ".join(repr(n) for n in registry.names()
                             if registry.get(n).per_token_advantages)  # fmt: skip
        raise ValueError(f"per-token advantages need variant={takers}; {objective.name!r} is "
                         "per sequence (its ratio, or its weight, is one per sequence)")
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
