"""Naive token log-probabilities: hidden -> logits -> log_softmax -> gather.

This is the reference that the chunked path (gspo.chunked.token_logprobs) is
tested against. It materialises the whole [N,V] logits matrix, which at Qwen2.5's
vocabulary (V = 151936) and N = 16384 tokens is ~9.3 GiB in float32 before
autograd keeps its copies, so use it only on small inputs and in tests.

Shapes: N tokens, H hidden size, V vocabulary size.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gspo.nucleus import check_top_p, naive_nucleus_logp_all

IGNORE_INDEX = -100


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype softmax and log-sum-exp run in: float32, or float64 for float64 inputs.

    bf16/fp16 have 8/11 mantissa bits; a log-sum-exp over 151936 terms in them
    loses the per-token log-prob entirely, so low precision is promoted.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def naive_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    return_entropy: bool = False,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    top_p: float = 1.0,
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probability of each label under ``softmax((hidden @ weight.T + bias) / temperature)``.

    Exactly::

        logits = (hidden @ weight.T + bias).float() * logit_scale    # [N,V]
        logits = softcap * tanh(logits / softcap)   # only if softcap is not None
        logits = logits / temperature
        logp_all = torch.log_softmax(logits, dim=-1)                 # [N,V]
        logp = logp_all.gather(-1, labels[:, None])[:, 0]            # [N]
        logp = torch.where(labels == ignore_index, 0, logp)
        entropy = -(logp_all.exp() * logp_all).sum(-1)               # [N], same where

    and with ``top_p < 1`` the log-softmax is taken over the nucleus S instead, the smallest
    set of top tokens that the samplers keep, plus the label (gspo.nucleus)::

        m = nucleus_weights(logits, labels, *nucleus_bounds(logits, top_p))  # 1 on S, else 0
        logp_all = logits - torch.logsumexp(logits + m.log(), -1, keepdim=True)
        entropy = -(m * logp_all.exp() * logp_all).sum(-1)

    Args:
        hidden: [N,H] final hidden states.
        weight: [V,H] output embedding (``lm_head.weight``).
        labels: [N] integer token ids in [0, V), or ``ignore_index``.
        bias: optional [V] output bias.
        temperature: logits are divided by it (the sampling temperature).
        ignore_index: label value whose position gets logp 0 (and entropy 0)
            and no gradient.
        return_entropy: also return the entropy of each position's distribution.
        logit_scale: logits are multiplied by it first (Cohere's ``logit_scale``).
        softcap: then ``softcap * tanh(logits / softcap)`` (Gemma 2/3's
            ``final_logit_softcapping``); None = off.
        top_p: in (0, 1]; < 1 scores under the nucleus (above), 1 = the full softmax.

    Returns:
        ``logp`` [N] (float32, or float64 for float64 inputs), and ``entropy``
        [N] when ``return_entropy``.
    """
    check_inputs(hidden, weight, labels, bias, temperature, ignore_index)
    check_logit_transform(logit_scale, softcap)
    check_top_p(top_p)
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    logits = logits.to(compute_dtype(hidden.dtype)) * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits / temperature
    ignored = labels == ignore_index
    # Gather with a valid stand-in id at ignored positions, then select 0 there
    # (torch.where, not a multiply, so that nothing leaks from those rows).
    safe = torch.where(ignored, 0, labels).long()
    if top_p < 1:
        logp_all, m = naive_nucleus_logp_all(logits, safe, top_p)
    else:
        logp_all, m = torch.log_softmax(logits, dim=-1), None
    logp = torch.where(ignored, 0.0, logp_all.gather(-1, safe[:, None])[:, 0])
    if not return_entropy:
        return logp
    p = logp_all.exp() if m is None else m * logp_all.exp()
    entropy = -(p * logp_all).sum(-1)
    return logp, torch.where(ignored, 0.0, entropy)


def check_inputs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None,
    temperature: float,
    ignore_index: int,
) -> None:
    """Raise TypeError/ValueError naming the argument if the inputs cannot be used."""
    _check_tensor("hidden", hidden, ndim=2, floating=True)
    _check_tensor("weight", weight, ndim=2, floating=True)
    _check_tensor("labels", labels, ndim=1, floating=False)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight: dtype {weight.dtype} differs from hidden's {hidden.dtype}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"weight: shape {tuple(weight.shape)} must be [V,H] with H = {hidden.shape[1]}"
            f" (hidden is {tuple(hidden.shape)})"
        )
    if weight.shape[0] < 1:
        raise ValueError("weight: the vocabulary (dim 0) is empty")
    if labels.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"labels: shape {tuple(labels.shape)} must be [N] with N = {hidden.shape[0]}"
        )
    for name, x in (("weight", weight), ("labels", labels)):
        if x.device != hidden.device:
            raise ValueError(f"{name}: on {x.device}, but hidden is on {hidden.device}")
    if bias is not None:
        _check_tensor("bias", bias, ndim=1, floating=True)
        if bias.shape[0] != weight.shape[0] or bias.dtype != hidden.dtype:
            raise ValueError(
                f"bias: must be [V] = [{weight.shape[0]}] of dtype {hidden.dtype},"
                f" got {tuple(bias.shape)} {bias.dtype}"
            )
        if bias.device != hidden.device:
            raise ValueError(f"bias: on {bias.device}, but hidden is on {hidden.device}")
    check_temperature(temperature)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: must be an int, got {type(ignore_index).__name__}")
    _check_label_range(labels, weight.shape[0], ignore_index)


def check_logit_transform(logit_scale: float, softcap: float | None) -> None:
    for name, value in (("logit_scale", logit_scale), ("softcap", softcap)):
        if value is None and name == "softcap":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name}: must be a number, got {type(value).__name__}")
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name}: must be finite and > 0, got {value}")


def check_temperature(temperature: float) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature: must be a number, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature: must be finite and > 0, got {temperature}")


def _check_tensor(name: str, x: Tensor, *, ndim: int, floating: bool) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name}: must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name}: must be a floating-point tensor, got {x.dtype}")
    if not floating and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        raise TypeError(f"{name}: must be an integer tensor, got {x.dtype}")


def _check_label_range(labels: Tensor, vocab: int, ignore_index: int) -> None:
    # One host sync; an out-of-range id would otherwise be a silent gather error
    # on some devices or a crash deep inside the backward on others.
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(
            f"labels: ids must be in [0, {vocab}) or ignore_index={ignore_index}, found {first}"
        )
