"""Rollout engines: samplers behind one small protocol, one file per implementation, and a
registry (registry.py) whose keys are ``--rollout``'s choices.

    engine = build(config.sampling, policy, world, logprobs, seed=seed, prompt_tokens=longest)
    rollout = engine.sample(prompts, group_size=G, greedy=False)
        # token ids + the sampler's log-prob of every sampled token (Rollout.logp_sampler)
    engine.load_weights(policy.sampler_weights())   # after each step's updates
    engine.close()

``hf``: Hugging Face ``generate`` on the policy module itself (no copy, nothing to sync).
``vllm``: a vLLM engine in this process, holding its own copy of the weights.
``vllm-server``: vLLM servers started by ``gspo serve``, weights pushed after each step.
Both sample from the distribution the trainer's log-probs describe (see each file); at
--top-p < 1 the trainer's log-probs apply the same nucleus cut (gspo.nucleus, docs/top-p.md).
A new engine is one file with a class that has ``for_run`` (below) and the protocol's three
methods, plus its line in registry.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Protocol

from gspo.train.engines.registry import engine_class

if TYPE_CHECKING:
    import torch

    from gspo.train.rollout import Continuation, Rollout


class Engine(Protocol):
    @classmethod
    def for_run(cls, sampling, policy, world, logprobs, *, seed: int,
                prompt_tokens: int | None = None) -> Engine:  # fmt: skip
        """The engine of a training run on this rank: ``sampling`` (SamplingConfig),
        ``policy`` (gspo.train.models), ``logprobs`` (the possibly DDP/FSDP-wrapped log-prob
        module around the policy), ``seed`` (the run's; engines offset it per rank),
        ``prompt_tokens`` (the longest prompt the start-up check accepted, data.fit: an
        engine that reserves room per sequence sizes it by data.sequence_len)."""

    def continue_ids(self, ids: Sequence[Sequence[int]], *, n: int, greedy: bool,
                     seed: int | None = None) -> list[Continuation]:  # fmt: skip
        """The one generation primitive: ``n`` continuations of each token-id sequence
        (len(ids) * n, contiguous per sequence): the sampled ids, the sampler's log-prob of
        each (None when greedy), why each stopped (rollout.Continuation). Batching, seeds
        and tensor-parallel gathering happen here, for every caller; ``seed``: the batch
        drawn from its own seed, whatever else drew from the RNG before."""

    def more(self, live: bool) -> bool:
        """Whether any rank sharing this engine still has sequences to continue (``live``:
        this rank's); ranks of a tensor-parallel engine call ``continue_ids`` together."""

    def sample(self, prompts: Sequence[dict], *, group_size: int, greedy: bool) -> Rollout:
        """``group_size`` samples per prompt (contiguous rows); greedy: one argmax each.
        Every engine's is rollout.sample_prompts over ``continue_ids``."""

    def load_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Take the policy's current weights (Hugging Face names, full tensors)."""

    def close(self) -> None:
        """Free the engine's memory and files."""


def preflight(sampling) -> None:
    """Checks an engine can make before the model loads (``preflight`` of its class, if it
    has one: vllm-server's servers answer), ValueError naming what to fix."""
    check = getattr(engine_class(sampling.rollout), "preflight", None)
    if check is not None:
        check(sampling)


def build(sampling, policy, world, logprobs, *, seed: int,
          prompt_tokens: int | None = None) -> Engine:  # fmt: skip
    """The engine ``sampling.rollout`` names, for this rank."""
    return engine_class(sampling.rollout).for_run(sampling, policy, world, logprobs, seed=seed,
                                                  prompt_tokens=prompt_tokens)  # fmt: skip
