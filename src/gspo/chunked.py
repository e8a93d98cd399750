"""Token log-probabilities from hidden states without ever holding the full logits.

At Qwen2.5's vocabulary (V = 151936) the logits of N = 16384 tokens take
~9.3 GiB in float32, and naive autograd keeps more copies of that size. Here the
output projection, the log-sum-exp and the gather run over chunks of C tokens:
the forward keeps only per-token results (logp, log-sum-exp, entropy) and the
backward recomputes each chunk's logits to form the gradients. Peak extra memory
is a few [C,V] buffers plus the [V,H] weight gradient, whatever N is.

Shapes: N tokens, H hidden size, V vocabulary size, C chunk size. A Hugging Face
model's log-probs through these functions: gspo.causal_lm.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gspo.logprobs import IGNORE_INDEX, check_inputs, check_logit_transform, compute_dtype
from gspo.nucleus import check_top_p, nucleus_forward, nucleus_weights

# Tokens per chunk. A float32 [C,V] buffer at V = 151936 is 0.58 MiB per token.
# Chosen from bench/logprobs.py's sweep (H = 896, hidden states -> GSPO loss, forward +
# backward, sequences of 512 tokens, a quiet 2-core machine, 2026-11-29); the [V,H]
# weight gradient (520 MiB) is the floor of every row:
#
#   C                       128    256    512   1024   2048
#   recompute, N = 4096    30.1   27.5   25.3   25.3   24.4 s    633   710   860  1169  1780 MiB
#   recompute, N = 16384  111.7  100.5   94.5   94.2   94.6 s    675   752   906  1209  1827 MiB
#   fused,     N = 4096    31.6   25.9   18.0   17.8   17.1 s    631   710   856  1171  1775 MiB
#   fused,     N = 16384  110.0  106.0   70.4   69.4   67.9 s    675   752   903  1214  1817 MiB
#
# Recompute (token_logprobs): 256, since 512 buys 6-8% for 20% more memory. Fused
# (gspo_loss_from_hidden's default): 512, where a block holds a whole 512-token sequence
# and the forward can form the gradients (30% faster than at 256); past it, 1-4% for
# 35-100% more memory.
DEFAULT_CHUNK_SIZE = 256
DEFAULT_FUSED_CHUNK_SIZE = 512


def token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    ignore_index: int = IGNORE_INDEX,
    return_entropy: bool = False,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    top_p: float = 1.0,
) -> Tensor | tuple[Tensor, Tensor]:
    """Chunked, memory-bounded equal of ``gspo.logprobs.naive_token_logprobs``.

    Equals, in value and in gradient (hidden, weight, bias)::

        logits = (hidden @ weight.T + bias).float() * logit_scale    # [N,V]
        logits = softcap * tanh(logits / softcap)   # only if softcap is not None
        logits = logits / temperature
        logp_all = torch.log_softmax(logits, dim=-1)                 # [N,V]
        logp = logp_all.gather(-1, labels[:, None])[:, 0]            # [N]
        logp = torch.where(labels == ignore_index, 0, logp)
        entropy = -(logp_all.exp() * logp_all).sum(-1)               # [N], same where

    but holds at most one chunk of logits [C,V] at a time (two with entropy).
    The backward recomputes each chunk's logits: four matmuls where the naive
    path does three, traded for never storing [N,V].

    Args:
        hidden: [N,H] final hidden states (float32, bfloat16, float16 or float64).
        weight: [V,H] output embedding, same dtype and device as ``hidden``.
        labels: [N] integer token ids in [0, V), or ``ignore_index``.
        bias: optional [V] output bias.
        temperature: logits are divided by it; finite and > 0.
        chunk_size: C, tokens per chunk (>= 1). Only non-ignored tokens are
            processed, so padding costs no matmul.
        ignore_index: label whose position gets logp 0, entropy 0, no gradient;
            hidden rows at such positions are never read (they may hold NaN).
        return_entropy: also return the entropy of each position; its gradient
            flows too when the entropy is used in the loss.
        logit_scale, softcap: the model's own logit transform (Cohere's
            ``logit_scale``, Gemma 2/3's ``final_logit_softcapping``), applied
            before the temperature as the model's forward applies it.
        top_p: < 1 scores under the nucleus the samplers draw from (gspo.nucleus): the
            softmax renormalised over the smallest set of top tokens holding ``top_p`` of
            the mass, plus the label; the entropy is that distribution's. The forward
            sorts each chunk's logits and keeps two numbers per token, from which the
            backward rebuilds the nucleus without sorting. 1 = off (no sort).

    Returns:
        ``logp`` [N], and ``entropy`` [N] when ``return_entropy``. float32 for
        16/32-bit inputs (matmuls run in the input dtype, softmax and every
        accumulation in float32), float64 for float64 inputs.
    """
    check_inputs(hidden, weight, labels, bias, temperature, ignore_index)
    check_chunk_size(chunk_size)
    check_logit_transform(logit_scale, softcap)
    check_top_p(top_p)
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy: must be a bool, got {type(return_entropy).__name__}")
    cap = None if softcap is None else float(softcap)
    transform = (float(temperature), float(logit_scale), cap)
    return _TokenLogprobs.apply(
        hidden, weight, bias, labels, transform, chunk_size, ignore_index, return_entropy,
        float(top_p),
    )  # fmt: skip


def check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size: must be an int, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size: must be >= 1, got {chunk_size}")


class _TokenLogprobs(torch.autograd.Function):
    """Forward keeps per-token log-sum-exp (and entropy); backward recomputes logits."""

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, labels, transform, chunk_size, ignore_index, want_ent, top_p
    ):
        dtype = compute_dtype(hidden.dtype)
        rows = (labels != ignore_index).nonzero()[:, 0]  # [M] the tokens that count
        labels = labels.long()
        logp = hidden.new_zeros(hidden.shape[0], dtype=dtype)
        entropy = hidden.new_zeros(hidden.shape[0], dtype=dtype)
        lse = hidden.new_empty(rows.shape[0], dtype=dtype)
        # top-p: each row's nucleus bounds (gspo.nucleus), for the backward to rebuild S
        cut = hidden.new_empty((2, rows.shape[0] if top_p < 1 else 0), dtype=dtype)
        for start in range(0, rows.shape[0], chunk_size):
            idx = rows[start : start + chunk_size]
            z = _chunk_logits(hidden[idx], weight, bias, transform, dtype)
            if top_p < 1:
                logp_c, lse_c, ent_c, *bounds = nucleus_forward(z, labels[idx], top_p, want_ent)
                cut[:, start : start + idx.shape[0]] = torch.stack(bounds)
            else:
                logp_c, lse_c, ent_c = _chunk_forward(z, labels[idx], want_ent)
            logp[idx] = logp_c
            lse[start : start + idx.shape[0]] = lse_c
            if want_ent:
                entropy[idx] = ent_c
            del z  # free the [C,V] buffer before the next chunk allocates its own
        ctx.save_for_backward(hidden, weight, bias, labels, rows, lse, entropy, cut)
        ctx.transform, ctx.chunk_size, ctx.top_p = transform, chunk_size, top_p
        ctx.set_materialize_grads(False)  # an unused entropy output then costs nothing
        if want_ent:
            return logp, entropy
        return logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, grad_entropy=None):
        hidden, weight, bias, labels, rows, lse, entropy, cut = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if grad_logp is None and grad_entropy is None:
            return (None,) * 9
        dtype, (temp, scale, softcap) = lse.dtype, ctx.transform
        # d/dlogits = d/dz * scale / temperature, folded into the per-token weights once.
        g_logp = _rows_over_t(grad_logp, rows, temp / scale, dtype)
        g_ent = _rows_over_t(grad_entropy, rows, temp / scale, dtype)
        grad_h = torch.zeros_like(hidden) if need_h else None
        # The weight gradient sums over every token: accumulate it in float32.
        grad_w = weight.new_zeros(weight.shape, dtype=dtype) if need_w else None
        grad_b = weight.new_zeros(weight.shape[0], dtype=dtype) if need_b else None
        for start in range(0, rows.shape[0], ctx.chunk_size):
            end = start + ctx.chunk_size
            idx = rows[start:end]
            z = _chunk_logits(hidden[idx], weight, bias, ctx.transform, dtype)
            # soft-capping: d(cap * tanh(x / cap))/dx = 1 - tanh^2, tanh = z * temperature / cap
            dcap = None if softcap is None else 1.0 - (z * (temp / softcap)).square_()
            # top-p: S rebuilt from the saved bounds (the same logits, so the same S)
            m = None if ctx.top_p == 1 else nucleus_weights(z, labels[idx], *cut[:, start:end])
            dz = _chunk_grad(z, labels[idx], lse[start:end], entropy[idx], g_logp, g_ent, start, m)
            if dcap is not None:
                dz.mul_(dcap)
            _accumulate(dz, idx, hidden, weight, grad_h, grad_w, grad_b, dtype)
            del z, dz, dcap, m
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def _accumulate(dz, idx, hidden, weight, grad_h, grad_w, grad_b, dtype) -> None:
    """Add one chunk's dL/dlogits [C,V] into the hidden / weight / bias gradients."""
    if grad_b is not None:
        grad_b += dz.sum(0)
    dz_in = dz.to(hidden.dtype)  # matmuls in the input dtype
    if grad_h is not None:
        grad_h[idx] = dz_in @ weight
    if grad_w is not None:
        h = hidden[idx]
        if dz_in.dtype == dtype:
            grad_w.addmm_(dz_in.T, h)  # in place: no [V,H] temporary per chunk
        else:
            grad_w += dz_in.T @ h


def _rows_over_t(grad: Tensor | None, rows: Tensor, temperature: float, dtype) -> Tensor | None:
    if grad is None:
        return None
    return grad[rows].to(dtype) / temperature


def _chunk_logits(h: Tensor, weight: Tensor, bias, transform, dtype) -> Tensor:
    """z = transform(h @ weight.T + bias) / temperature as a fresh [C,V] buffer in ``dtype``.

    ``transform`` is a temperature, or (temperature, logit_scale, softcap) with softcap None = off.
    """
    if not isinstance(transform, tuple):
        transform = (transform, 1.0, None)
    temperature, scale, softcap = transform
    z = h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)
    z = z.to(dtype)  # no copy for float32 inputs; bf16/fp16 are promoted here
    if scale != 1.0:
        z.mul_(scale)
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap)
    if temperature != 1.0:
        z.div_(temperature)
    return z


def _chunk_forward(z: Tensor, labels: Tensor, want_ent: bool):
    """Per-token logp, log-sum-exp and entropy of one chunk; overwrites ``z``.

    In place, so the chunk costs one [C,V] buffer (two with entropy, which needs
    z - max and exp(z - max) together).
    """
    z_label = z.gather(1, labels[:, None])[:, 0]
    zmax = z.amax(1, keepdim=True)
    u = z.sub_(zmax)  # u = z - max: exp(u) <= 1 never overflows
    e = u.exp() if want_ent else u.exp_()
    s = e.sum(1)
    lse = zmax[:, 0] + s.log()
    ent = None
    if want_ent:
        # H = lse - sum_j p_j z_j = log s - sum_j e_j u_j / s  (the max cancels)
        ent = s.log() - e.mul_(u).sum(1) / s
    return z_label - lse, lse, ent


def _chunk_grad(z, labels, lse, entropy, g_logp, g_ent, start, m=None):
    """dL/dz for one chunk, built in place in ``z``.

    With p = softmax(z) and y the label:
        d logp / dz_j    = [j == y] - p_j
        d entropy / dz_j = -p_j (z_j - E_p[z]) = -p_j (logp_j + entropy)
    Top-p: ``m`` [C,V] the nucleus weights and p = m exp(z - lse) (gspo.nucleus).
    """
    c = z.shape[0]
    logp_all = z.sub_(lse[:, None])
    gl = None if g_logp is None else g_logp[start : start + c, None]
    if g_ent is None:
        dz = logp_all.exp_() if m is None else m.mul_(logp_all.exp_())
        dz.mul_(-gl)  # one [C,V] buffer (two with top-p)
    else:
        p = logp_all.exp() if m is None else m.mul_(logp_all.exp())
        ge = g_ent[start : start + c, None]
        dz = logp_all.add_(entropy[:, None]).mul_(p).mul_(-ge)
        if gl is not None:
            dz.addcmul_(p, gl, value=-1.0)
        del p
    if gl is not None:
        dz.scatter_add_(1, labels[:, None], gl)
    return dz


def gspo_loss_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    logp_old: Tensor,
    mask: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    fused: bool = True,
    **loss_kwargs,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO loss straight from final hidden states, never holding [N,V] logits.

    Equals::

        logp = token_logprobs(hidden, weight, labels, bias=bias, temperature=temperature)
        return gspo.loss.gspo_loss(logp, logp_old, mask, **loss_kwargs)

    The sequence ratio ``exp(mean_t(logp - logp_old))`` couples every token of
    a sequence, so the log-probs of all tokens come first (chunked, memory
    bounded) and the loss second; the loss's gradient w.r.t. ``logp`` then flows
    back through the chunked backward.

    Packed form: ``hidden`` [N,H], ``labels`` and ``logp_old`` [N], with
    ``seq_lens=`` or ``cu_seqlens=`` in ``loss_kwargs``. Padded form: ``hidden``
    [B,T,H], ``labels`` and ``logp_old`` [B,T] and ``mask`` [B,T] (True = a
    response token that counts; by position or keyword, as for ``gspo_loss``);
    labels where the mask is False are replaced by ``ignore_index``, so they may
    hold anything.

    ``fused=True`` (the default) forms the gradients during the forward instead
    (three matmuls per token instead of four): chunks are made of whole sequences, and
    since each sequence's loss term depends only on its own tokens, a chunk's dL/dlogp
    is known as soon as its log-probs are. A sequence longer than ``chunk_size`` takes
    two passes over its chunks (logp, then gradients), as the recompute path does, so
    memory stays bounded by the chunk either way. ``fused=False`` is the recompute path
    above (``token_logprobs``, then ``gspo_loss``). ``chunk_size`` defaults to
    ``DEFAULT_FUSED_CHUNK_SIZE`` (512) fused and ``DEFAULT_CHUNK_SIZE`` (256) otherwise.
    Measured (bench/logprobs.py, H = 896, V = 151936, sequences of 512 tokens, quiet
    2-core machine): fused at 512 against recompute at 256, 18.0 s vs 27.5 s at
    N = 4096 and 70.4 s vs 100.5 s at N = 16384, for 856 vs 710 MiB added peak memory.

    Returns:
        ``(loss, metrics)`` exactly as ``gspo_loss`` returns them.
    """
    from gspo.loss import gspo_loss  # imported here: loss.py is a sibling, not a need of logp

    if not isinstance(hidden, Tensor) or hidden.dim() not in (2, 3):
        raise ValueError("hidden: must be a tensor [N,H] (packed) or [B,T,H] (padded)")
    if not isinstance(labels, Tensor) or labels.shape != hidden.shape[:-1]:
        got = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels: must have shape {tuple(hidden.shape[:-1])}, got {got}")
    if chunk_size is None:
        chunk_size = DEFAULT_FUSED_CHUNK_SIZE if fused else DEFAULT_CHUNK_SIZE
    if mask is not None:
        loss_kwargs["mask"] = mask  # gspo_loss checks it
    if isinstance(mask, Tensor) and mask.shape == labels.shape:
        labels = torch.where(mask.to(torch.bool), labels, ignore_index)
    if fused:
        return _fused_gspo_loss(
            hidden, weight, labels, logp_old, bias, temperature, chunk_size, ignore_index,
            loss_kwargs, gspo_loss,
        )  # fmt: skip
    logp = token_logprobs(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        labels.reshape(-1),
        bias=bias,
        temperature=temperature,
        chunk_size=chunk_size,
        ignore_index=ignore_index,
    )
    return gspo_loss(logp.view(labels.shape), logp_old, **loss_kwargs)


def _fused_gspo_loss(
    hidden, weight, labels, logp_old, bias, temperature, chunk_size, ignore_index, loss_kwargs, loss
):
    flat_h, flat_y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    check_inputs(flat_h, weight, flat_y, bias, temperature, ignore_index)
    check_chunk_size(chunk_size)
    if not isinstance(logp_old, Tensor) or logp_old.shape != labels.shape:
        raise ValueError(f"logp_old: must have shape {tuple(labels.shape)}")
    bounds = _sequence_bounds(labels.shape, loss_kwargs)

    def loss_of(logp: Tensor):
        return loss(logp.view(labels.shape), logp_old, **loss_kwargs)

    out: dict = {}
    value = _FusedLoss.apply(
        flat_h, weight, bias, flat_y, (float(temperature), chunk_size, ignore_index, bounds),
        loss_of, out,
    )  # fmt: skip
    return value, out["metrics"]


def _sequence_bounds(shape, loss_kwargs) -> list[int]:
    """Flat token offsets where sequences start and end (cu_seqlens), for either layout."""
    if len(shape) == 2:  # padded [B,T]: sequence b is row b
        return [b * shape[1] for b in range(shape[0] + 1)]
    if loss_kwargs.get("cu_seqlens") is not None:
        return [int(x) for x in loss_kwargs["cu_seqlens"]]
    if loss_kwargs.get("seq_lens") is not None:
        return [0] + torch.cumsum(torch.as_tensor(loss_kwargs["seq_lens"]), 0).tolist()
    raise ValueError("seq_lens: packed input needs seq_lens= or cu_seqlens=")


class _FusedLoss(torch.autograd.Function):
    """Loss forward that forms grad_hidden/weight/bias on the way; backward scales them.

    Per block of whole sequences: logits (1 matmul), logp, dL/dlogp of the
    block (a cheap autograd call of the loss on [N] numbers, where tokens of
    other blocks hold any finite value: they do not enter this block's terms),
    then dz = g * (onehot - softmax) and its two gradient matmuls. The softmax
    of a block that fits in one chunk is kept from the logp pass, so nothing is
    recomputed.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, consts, loss_of, out):
        temperature, chunk_size, ignore_index, bounds = consts
        dtype = compute_dtype(hidden.dtype)
        valid = labels != ignore_index
        labels = torch.where(valid, labels, 0).long()
        # Tokens of blocks not yet reached hold 0: any finite value does, as
        # other sequences' loss terms do not touch this block's gradient.
        logp = hidden.new_zeros(labels.shape[0], dtype=dtype)
        grads = _Grads(hidden, weight, bias, dtype)
        for start, end in _blocks(bounds, valid, chunk_size):
            rows = start + valid[start:end].nonzero()[:, 0]
            pieces = [rows[i : i + chunk_size] for i in range(0, rows.shape[0], chunk_size)]
            kept = None
            for idx in pieces:
                z = _chunk_logits(hidden[idx], weight, bias, temperature, dtype)
                logp[idx] = _chunk_forward(z, labels[idx], False)[0]  # z is now exp(z - max)
                if len(pieces) == 1:  # the block fits one chunk: keep its softmax
                    kept = z.div_(z.sum(1, keepdim=True))
                del z
            g = _dloss_dlogp(loss_of, logp, rows) / temperature
            for i, idx in enumerate(pieces):
                p = (
                    kept
                    if kept is not None
                    else _chunk_softmax(hidden, weight, bias, idx, temperature, dtype, labels)
                )
                gi = g[i * chunk_size : i * chunk_size + idx.shape[0], None]
                # dlogp/dz = onehot(y) - p, so dL/dz = g * (onehot(y) - p), in place in p
                grads.add(p.mul_(-gi).scatter_add_(1, labels[idx][:, None], gi), idx)
                del p
            kept = None
        with torch.no_grad():
            value, out["metrics"] = loss_of(logp)
        ctx.save_for_backward(*grads.result())
        return value

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        # Usually grad_out is 1 (the loss is the root): skip a [V,H] product then.
        one = bool(grad_out == 1)
        grad_h, grad_w, grad_b = (
            None if g.numel() == 0 else g if one else g * grad_out for g in ctx.saved_tensors
        )
        return grad_h, grad_w, grad_b, None, None, None, None


def _blocks(bounds: list[int], valid: Tensor, chunk_size: int):
    """(start, end) token ranges of whole sequences, about chunk_size valid tokens each."""
    counts = torch.tensor([0] + valid.long().cumsum(0).tolist())[bounds].tolist()
    start = 0
    for i in range(1, len(bounds)):
        last = i == len(bounds) - 1
        # close the block before sequence i if adding it would pass chunk_size
        if not last and counts[i + 1] - counts[start] > chunk_size and i > start:
            yield bounds[start], bounds[i]
            start = i
    yield bounds[start], bounds[-1]


def _dloss_dlogp(loss_of, logp: Tensor, rows: Tensor) -> Tensor:
    """dL/dlogp at ``rows``: an autograd call of the loss on [N] numbers (no logits)."""
    leaf = logp.detach().clone().requires_grad_()
    with torch.enable_grad():
        value, _ = loss_of(leaf)
        (grad,) = torch.autograd.grad(value, leaf)
    return grad[rows].to(logp.dtype)


def _chunk_softmax(hidden, weight, bias, idx, temperature, dtype, labels) -> Tensor:
    z = _chunk_logits(hidden[idx], weight, bias, temperature, dtype)
    _chunk_forward(z, labels[idx], False)
    return z.div_(z.sum(1, keepdim=True))


class _Grads:
    """grad_hidden / grad_weight / grad_bias accumulators (float32 for the sums)."""

    def __init__(self, hidden, weight, bias, dtype):
        self.hidden, self.weight, self.dtype = hidden, weight, dtype
        self.h = torch.zeros_like(hidden) if hidden.requires_grad else None
        self.w = weight.new_zeros(weight.shape, dtype=dtype) if weight.requires_grad else None
        need_b = bias is not None and bias.requires_grad
        self.b = weight.new_zeros(weight.shape[0], dtype=dtype) if need_b else None
        self.bias_dtype = None if bias is None else bias.dtype

    def add(self, dz: Tensor, idx: Tensor) -> None:
        """Add one chunk's dL/dlogits [C,V] (tokens ``idx``)."""
        _accumulate(dz, idx, self.hidden, self.weight, self.h, self.w, self.b, self.dtype)

    def result(self):
        empty = self.hidden.new_empty(0)  # save_for_backward needs tensors, not None
        w = empty if self.w is None else self.w.to(self.weight.dtype)
        b = empty if self.b is None else self.b.to(self.bias_dtype)
        return (empty if self.h is None else self.h), w, b
