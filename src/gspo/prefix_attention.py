"""Shared-prefix attention without an N x N mask: causal SDPA over one gathered row per response.

A packed row (gspo.prefix) holds a group's prompt once and its G responses after it. The
dense path gives the decoder an ``[S, 1, N, N]`` block mask: N^2 memory per packed row, and
on CUDA an explicit mask keeps SDPA off its flash kernels. Here the decoder runs on the
packed rows as before (every projection and MLP sees the prompt once), and only the
attention core is regathered: for each response, the query, key and value rows of its
group's prompt followed by its own tokens, which is exactly its row of the plain forward,
so plain causal attention (``is_causal=True``, no mask: the flash / memory-efficient
kernels on CUDA, the flash kernel on CPU) gives every response token the keys the block
mask allows it. The outputs are scattered back to the packed positions (a prompt token's
from its group's first response row). Memory is linear in the tokens: G (P + R) per group
instead of (P + G R)^2; the attention FLOPs are each response row's causal half,
G (P + R)^2 / 2, next to the dense mask's full (P + G R)^2.

It is the attention function ``gspo_sdpa`` registered with transformers' attention
interface; it behaves as ``sdpa`` unless the forward passes ``gspo_rows`` (the plan,
:class:`Rows`), so a model switched to it (``use(model)``) generates and scores as before.
The plan travels as a keyword argument of the decoder's forward, so gradient checkpointing's
recompute sees it too.

Why not FlexAttention's block masks: on this project's CPU runs (CI's) flex needs
torch.compile, whose compile time per new shape exceeds a test's whole budget, and eager
flex materialises the scores; the gathered rows need no compiler and use the kernels SDPA
already picks on every device (docs/fast-step.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

NAME = "gspo_sdpa"


@dataclass(frozen=True)
class Rows:
    """rows [M, Lr] and back [S, N] of gspo.prefix.Packed (their docstring)."""

    rows: Tensor
    back: Tensor


def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
              gspo_rows: Rows | None = None, **kwargs):  # fmt: skip
    """transformers' attention-function contract: query [S, Hq, N, D], key and value
    [S, Hkv, N, D] -> (output [S, N, Hq, D], None). With ``gspo_rows`` the packed rows'
    shared-prefix attention (module docstring), else transformers' own SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if gspo_rows is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                       dropout=dropout, scaling=scaling, **kwargs)  # fmt: skip
    s, hq, n, d = query.shape
    hkv = key.shape[1]

    def gather(x: Tensor) -> Tensor:  # [S, H, N, D] -> [M, H, Lr, D]
        flat = x.transpose(1, 2).reshape(s * n, x.shape[1], d)
        return flat[gspo_rows.rows].transpose(1, 2)

    k, v = gather(key), gather(value)
    if hkv != hq:  # grouped-query attention: each key head serves hq // hkv query heads
        k, v = (x.repeat_interleave(hq // hkv, dim=1) for x in (k, v))
    out = torch.nn.functional.scaled_dot_product_attention(
        gather(query), k, v, is_causal=True, scale=scaling,
        dropout_p=dropout if module.training else 0.0,
    )  # [M, Hq, Lr, D]
    m, _, width, _ = out.shape
    out = out.transpose(1, 2).reshape(m * width, hq, d)[gspo_rows.back]  # [S, N, Hq, D]
    return out, None


def register() -> None:
    """Register ``gspo_sdpa`` (attention and mask functions: SDPA's) with transformers."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use(model: torch.nn.Module) -> bool:
    """Switch ``model`` from SDPA to ``gspo_sdpa`` (the same results without ``gspo_rows``);
    True when it now runs it. Others are left alone: eager attention materialises every
    N x N score matrix anyway, so it keeps the dense block mask."""
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation == NAME:
        return True
    if implementation != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    register()
    model.set_attn_implementation(NAME)
    return model.config._attn_implementation == NAME
