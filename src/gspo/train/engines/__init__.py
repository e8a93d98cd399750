"""Rollout engines: samplers behind one small protocol, one file per implementation.

    engine = build(config, model, tokenizer, world, policy)
    rollout = engine.sample(prompts, group_size=G, greedy=False)
        # token ids + the sampler's log-prob of every sampled token (Rollout.sampler_logp)
    engine.load_weights(named_tensors)   # after each step's updates: the policy's weights
                                         # (under LoRA merged: lora.sampler_weights)
    engine.close()

``hf``: Hugging Face ``generate`` on the policy module itself (no copy, nothing to sync).
``vllm``: a vLLM engine in this process, holding its own copy of the weights.
Both sample from the distribution the trainer's log-probs describe (see each file); at
--top-p < 1 the trainer's log-probs apply the same nucleus cut (gspo.nucleus, docs/top-p.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import torch

from gspo.train.rewards import Prompt
from gspo.train.rollout import Rollout


class Engine(Protocol):
    def sample(self, prompts: Sequence[Prompt], *, group_size: int, greedy: bool) -> Rollout:
        """``group_size`` samples per prompt (contiguous rows); greedy: one argmax each."""

    def load_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Take the policy's current weights (Hugging Face names, full tensors)."""

    def close(self) -> None:
        """Free the engine's memory and files."""


def build(config, model, tokenizer, world, policy) -> Engine:
    """The engine ``config.rollout`` names, for this rank. ``policy`` is the (possibly
    DDP/FSDP-wrapped) log-prob module around ``model``."""
    from gspo.train import distributed as dd
    from gspo.train import lora

    if config.rollout == "hf":
        from gspo.train.engines.hf import HFEngine

        fsdp = world.distributed and dd.is_fsdp(policy)
        # under LoRA the HF model inside the PeftModel: its layers run the adapters, and
        # generate() must see its own generation_config (engines.hf swaps it)
        return HFEngine(lora.hf_model(model), tokenizer, config=config, synced=fsdp,
                        gathered=lambda: dd.gathered(policy))  # fmt: skip
    if config.rollout == "vllm":
        if world.distributed:
            raise ValueError(
                f"--rollout vllm runs one vLLM engine in a single process; under torchrun "
                f"({world.size} ranks) use --rollout hf (vLLM's own tensor/data parallelism "
                "inside one trainer process is not wired up yet)"
            )
        from gspo.train.engines.vllm import VLLMEngine

        return VLLMEngine(lora.hf_model(model), tokenizer, config=config, device=world.device,
                          seed=config.seed + 7919 * world.rank,
                          weights=lora.sampler_weights(model))  # fmt: skip
    raise ValueError(f"--rollout {config.rollout!r}: use hf or vllm")
