"""The hot path of GSPO on padded batches: the per-sequence mean log-ratio in one pass.

GSPO's gradient with respect to a token's log-prob is the same for every valid
token of a sequence: ``d loss / d logp[b, t] = mask[b, t] * g[b] / T_b``. So the
forward needs one reduction over ``logp - logp_old`` and the backward one
broadcast of ``g / T`` under the mask; nothing [B,T]-sized has to be kept for
the backward except the mask itself.

``seq_log_ratio`` is an autograd Function built on two small kernels, run through
``torch.compile`` (fused into one pass each) for large batches, eagerly for small
ones or when compilation is unavailable. It equals, on valid tokens::

    lr = torch.where(mask, logp - logp_old, 0)
    seq_log_ratio = lr.sum(-1) / count                  # [B], differentiable in logp
    k3_sum = (expm1(lr) - lr).sum(-1)                   # [B], for the KL metric only

Shapes: B sequences, T padded tokens; mask True = a valid token.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

# Below this many [B,T] slots a compiled kernel saves less than a millisecond, which
# would never repay its ~15 s compile (tests, the tiny default trainer).
COMPILE_MIN_SLOTS = 1 << 20


def k3(log_ratio: Tensor) -> Tensor:
    """Schulman's k3 = (r - 1) - log r = expm1(x) - x >= 0 per token, x = log r (float64).

    torch's eager expm1 is scalar code on CPU (~25 ns an element, more than all the
    rest of the loss), and float32 exp(x) - 1 - x cancels for the small x that are
    usual here. In float64 the cancellation costs ~1e-16 absolute, against k3 ~ x^2/2.
    """
    x = log_ratio.double()
    return torch.exp(x) - 1 - x


def _stats(logp: Tensor, logp_old: Tensor, mask: Tensor, bound: float):
    """Per-sequence sums of the log-ratio [B] and of k3 [B] over valid tokens."""
    dtype = torch.float64 if logp.dtype == torch.float64 else torch.float32
    lr = torch.where(mask, logp.to(dtype) - logp_old.to(dtype), 0.0)
    kl = k3(lr.clamp(-bound, bound))  # clamped: the KL metric stays finite for any ratio
    return lr.sum(-1), kl.sum(-1).to(dtype)


def _spread(mask: Tensor, coef: Tensor, dtype: torch.dtype) -> Tensor:
    """[B,T] gradient: coef[b] on valid tokens, exactly 0 elsewhere."""
    return torch.where(mask, coef[:, None], 0.0).to(dtype)


class _Kernels:
    """The two kernels, compiled on first use when it pays off, eager otherwise."""

    def __init__(self) -> None:
        self.compiled: tuple | None = None
        self.failed = os.environ.get("GSPO_COMPILE", "1") == "0"

    def pick(self, numel: int):
        if self.failed or numel < COMPILE_MIN_SLOTS:
            return _stats, _spread
        if self.compiled is None:
            self.compiled = (
                torch.compile(_stats, dynamic=True),
                torch.compile(_spread, dynamic=True),
            )
        return self.compiled

    def run(self, which: int, numel: int, *args):
        fn = self.pick(numel)[which]
        if fn is _stats or fn is _spread:
            return fn(*args)
        try:
            return fn(*args)
        except Exception as err:  # no C++ compiler, unsupported backend, ...
            warnings.warn(
                f"gspo: torch.compile failed ({type(err).__name__}: {err}); using eager kernels. "
                "Set GSPO_COMPILE=0 to skip the attempt.",
                stacklevel=3,
            )
            self.failed = True
            return (_stats, _spread)[which](*args)


KERNELS = _Kernels()


class SeqLogRatio(torch.autograd.Function):
    """(mean log-ratio [B], k3 sum [B]) of a padded batch; gradient flows to logp."""

    @staticmethod
    def forward(ctx, logp: Tensor, logp_old: Tensor, mask: Tensor, count: Tensor, bound: float):
        lr_sum, k3_sum = KERNELS.run(0, logp.numel(), logp, logp_old, mask, bound)
        ctx.save_for_backward(mask, count)
        ctx.logp_dtype = logp.dtype
        ctx.mark_non_differentiable(k3_sum)
        return lr_sum / count, k3_sum

    @staticmethod
    def backward(ctx, grad_mean: Tensor, _grad_k3):
        mask, count = ctx.saved_tensors
        grad = KERNELS.run(1, mask.numel(), mask, grad_mean / count, ctx.logp_dtype)
        return grad, None, None, None, None


def seq_log_ratio(logp: Tensor, logp_old: Tensor, mask: Tensor, count: Tensor, bound: float):
    """Per-sequence mean log-ratio [B] (differentiable in logp) and k3 sum [B].

    logp, logp_old: [B,T] (any float dtype; arithmetic in float32, float64 kept).
    mask: [B,T] bool, True = valid token; masked slots may hold NaN or inf.
    count: [B] valid tokens per sequence (>= 1), in the compute dtype.
    bound: |log-ratio| clamp for the k3 metric.
    """
    return SeqLogRatio.apply(logp, logp_old.detach(), mask, count, bound)
