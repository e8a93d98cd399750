"""The one place that turns ``--model`` into what the loop trains: the policy, its
tokenizer, the KL reference, the weights the sampler gets, and saving and loading them.

``--model`` is ``tiny`` (the built-in random Qwen2, gspo.train.tiny), ``smollm2`` or a
``.gguf`` file (dequantized once into a cache, gspo.train.gguf), a local Hugging Face
directory, or a LoRA adapter directory (a LoRA run's ``model/``: its base with the adapter
merged in). ``build`` loads it and, under ``--lora-r``, wraps it in PEFT adapters
(gspo.train.lora); the loop then talks to a ``Policy`` (full fine-tuning) or a
``LoraPolicy``, which answer the same calls:

    policy = build(config)                     # model, tokenizer, frozen KL reference
    policy.load(checkpoint)                    # resume: the weights, or the adapter
    policy.prepare(device)                     # dropout off, grad checkpointing
    policy.reference(logprobs, device)         # the KL reference's log-prob module
    policy.sampler_weights()                   # (name, full tensor) for vLLM's reload
    policy.state_dict(world); policy.save(dir, state)   # what a checkpoint holds
    policy.save_final(run_dir, world)          # RUN_DIR/model (and merged/ under --merge)
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import torch

from gspo.train import distributed as dd
from gspo.train import gguf, lora
from gspo.train.tiny import tiny_model, tiny_tokenizer

# --dtype: the compute dtype of the forward/backward; weights, gradients, optimizer state,
# log-probs and the loss stay float32 (CausalLMLogprobs casts its inputs, not its parameters).
COMPUTE_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


# ---------------------------------------------------------------- loading


def load(name: str, *, layers: int = 2, hidden: int = 128, seed: int = 0):
    """(model, tokenizer) for ``--model name``: 'tiny' builds the built-in pair (``layers``,
    ``hidden``, ``seed``); a GGUF file or 'smollm2' is dequantized once into a cached
    directory; anything else is a local Hugging Face directory, or a LoRA adapter directory
    (its base model with the adapter merged in). Never downloads."""
    if name == "tiny":
        return tiny_model(layers=layers, hidden=hidden, seed=seed), tiny_tokenizer()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(gguf.resolve(name))
    if not path.is_dir():
        raise ValueError(
            f"--model / model = {name!r} is not a directory; give 'tiny', 'smollm2', a .gguf "
            "file or a local directory written by save_pretrained (this trainer never "
            "downloads weights)"
        )
    if lora.is_adapter_dir(path):  # a LoRA run's model/: its base with the adapter merged in
        return load_adapter_dir(path)
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                       output_loading_info=True)  # fmt: skip
    # transformers prints a table of the weights the checkpoint lacks and initialises them
    # at random: a run would train (and save) a random LM head with exit 0.
    missing = sorted(info["missing_keys"]) + sorted(info.get("mismatched_keys") or ())
    if missing:
        raise ValueError(
            f"--model {name!r}: the checkpoint in {path} leaves {len(missing)} of the model's "
            f"weights uninitialised ({', '.join(map(str, missing[:5]))}"
            f"{', ...' if len(missing) > 5 else ''}); its config.json describes another model "
            "than its weights (e.g. tie_word_embeddings false without an lm_head.weight): "
            "fix the config or save the model again with save_pretrained"
        )
    check_logprobs(model, name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # many causal LMs ship without one; EOS is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ValueError(f"--model {name!r}: the tokenizer has no EOS token; set eos_token")
    return model, tokenizer


def use_chat_template(tokenizer, path: str | None) -> None:
    """``--chat-template FILE``: the file's Jinja text replaces the tokenizer's template (it
    is saved with the tokenizer, so the trained model keeps it); none leaves it."""
    if path is not None:
        tokenizer.chat_template = Path(path).read_text(encoding="utf-8")


def load_adapter_dir(path: Path):
    """(model, tokenizer) of an adapter directory (a LoRA run's ``model/`` or checkpoint):
    its base model, rebuilt from ``gspo-base.json`` (or PEFT's ``base_model_name_or_path``),
    with the adapter merged in (float32: exact to rounding), and the base's tokenizer."""
    path = Path(path)
    base = lora.read_base(path)
    model, tokenizer = load(base["model"], layers=base.get("tiny_layers", 2),
                            hidden=base.get("tiny_hidden", 128),
                            seed=base.get("seed", 0))  # fmt: skip
    return lora.merge_adapter(model, path), tokenizer


# Log-probs of the trainer's path and of model.forward agree to float32 rounding (measured:
# 4.8e-7 for the tiny model, 1.5e-5 for SmolLM2-135M; larger heads round more); a logit
# transform the trainer does not apply moves them by far more (x2 logits: ~1).
LOGPROB_TOLERANCE = 1e-3


def check_logprobs(model, name: str, *, length: int = 8) -> float:
    """The largest |difference| between the trainer's log-probs (``CausalLMLogprobs``: the
    decoder, then the LM head with the logit transforms it knows) and
    ``log_softmax(model(ids).logits)`` on one batch [2, ``length``] of random token ids, in
    float32 on the model's device. Raises ValueError, naming the difference, above
    LOGPROB_TOLERANCE: the model's forward does something to its logits that the trainer
    would not, and training on the wrong log-probs must not start. The model's own train /
    eval modes and the global RNG are left as they were."""
    from gspo.causal_lm import CausalLMLogprobs
    from gspo.train.rollout import eval_mode

    head = model.get_output_embeddings()
    vocab = head.weight.shape[0]
    device = head.weight.device
    ids = torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(0))
    ids, mask = ids.to(device), torch.ones_like(ids, device=device)
    with torch.no_grad(), eval_mode(model):
        ours = CausalLMLogprobs(model)(ids, mask)  # [2, length - 1]
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
        theirs = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    diff = float((ours - theirs).abs().max())
    if not diff <= LOGPROB_TOLERANCE:  # NaN fails too
        raise ValueError(
            f"--model {name!r}: the trainer's log-probs (decoder, then the LM head) differ from "
            f"log_softmax of the model's own logits by up to {diff:.3g} on a test batch "
            f"(float rounding is < {LOGPROB_TOLERANCE:g}): {type(model).__name__}'s forward "
            "transforms its logits in a way gspo.causal_lm does not reproduce; training on "
            "these log-probs would be wrong (report the architecture)"
        )
    return diff


def position_limit(model) -> int | None:
    """The most positions the model has (None if its config does not say)."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def build(config):
    """The policy of a run (``config``: a TrainConfig): the model of ``--model`` under the
    run's seed, wrapped in LoRA adapters under ``--lora-r``, with the frozen KL reference
    copied now (the reference is the initial policy: before any checkpoint is loaded)."""
    m, optim = config.policy, config.optim
    model, tokenizer = load(m.model, layers=m.tiny_layers, hidden=m.tiny_hidden,
                            seed=config.run.seed)  # fmt: skip
    use_chat_template(tokenizer, m.chat_template)
    kl = config.objective.kl_coef > 0
    compute_dtype = COMPUTE_DTYPES[optim.dtype]
    if optim.lora_r:
        return LoraPolicy(lora.wrap(model, config), tokenizer, optim, compute_dtype, kl=kl)
    frozen = frozen_copy(model) if kl else None
    return Policy(model, tokenizer, optim, compute_dtype, frozen=frozen)


def frozen_copy(model) -> torch.nn.Module:
    """The KL reference's weights under full fine-tuning: a frozen deep copy."""
    return copy.deepcopy(model).requires_grad_(False)


# ---------------------------------------------------------------- the policy


class Policy:
    """A model trained whole (full fine-tuning). ``model`` is the Hugging Face model;
    ``frozen`` its initial weights for the KL reference (None without ``--kl-coef``)."""

    def __init__(self, model, tokenizer, optim, compute_dtype, *, frozen=None):
        self.model, self.tokenizer, self.optim = model, tokenizer, optim
        self.compute_dtype, self.frozen = compute_dtype, frozen

    @property
    def hf_model(self) -> torch.nn.Module:
        """The Hugging Face model that ``generate`` runs."""
        return self.model

    def prepare(self, device: torch.device) -> None:
        """On ``device``, in eval mode (dropout and every other training-only behaviour off:
        its noise alone moves on-policy ratios off 1) unless ``--keep-dropout``, and
        ``--grad-checkpointing`` (which keeps that mode)."""
        self.model.to(device).train(self.optim.keep_dropout)
        if self.optim.grad_checkpointing:
            enable_grad_checkpointing(self.hf_model, keep_dropout=self.optim.keep_dropout)

    def reference(self, logprobs, device: torch.device):
        """The KL reference's log-prob module: the frozen initial weights'. None without KL."""
        from gspo.causal_lm import CausalLMLogprobs

        if self.frozen is None:
            return None
        return CausalLMLogprobs(self.frozen.to(device).eval(), compute_dtype=self.compute_dtype)

    def sampler_weights(self):
        """(Hugging Face name, full tensor) of the policy's weights, one at a time."""
        return dd.full_params(self.model)

    def state_dict(self, world: dd.World) -> dict[str, torch.Tensor] | None:
        """What a checkpoint saves of the model: full tensors on rank 0 (None elsewhere)."""
        return dd.full_state_dict(self.model, world)

    def save(self, directory: Path, state: dict[str, torch.Tensor]) -> None:
        """``state`` as a Hugging Face directory (model.safetensors + config.json)."""
        self.model.save_pretrained(directory, state_dict=state, safe_serialization=True)

    def load(self, path: Path) -> None:
        """A checkpoint's weights into the model, in place (strict)."""
        load_model_weights(self.model, Path(path))

    def save_final(self, run_dir: Path, world: dd.World) -> None:
        """RUN_DIR/model: the trained model as a Hugging Face directory. Every rank calls
        this (full tensors are collectives under FSDP2)."""
        state = self.state_dict(world)
        if world.main:
            self.save(Path(run_dir) / "model", state)
            self.tokenizer.save_pretrained(Path(run_dir) / "model")
        dd.barrier(world)


class LoraPolicy(Policy):
    """A PEFT model whose adapters alone train (gspo.train.lora). The KL reference is the
    same model with its adapters disabled, so no copy of the base is kept; checkpoints and
    ``RUN_DIR/model`` hold the adapter; the sampler gets the merged weights."""

    def __init__(self, peft_model, tokenizer, optim, compute_dtype, *, kl: bool):
        super().__init__(peft_model, tokenizer, optim, compute_dtype)
        self.kl = kl

    @property
    def hf_model(self) -> torch.nn.Module:
        return self.model.get_base_model()  # its layers run the adapters

    def reference(self, logprobs, device: torch.device):
        """The policy's own log-prob module (DDP/FSDP-wrapped, so the wrapper gathers what
        it must) with the adapters disabled."""
        return lora.AdapterDisabled(logprobs, self.model) if self.kl else None

    def sampler_weights(self):
        return lora.merged_params(self.model)

    def state_dict(self, world: dd.World) -> dict[str, torch.Tensor] | None:
        return lora.adapter_state_dict(self.model, world)

    def save(self, directory: Path, state: dict[str, torch.Tensor]) -> None:
        lora.save_adapter(self.model, directory, state)

    def load(self, path: Path) -> None:
        lora.load_adapter(self.model, Path(path))

    def save_final(self, run_dir: Path, world: dd.World) -> None:
        """RUN_DIR/model (the adapter) and, with ``--merge``, RUN_DIR/merged: the base with
        the adapters merged, which transformers loads without PEFT."""
        super().save_final(run_dir, world)
        if self.optim.merge:
            merged = {}
            for name, value in lora.merged_params(self.model):  # every rank: all-gathers
                if world.main:
                    merged[name] = value.cpu().clone()
            if world.main:
                self.hf_model.save_pretrained(Path(run_dir) / "merged", state_dict=merged,
                                              safe_serialization=True)  # fmt: skip
                self.tokenizer.save_pretrained(Path(run_dir) / "merged")
            dd.barrier(world)


# ---------------------------------------------------------------- the model's forward


def enable_grad_checkpointing(model, *, keep_dropout: bool = True) -> None:
    """Recompute each decoder layer's activations in the backward (transformers' own
    checkpointing; non-reentrant, which works under DDP and FSDP2 and with frozen inputs).

    transformers checkpoints a layer (``GradientCheckpointingLayer``) only in training
    mode, and training mode switches on everything a model does only while training:
    dropout, but also e.g. the router jitter of MoE models (Mixtral's and Qwen2-MoE's
    ``router_jitter_noise`` scales the router's input by noise), which moves the ratio of
    on-policy samples off 1. So unless ``keep_dropout`` (the trainer's opt-in to train mode)
    the model stays in eval mode, computing exactly what the sampler computes, and each
    checkpointing layer is given a ``__call__`` that also checkpoints in eval mode whenever
    gradients are on (``_checkpoint_in_eval``). With ``keep_dropout`` the model trains in
    train mode, as transformers checkpoints it.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"--grad-checkpointing: {type(model).__name__} does not support it")
    from transformers.modeling_layers import GradientCheckpointingLayer

    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train(keep_dropout)
    if keep_dropout:
        return
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:  # e.g. remote code that checks self.training inside its own loop
        raise ValueError(
            f"--grad-checkpointing: {type(model).__name__} checkpoints only in training mode, "
            "which also turns on its training-only behaviour (dropout, router noise); add "
            "--keep-dropout to train in that mode, or drop --grad-checkpointing"
        )
    for layer in layers:
        layer.__class__ = _checkpoint_in_eval(type(layer))


_EVAL_CHECKPOINTED: dict[type, type] = {}


def _checkpoint_in_eval(cls: type) -> type:
    """A subclass of the layer class ``cls`` (same name) whose ``__call__`` checkpoints in
    eval mode too. transformers' own ``__call__`` also drops a KV cache before
    checkpointing; there is none here: the trainer's forward passes ``use_cache=False``
    and generate() runs without gradients, where this falls back to ``cls.__call__``."""
    if getattr(cls, "_gspo_checkpoints_in_eval", False):
        return cls
    if cls not in _EVAL_CHECKPOINTED:

        def __call__(self, *args, **kwargs):
            if self.gradient_checkpointing and not self.training and torch.is_grad_enabled():
                call = functools.partial(torch.nn.Module.__call__, self, **kwargs)
                return self._gradient_checkpointing_func(call, *args)
            return cls.__call__(self, *args, **kwargs)

        _EVAL_CHECKPOINTED[cls] = type(cls.__name__, (cls,), {
            "__call__": __call__, "_gspo_checkpoints_in_eval": True,
            "__module__": cls.__module__, "__qualname__": cls.__qualname__,
        })  # fmt: skip
    return _EVAL_CHECKPOINTED[cls]


# ---------------------------------------------------------------- full-model checkpoints


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a save_pretrained directory: ``model.safetensors``, or the shards that
    ``model.safetensors.index.json`` lists (large models, or any ``max_shard_size``)."""
    from safetensors.torch import load_file

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if not index.exists():
        single = path / "model.safetensors"
        if not single.exists():
            raise ValueError(f"{path}: neither model.safetensors nor its sharded index is there")
        return load_file(single)
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    state = {}
    for name in files:
        state.update(load_file(path / name))
    return state


# The HF config keys that decide the shapes of the weights (names differ by architecture).
_SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "n_embd", "num_hidden_layers",
               "n_layer", "intermediate_size", "n_inner", "num_attention_heads", "n_head",
               "num_key_value_heads")  # fmt: skip


def load_model_weights(model, path: Path) -> None:
    """Copy the checkpoint's weights into ``model`` in place (strict); a checkpoint of
    another model is refused with both models described."""
    if lora.is_adapter_dir(path):
        raise ValueError(f"checkpoint {path} holds a LoRA adapter, not a whole model; resume "
                         "it with its run's --lora-r (as its config.json says)")  # fmt: skip
    saved = json.loads((path / "config.json").read_text())
    built = model.config.to_dict()
    differ = [k for k in _SHAPE_KEYS if k in saved and k in built and saved[k] != built[k]]
    if differ:
        raise ValueError(
            f"checkpoint {path} holds another model than this run's config builds: "
            f"checkpoint {_describe(saved, differ)}, config {_describe(built, differ)}; "
            "resume with the run's own --model (and --tiny-* sizes), or start a new --run-dir"
        )
    state = read_safetensors(path)
    if getattr(model.config, "tie_word_embeddings", False):
        state.setdefault("lm_head.weight", state.get("model.embed_tokens.weight"))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"checkpoint {path} does not fit this run's model: {err}") from None
    missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not fit the model: missing {missing}, "
                         f"unexpected {unexpected}")  # fmt: skip


def _describe(config: dict, keys: list[str]) -> str:
    return f"{config.get('model_type', '?')} (" + ", ".join(f"{k} {config[k]}" for k in keys) + ")"
