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
The forward finds t from the top tokens only (``nucleus_bounds``: a top-64, widened for
the rows whose nucleus is larger, a full sort only for near-flat rows); the backward
rebuilds m from the saved t and w by comparisons. ``top_p == 1`` skips all of it.

Shapes: C positions (a chunk), V vocabulary size.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Top tokens looked at first; rows whose top K do not hold top_p of the mass look at
# K_GROWTH times more, up to the whole (sorted) vocabulary. A full sort of a [C,V] chunk
# costs ~20-70x a top-64 (measured on CPU: 1.16 s vs 0.03 s at C = 256, V = 49152), and a
# trained model's nucleus is usually tens to hundreds of tokens.
FIRST_K, K_GROWTH = 64, 8


def check_top_p(top_p: float) -> None:
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)):
        raise TypeError(f"top_p: must be a number, got {type(top_p).__name__}")
    if not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"top_p: must be in (0, 1], got {top_p}")


def nucleus_bounds(z: Tensor, top_p: float) -> tuple[Tensor, Tensor]:
    """(t, w), each [C]: the smallest kept logit and the kept share of the logits equal to it.

    ``z`` [C,V] is left unchanged. The samplers' rule read from the top: in descending order
    a token is kept iff the mass strictly before it is < top_p (ascending, its cumulative
    mass is > 1 - top_p: the same set, up to the rounding of the two sums). When the top K
    tokens hold >= top_p of the mass, every token past them is cut, so only they are needed.
    """
    c, v = z.shape
    lse = torch.logsumexp(z, dim=1)  # the whole vocabulary's normaliser
    t, w = z.new_empty(c), z.new_ones(c)
    todo, k = torch.arange(c, device=z.device), min(FIRST_K, v)
    while todo.numel():
        rows = z if todo.numel() == c else z[todo]
        vals = rows.topk(k, dim=1).values  # [R,k] descending
        probs = (vals - lse[todo, None]).exp()
        cum = probs.cumsum(dim=1)
        done = (cum[:, -1] >= top_p) if k < v else torch.ones_like(cum[:, -1], dtype=torch.bool)
        before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=1)
        kept = (before < top_p).sum(1)  # >= 1: nothing is before the top token
        t_rows = vals.gather(1, kept[:, None] - 1)[:, 0]
        above = (vals > t_rows[:, None]).sum(1)
        equal = (vals == t_rows[:, None]).sum(1)
        # the tie group may run past the top k: count it in the whole row (rarely needed)
        spill = (done & (vals[:, -1] == t_rows)).nonzero()[:, 0] if k < v else todo[:0]
        if spill.numel():
            equal[spill] = (rows[spill] == t_rows[spill, None]).sum(1)
        ok = done.nonzero()[:, 0]
        t[todo[ok]] = t_rows[ok]
        w[todo[ok]] = ((kept - above)[ok]).to(z.dtype) / equal[ok].to(z.dtype)
        # past half the vocabulary a top-k costs about a full sort: go straight to it
        todo, k = todo[~done], (v if 2 * k * K_GROWTH > v else k * K_GROWTH)
    return t, w


def nucleus_weights(z: Tensor, labels: Tensor, t: Tensor, w: Tensor) -> Tensor:
    """m [C,V]: 1 above ``t``, ``w`` at ``t``, 0 below, and 1 at a label below ``t``."""
    m = (z >= t[:, None]).to(z.dtype)
    tied = (w < 1).nonzero()[:, 0]  # rows whose cut splits a tie group (rare off tests)
    if tied.numel():
        zt, tt = z[tied], t[tied, None]
        m[tied] = torch.where(zt == tt, w[tied, None], (zt > tt).to(z.dtype))
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
