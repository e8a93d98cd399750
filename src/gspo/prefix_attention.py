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

The rows copy each prompt's attention tensors G times where the mask costs N^2, so neither
wins everywhere: ``extra_memory`` estimates both from the shapes, and
``CausalLMLogprobs(prefix_attention="auto")`` (the default) runs the smaller per forward.

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
# bytes per N^2 entry the dense path holds once: the bool block mask (gspo.prefix.Packed.keep)
# and its construction's temporaries
KEEP_BYTES = 2
# dtypes SDPA runs with a fused (flash / memory-efficient) kernel, which keeps no scores
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
    # [M, Hq, Lr, D]
    out = torch.nn.functional.scaled_dot_product_attention(
        gather(query), k, v, is_causal=True, scale=scaling,
        dropout_p=dropout if module.training else 0.0,
    )  # fmt: skip
    m, _, width, _ = out.shape
    out = out.transpose(1, 2).reshape(m * width, hq, d)[gspo_rows.back]  # [S, N, Hq, D]
    return out, None


def register() -> None:
    """Register ``gspo_sdpa`` (attention and mask functions: SDPA's) with transformers."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def supports(model: torch.nn.Module) -> bool:
    """Whether ``use(model)`` would run the rows (an SDPA model transformers can switch)."""
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    return implementation == NAME or (
        implementation == "sdpa" and hasattr(model, "set_attn_implementation"))  # fmt: skip


def extra_memory(model: torch.nn.Module, packed: tuple[int, int], rows: tuple[int, int],
                 dtype: torch.dtype, *, saved_layers: int | None = None) -> dict:  # fmt: skip
    """Estimated bytes each shared-prefix attention adds to one forward (+ backward) of the
    packed batch: ``{"dense": ..., "rows": ...}``, each over what both share.

    ``packed`` = (S, N), ``rows`` = (M, Lr) (gspo.prefix.Packed), ``dtype`` the attention's
    (the compute dtype), ``saved_layers`` the layers whose attention tensors autograd holds
    at once (None: all the model's layers, as with gradients; 1 under no_grad or gradient
    checkpointing). Per
    layer, with Hq query heads of D, i bytes an element:

    - dense: SDPA turns the bool [S, 1, N, N] block mask into an additive one of the
      query's dtype and keeps it for the backward, ``i S N^2`` a layer, on top of the bool
      mask and its construction, ``KEEP_BYTES S N^2`` once;
    - rows: SDPA keeps its query, keys and values (grouped-query heads repeated) and output
      for the backward, ``4 Hq D i`` a position, on M x Lr gathered positions where the
      dense path keeps them on S x N packed ones: the difference is each prompt copied
      G - 1 times (plus the row's float32 log-sum-exp, ``4 Hq``).
    - float64 (SDPA's math kernel, which materialises the scores) adds the softmax, kept for
      the backward: ``i Hq S N^2`` dense, ``i Hq M Lr^2`` rows.

    Measured against the peaks of bench/prefix_memory.py in docs/fast-step.md."""
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
        else model.config  # fmt: skip
    heads = getattr(text, "num_attention_heads", None) or text.n_head
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    item = torch.empty((), dtype=dtype).element_size()
    if saved_layers is None:
        saved_layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", 1)
    (s, n), (m, width) = packed, rows
    dense = KEEP_BYTES * s * n * n + saved_layers * item * s * n * n
    rows_bytes = saved_layers * (m * width - s * n) * (4 * heads * head_dim * item + 4 * heads)
    if dtype not in FUSED_DTYPES:  # the math kernel: scores [.., Hq, Lq, Lk] kept
        dense += saved_layers * item * heads * s * n * n
        rows_bytes += saved_layers * item * heads * m * width * width
    return {"dense": float(dense), "rows": float(rows_bytes)}


def use(model: torch.nn.Module) -> bool:
    """Switch ``model`` from SDPA to ``gspo_sdpa`` (the same results without ``gspo_rows``);
    True when it now runs it. Others are left alone: eager attention materialises every
    N x N score matrix anyway, so it keeps the dense block mask."""
    if not supports(model):
        return False
    if model.config._attn_implementation == NAME:
        return True
    register()
    model.set_attn_implementation(NAME)
    return model.config._attn_implementation == NAME
