"""Per-token log-probs of a Hugging Face causal LM through the chunked path (gspo.chunked):
the decoder's hidden states go to ``token_logprobs`` with the model's own LM head and logit
transform, so no [B, L, V] logits tensor is ever formed.

Shapes: B sequences, L positions, H hidden size, V vocabulary size.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gspo.chunked import DEFAULT_CHUNK_SIZE, check_chunk_size, token_logprobs
from gspo.logprobs import IGNORE_INDEX


class CausalLMLogprobs(torch.nn.Module):
    """Per-token log-probs of a Hugging Face causal LM, without its full logits.

    ``forward(input_ids [B,L], attention_mask [B,L])`` returns ``logp`` [B,L-1]
    with ``logp[:, t] = log p(input_ids[:, t+1] | input_ids[:, :t+1])``, and 0
    where ``attention_mask[:, t+1]`` is 0 (True/1 = a real token). It equals::

        logits = model(input_ids, attention_mask=attention_mask).logits[:, :-1]
        logp = log_softmax(logits.float() / temperature).gather(-1, input_ids[:, 1:, None])

    (with ``top_p < 1``, the log-softmax over the nucleus the samplers keep: gspo.nucleus),
    but runs only the base decoder (``getattr(model, model.base_model_prefix)``,
    whose output is already final-normed for Qwen2/Llama) and feeds its hidden
    states with ``model.get_output_embeddings()`` to ``token_logprobs``.

    - ``target_mask`` [B,L-1] (True = score this target) narrows the scoring further:
      the trainer passes the response tokens, so the LM head never projects a prompt
      position (its hidden rows are not even read). Default: ``attention_mask[:, 1:]``.
    - ``position_ids`` are built from the attention mask as ``generate`` builds them
      (cumsum - 1), so left padding does not shift absolute positions (GPT-2).
    - The model's own logit transform is applied: Gemma 2/3's
      ``final_logit_softcapping`` and Cohere's ``logit_scale`` (``logit_transform``);
      a config with a transform this module does not know is refused.
    - A ``peft.PeftModel`` (LoRA) is unwrapped to the model inside it, adapters active.
    - ``compute_dtype=torch.bfloat16`` runs the decoder under autocast and the LM head
      on bf16 copies of the weights (the parameters stay fp32: master weights);
      log-probs come out in float32 either way.

    It is an nn.Module whose forward does the whole computation, so that DDP or
    FSDP2's ``fully_shard`` can wrap it: the parameters are gathered for, and
    read inside, this forward. (If the output embedding is sharded as its own
    FSDP unit, its weight is only gathered around its own forward, which this
    path never calls; shard it together with the root.)
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        compute_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        check_chunk_size(chunk_size)
        if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
            # A PEFT model: run the Hugging Face model inside it, whose layers carry the
            # adapters (through the wrapper, base_model_prefix would find that whole model,
            # logits and all, instead of its decoder).
            model = model.get_base_model()
        prefix = getattr(model, "base_model_prefix", None)
        if not prefix or not hasattr(model, prefix):
            raise TypeError("model: expected a Hugging Face causal LM with a base_model_prefix")
        if model.get_output_embeddings() is None:
            raise TypeError("model: has no output embeddings (get_output_embeddings() is None)")
        if compute_dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"compute_dtype: {compute_dtype} is not None, float32, bf16 or fp16")
        self.model = model
        self.chunk_size = chunk_size
        self.compute_dtype = None if compute_dtype == torch.float32 else compute_dtype
        self.logit_scale, self.softcap = logit_transform(model)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        *,
        temperature: float = 1.0,
        return_entropy: bool = False,
        target_mask: Tensor | None = None,
        top_p: float = 1.0,
    ) -> Tensor | tuple[Tensor, Tensor]:
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 2:
            raise ValueError("input_ids: must be a [B,L] tensor with L >= 2")
        if not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask: must have shape {tuple(input_ids.shape)}")
        target_ok = attention_mask[:, 1:].to(torch.bool)
        if target_mask is not None:
            if not isinstance(target_mask, Tensor) or target_mask.shape != target_ok.shape:
                raise ValueError(f"target_mask: must have shape {tuple(target_ok.shape)}")
            target_ok = target_ok & target_mask.to(torch.bool)
        # As generate() numbers them: the first real token is position 0 whatever the padding.
        positions = attention_mask.long().cumsum(-1) - 1
        positions = positions.masked_fill(attention_mask == 0, 1)
        base = getattr(self.model, self.model.base_model_prefix)
        low = self.compute_dtype
        with torch.autocast(input_ids.device.type, dtype=low or torch.float32, enabled=bool(low)):
            out = base(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=positions, use_cache=False)  # fmt: skip
        hidden = out[0][:, :-1]  # [B,L-1,H]: position t predicts token t+1
        head = self.model.get_output_embeddings()
        weight, bias = head.weight, getattr(head, "bias", None)
        dtype = low or weight.dtype  # bf16 copies are differentiable: grads reach fp32 masters
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        labels = torch.where(target_ok, input_ids[:, 1:], IGNORE_INDEX)
        result = token_logprobs(
            hidden.reshape(-1, hidden.shape[-1]),
            weight,
            labels.reshape(-1),
            bias=bias,
            temperature=temperature,
            chunk_size=self.chunk_size,
            return_entropy=return_entropy,
            logit_scale=self.logit_scale,
            softcap=self.softcap,
            top_p=top_p,
        )
        if return_entropy:
            return tuple(x.view(labels.shape) for x in result)
        return result.view(labels.shape)


# Logit transforms some models apply after their LM head that this module does not
# reproduce (Granite divides by logits_scaling, HyperCLOVAX multiplies by it; Falcon-H1's
# lm_head_multiplier; Muse's output_multiplier): refused rather than silently wrong.
UNSUPPORTED_LOGIT_TRANSFORMS = ("logits_scaling", "lm_head_multiplier", "output_multiplier")


def logit_transform(model: torch.nn.Module) -> tuple[float, float | None]:
    """(logit_scale, softcap) that ``model``'s own forward applies to its LM head output.

    Read from the (text) config as transformers 5 names them: ``logit_scale`` (Cohere,
    Cohere2: logits * scale) and ``final_logit_softcapping`` (Gemma 2, Gemma 3:
    cap * tanh(logits / cap)). Raises ValueError naming a transform it cannot apply.
    """
    config = getattr(model, "config", None)
    if config is None:
        return 1.0, None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in UNSUPPORTED_LOGIT_TRANSFORMS:
        value = getattr(text, name, None)
        if value is not None and value != 1:
            raise ValueError(
                f"model: its config sets {name} = {value}, a logit transform that "
                "CausalLMLogprobs does not apply; its log-probs would not be the model's"
            )
    scale = getattr(text, "logit_scale", None)
    softcap = getattr(text, "final_logit_softcapping", None)
    return (1.0 if scale is None else float(scale)), (None if softcap is None else float(softcap))


def causal_lm_logprobs(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    **kwargs,
) -> Tensor | tuple[Tensor, Tensor]:
    """``CausalLMLogprobs(model, chunk_size=chunk_size)(input_ids, attention_mask, **kwargs)``."""
    return CausalLMLogprobs(model, chunk_size=chunk_size)(input_ids, attention_mask, **kwargs)
