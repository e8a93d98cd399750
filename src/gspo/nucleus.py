"""Nucleus (top-p) log-probabilities: the distribution the samplers draw from at ``top_p < 1``.

Hugging Face's ``TopPLogitsWarper`` and vLLM's sampler (``apply_top_k_top_p_pytorch``, the
path of its CPU build and of any build without Triton) cut the logits z (after temperature)
the same way, per position::

    s = sort(z)                           # ascending
    c = softmax(s).cumsum()
    removed = c <= 1 - top_p              # a prefix of s: c never decreases
    removed[-1] = False                   # the top token always stays
    sample from softmax(z) restricted to the kept tokens, renormalised

and report the sampled token's log-prob under that renormalised distribution. The trainer's
log-prob of token y is therefore ``z_y - logsumexp(z over S)``, where S is the nucleus plus
y itself: on-policy y is in the nucleus anyway, and after the policy has moved (later
minibatches) a token that left it keeps a finite log-prob and a gradient.

S is described by values, not by the sort's order, so that the result does not depend on
how a sort breaks ties (it differs between devices and batch shapes): with ``t`` the smallest
kept sorted value, every token with ``z > t`` is in S, and of the ``n_eq`` tokens with
``z == t`` the samplers keep ``n_keep`` (which ones depends on their sort). Each of them gets
the weight ``w = n_keep / n_eq``; a label with ``z_y == t`` is one of the kept ones (on-policy
it was), a label with ``z_y < t`` is added with weight 1. With ``m`` [C,V] these weights::

    logp    = z_y - log(sum_j m_j exp(z_j))
    q_j     = m_j exp(z_j - lse)                      # sums to 1
    entropy = -sum_j q_j (z_j - lse)                  # of the truncated distribution
    d logp / dz_j    = [j == y] - q_j                 # S is piecewise constant in z
    d entropy / dz_j = -q_j (z_j - lse + entropy)

Without ties (almost surely) every weight is 0 or 1 and this is the plain truncated softmax.
The cost is a sort of each [C,V] chunk (and its backward recomputes it), on top of the
log-sum-exp; ``top_p == 1`` skips all of it.

Shapes: C positions (a chunk), V vocabulary size.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Rows sorted at once: a sort holds its values and int64 indices ([R,V] each) plus the
# cumulative softmax, so a whole chunk at a time would add ~4 chunk-sized buffers.
SORT_ROWS = 64


def check_top_p(top_p: float) -> None:
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)):
        raise TypeError(f"top_p: must be a number, got {type(top_p).__name__}")
    if not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"top_p: must be in (0, 1], got {top_p}")


def nucleus_bounds(z: Tensor, top_p: float) -> tuple[Tensor, Tensor]:
    """(t, w), each [C]: the smallest kept logit and the kept share of the logits equal to it.

    ``z`` [C,V] is left unchanged. The cumulative softmax is the samplers' own expression
    (``sorted.softmax(-1).cumsum(-1) <= 1 - top_p``), so that S agrees with theirs to the
    rounding of their own logits.
    """
    c, v = z.shape
    t = z.new_empty(c)
    kept = z.new_empty(c, dtype=torch.long)  # tokens the samplers keep, V - removed
    for r in range(0, c, SORT_ROWS):
        s = z[r : r + SORT_ROWS].sort(dim=1).values
        cum = s.softmax(dim=1)
        torch.cumsum(cum, dim=1, out=cum)
        removed = (cum <= 1 - top_p).sum(1).clamp_(max=v - 1)  # keep at least the top token
        del cum
        t[r : r + SORT_ROWS] = s.gather(1, removed[:, None])[:, 0]
        kept[r : r + SORT_ROWS] = v - removed
        del s
    above = (z > t[:, None]).sum(1)
    equal = (z == t[:, None]).sum(1)
    return t, (kept - above).to(z.dtype) / equal.to(z.dtype)


def nucleus_weights(z: Tensor, labels: Tensor, t: Tensor, w: Tensor) -> Tensor:
    """m [C,V]: 1 above ``t``, ``w`` at ``t``, 0 below, and 1 at a label below ``t``."""
    m = (z > t[:, None]).to(z.dtype)
    m.add_((z == t[:, None]).to(z.dtype).mul_(w[:, None]))
    outside = z.gather(1, labels[:, None]) < t[:, None]  # [C,1]: the label left the nucleus
    return m.scatter_(1, labels[:, None], torch.where(outside, 1.0, m.gather(1, labels[:, None])))


def nucleus_forward(z: Tensor, labels: Tensor, top_p: float, want_ent: bool):
    """logp, lse (log of the nucleus' normaliser), entropy (or None), t, w for one chunk.

    The top-p counterpart of ``gspo.chunked._chunk_forward``; overwrites ``z``.
    """
    t, w = nucleus_bounds(z, top_p)
    m = nucleus_weights(z, labels, t, w)
    z_label = z.gather(1, labels[:, None])[:, 0]
    zmax = z.amax(1, keepdim=True)  # the top token: always in S, so every exp(u) <= 1
    u = z.sub_(zmax)
    e = m.mul_(u.exp())  # in place in m: q_j * s
    s = e.sum(1)
    lse = zmax[:, 0] + s.log()
    ent = None
    if want_ent:
        ent = s.log() - e.mul_(u).sum(1) / s  # lse - E_q[z], the max cancelling
    return z_label - lse, lse, ent, t, w


def naive_nucleus_logp_all(logits: Tensor, labels: Tensor, top_p: float) -> tuple[Tensor, Tensor]:
    """(logp_all, m), each [N,V]: ``logits - lse over S`` and the weights m, for the reference.

    ``logp_all`` is differentiable (S, a function of the logits' values, is held fixed);
    ``logp_all.gather(labels)`` is the label's log-prob and ``-(m * exp(logp_all) *
    logp_all).sum(-1)`` the entropy of the truncated distribution.
    """
    with torch.no_grad():
        m = nucleus_weights(logits, labels, *nucleus_bounds(logits, top_p))
    lse = torch.logsumexp(logits + m.log(), dim=-1, keepdim=True)  # log 0 = -inf drops a token
    return logits - lse, m
