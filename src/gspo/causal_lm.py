"""Per-token log-probs of a Hugging Face causal LM through the chunked path (gspo.chunked):
the decoder's hidden states go to ``token_logprobs`` with the model's own LM head and logit
transform, so no [B, L, V] logits tensor is ever formed.

Shapes: B sequences, L positions, H hidden size, V vocabulary size.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gspo import prefix_attention
from gspo.chunked import DEFAULT_CHUNK_SIZE, check_chunk_size, fused_loss, token_logprobs
from gspo.prefix import attention_mask_4d, cheaper, pack, unsupported


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
    - ``prompt_len=P`` (the trainer's rollouts: G adjacent rows share their first P columns)
      runs each shared prompt once and every response against it (gspo.prefix: one packed
      row per group, a block attention mask, no padding); the same log-probs, entropy and
      gradients with ``P + G*R`` decoder tokens instead of ``G*(P + R)``. Where packing
      would not be exact (gspo.prefix.unsupported: the model type, its attention
      implementation, sliding windows; or a target whose preceding column is padding), or
      would not be cheaper (gspo.prefix.cheaper: long responses), the plain forward runs.
      ``prefix_attention="rows"`` runs an SDPA model's packed attention without an N x N
      mask (gspo.prefix_attention: causal SDPA over one gathered row per response; the
      model's attention implementation becomes ``gspo_sdpa``, which is SDPA elsewhere);
      ``"dense"``, and eager models, give it the [S, 1, N, N] block mask. ``"auto"``
      (default) picks per forward the one with less estimated memory
      (gspo.prefix_attention.extra_memory: the mask's N^2 terms against the rows' G - 1
      copies of each prompt's attention tensors): the mask for long prompts and short
      responses (the calculator recipe), the rows for long responses. ``attention_used``
      says what the last forward ran ("rows", "dense", or None: the plain forward).
    - ``loss_fn(logp [B,L-1]) -> (loss, metrics)`` (a sum of per-sequence terms: the
      trainer's GSPO loss, KL and corrections) computes the loss inside this forward, its
      gradients formed in the LM-head pass (gspo.chunked.fused_loss: three matmuls per
      token instead of four); the forward then returns ``(loss, metrics, logp, entropy)``,
      ``logp`` and ``entropy`` [B,L-1] detached (entropy None unless asked; from the
      softmax the gradient needs, nearly free). A model with a logit transform (Gemma 2/3,
      Cohere), or ``top_p < 1``, gets the same result through the recompute path.
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
        prefix_attention: str = "auto",
    ):
        super().__init__()
        check_chunk_size(chunk_size)
        if prefix_attention not in ("auto", "rows", "dense"):
            raise ValueError(
                f"prefix_attention: {prefix_attention!r} is not 'auto', 'rows' or 'dense'"
            )
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
        self.prefix_attention = prefix_attention
        self.attention_used: str | None = None  # the last forward's: "rows", "dense" or None
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
        prompt_len: int | None = None,
        loss_fn=None,
    ) -> Tensor | tuple[Tensor, ...]:
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 2:
            raise ValueError("input_ids: must be a [B,L] tensor with L >= 2")
        if not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask: must have shape {tuple(input_ids.shape)}")
        target_ok = attention_mask[:, 1:].to(torch.bool)
        if target_mask is not None:
            if not isinstance(target_mask, Tensor) or target_mask.shape != target_ok.shape:
                raise ValueError(f"target_mask: must have shape {tuple(target_ok.shape)}")
            target_ok = target_ok & target_mask.to(torch.bool)
        head = self.model.get_output_embeddings()
        weight, bias = head.weight, getattr(head, "bias", None)
        dtype = self.compute_dtype or weight.dtype  # bf16 copies are differentiable
        weight, bias = weight.to(dtype), None if bias is None else bias.to(dtype)
        rows = target_ok.nonzero(as_tuple=True)  # only the scored targets reach the LM head
        packed, self.attention_used = self._pack(input_ids, attention_mask, target_ok, prompt_len)
        if self.attention_used == "rows" and not prefix_attention.use(self.model):
            self.attention_used = "dense"  # transformers refused the switch
        if packed is not None:  # one packed row per group (gspo.prefix)
            if self.attention_used == "rows":
                # No N x N mask: causal SDPA over one gathered row per response.
                plan = prefix_attention.Rows(packed.rows, packed.back)
                # An all-ones 2D mask: transformers then builds no 4D mask (SDPA's causal
                # skip), where None would make it build one from the packed position ids.
                ones = torch.ones_like(packed.input_ids)
                hidden = self._decoder(packed.input_ids, ones, packed.position_ids,
                                       gspo_rows=plan)  # fmt: skip
            else:  # eager attention, or the dense reference: the [S, 1, N, N] block mask
                implementation = self.model.config._attn_implementation
                mask = attention_mask_4d(packed.keep, implementation, self.model.dtype)
                hidden = self._decoder(packed.input_ids, mask, packed.position_ids)
            index = packed.source[:, :-1][rows]
        else:
            # As generate() numbers them: the first real token is position 0 whatever the
            # padding.
            positions = attention_mask.long().cumsum(-1) - 1
            positions = positions.masked_fill(attention_mask == 0, 1)
            hidden = self._decoder(input_ids, attention_mask, positions)
            index = rows[0] * hidden.shape[1] + rows[1]  # column t predicts token t+1
        picked = hidden.reshape(-1, hidden.shape[-1])[index].to(dtype)  # [M,H]
        labels = input_ids[:, 1:][rows]  # [M]

        def spread(values: Tensor) -> Tensor:  # [M] -> [B,L-1], 0 where not scored
            return values.new_zeros(target_ok.shape).index_put(rows, values)

        plain_head = self.logit_scale == 1.0 and self.softcap is None and top_p == 1.0
        if loss_fn is not None and plain_head:
            counts = target_ok.sum(dim=1).cumsum(0).tolist()
            loss, metrics, logp, ent = fused_loss(
                picked, weight, labels, lambda flat: loss_fn(spread(flat)), bounds=[0, *counts],
                bias=bias, temperature=temperature, return_entropy=return_entropy,
            )  # fmt: skip
            return loss, metrics, spread(logp), None if ent is None else spread(ent)
        result = token_logprobs(picked, weight, labels, bias=bias, temperature=temperature,
                                chunk_size=self.chunk_size, return_entropy=return_entropy,
                                logit_scale=self.logit_scale, softcap=self.softcap,
                                top_p=top_p)  # fmt: skip
        logp, ent = (spread(x) for x in result) if return_entropy else (spread(result), None)
        if loss_fn is not None:  # a logit transform or nucleus the fused kernel does not apply
            loss, metrics = loss_fn(logp)
            return loss, metrics, logp.detach(), None if ent is None else ent.detach()
        return (logp, ent) if return_entropy else logp

    def _decoder(self, input_ids: Tensor, attention_mask: Tensor | None, positions: Tensor,
                 **kwargs) -> Tensor:  # fmt: skip
        """The base decoder's final hidden states [B, L, H] (under autocast for bf16);
        ``kwargs`` reach the attention function (gspo.prefix_attention's plan)."""
        base = getattr(self.model, self.model.base_model_prefix)
        low = self.compute_dtype
        with torch.autocast(input_ids.device.type, dtype=low or torch.float32, enabled=bool(low)):
            out = base(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=positions, use_cache=False, **kwargs)  # fmt: skip
        return out[0]

    def _pack(self, input_ids, attention_mask, target_ok, prompt_len):
        """(the packed batch, its attention: "rows" or "dense") when ``prompt_len`` asks for
        it and packing is exact and cheaper, else (None, None)."""
        if prompt_len is None:
            return None, None
        if isinstance(prompt_len, bool) or not isinstance(prompt_len, int):
            raise TypeError(f"prompt_len: must be an int, got {type(prompt_len).__name__}")
        if not 1 <= prompt_len < input_ids.shape[1]:
            raise ValueError(f"prompt_len: {prompt_len} is not in [1, {input_ids.shape[1]})")
        if unsupported(self.model) is not None:
            return None, None
        packed = pack(input_ids, attention_mask, prompt_len)
        if unsupported(self.model, packed.input_ids.shape[1]) is not None:
            return None, None
        # A target scored from a padding column (the plain path reads that column's hidden
        # state) has no packed equal: keep the plain path's numbers then.
        if bool((packed.source[:, :-1][target_ok] < 0).any()):
            return None, None
        return self.choose_attention(tuple(input_ids.shape), packed)

    def choose_attention(self, plain: tuple[int, int], packed):
        """(packed, "rows" | "dense") for a packed batch (gspo.prefix.Packed) of the plain
        batch's shape ``plain`` (B, L), or (None, None) where neither attention is cheaper in
        FLOPs than the plain rows (gspo.prefix.cheaper: long responses under the dense mask).
        "auto" takes, of the cheaper ones, the one with less estimated memory
        (gspo.prefix_attention.extra_memory, under the current grad mode); ties go to the
        dense mask. Reads only shapes and the model's config."""
        options = {"auto": ("dense", "rows"), "rows": ("rows",), "dense": ("dense",)}
        options = options[self.prefix_attention]
        if not prefix_attention.supports(self.model):  # eager: only the block mask
            options = ("dense",)
        shape, rows = tuple(packed.input_ids.shape), tuple(packed.rows.shape)
        options = [o for o in options
                   if cheaper(self.model, plain, shape, rows if o == "rows" else None)]  # fmt: skip
        if len(options) == 2:
            # every layer's attention tensors wait for the backward, unless no_grad or
            # checkpointing (one layer's at a time)
            grad = torch.is_grad_enabled() and not getattr(
                self.model, "is_gradient_checkpointing", False)  # fmt: skip
            cost = prefix_attention.extra_memory(self.model, shape, rows,
                                                 self.compute_dtype or self.model.dtype,
                                                 saved_layers=None if grad else 1)  # fmt: skip
            options = ["rows" if cost["rows"] < cost["dense"] else "dense"]
        return (packed, options[0]) if options else (None, None)


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
