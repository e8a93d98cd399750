"""The update step: it moves the policy the way the advantage says, micro-batches by token
budget give the whole-minibatch update, gradient checkpointing and bf16 change nothing they
should not."""

from __future__ import annotations

import pytest
import torch

from gspo.chunked import CausalLMLogprobs
from gspo.config import TrainConfig
from gspo.train.rollout import Rollout
from gspo.train.tiny import tiny_model
from gspo.train.update import response_logprobs, update

P, T = 4, 5


def rollout_of(ids: torch.Tensor, lengths: list[int], pad: list[int] | None = None) -> Rollout:
    """Sequences [B, P + T] with responses of the given lengths and ``pad`` left-pad tokens."""
    b = ids.shape[0]
    response_mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    prompt_mask = torch.ones(b, P, dtype=torch.long)
    for i, n in enumerate(pad or []):
        prompt_mask[i, :n] = 0
    return Rollout(
        prompts=[{"prompt": "x"}] * b, input_ids=ids,
        attention_mask=torch.cat([prompt_mask, response_mask.long()], dim=1),
        response_mask=response_mask, prompt_len=P, completions=[""] * b,
    )  # fmt: skip


def sequence_logp(engine, rollout) -> torch.Tensor:
    """[B] summed response log-prob of each sequence under the current weights."""
    with torch.no_grad():
        logp, _ = response_logprobs(engine, rollout, temperature=1.0)
    return logp.sum(dim=1)


def one_update(model, rollout, adv, config, *, engine=None):
    engine = engine or CausalLMLogprobs(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return update(engine, None, optimizer, scheduler, rollout, adv, config=config)


# ---------------------------------------------------------------- direction


@pytest.mark.parametrize("loss", ["gspo", "gspo-token", "grpo"])
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["adv+1", "adv-1"])
def test_one_update_moves_the_log_prob_with_the_advantage(loss, sign):
    """One on-policy step (ratio 1, nothing clipped) on a single sequence: its log-prob rises
    with advantage +1 and falls with -1. AdamW's first step moves each weight by about lr in
    the sign of its gradient, so the change is lr * sum|dlogp/dw| to first order: ~0.1 nats
    here. A sign flip anywhere (advantage, ratio, loss, the world-size factor) reverses it."""
    model = tiny_model(layers=1, hidden=32, seed=0)
    ids = torch.randint(4, 50, (1, P + T), generator=torch.Generator().manual_seed(1))
    rollout = rollout_of(ids, [T])
    config = TrainConfig(loss=loss, minibatches=1, lr=1e-3, max_grad_norm=1e9)
    before = sequence_logp(CausalLMLogprobs(model), rollout)
    history = one_update(model, rollout, torch.tensor([sign]), config)
    after = sequence_logp(CausalLMLogprobs(model), rollout)
    assert history[0]["clip_frac_low"] + history[0]["clip_frac_high"] == 0.0
    assert sign * float(after - before) > 0.01, (float(before), float(after))
