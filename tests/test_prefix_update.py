"""The trainer's fast step (--shared-prefix and --fused-loss, the defaults) takes the same
update steps as today's path (--no-shared-prefix --no-fused-loss): old log-probs, KL
reference, micro-batches, gradient checkpointing, LoRA, each change alone and together; and
the micro-batch planner counts the packed forward's tokens.

float64 with Qwen2's RMSNorm kept in float64 (tests/test_prefix.py says why), 1e-10; the
model's own float32 at 1e-5. A plausible bug (a response attending to another response of
its group, positions not restarting, the prompt's gradient counted once instead of G times)
moves the parameters by ~1e-3 after these steps (the lr is 1e-2).
"""

from __future__ import annotations

import pytest
import torch

from gspo.causal_lm import CausalLMLogprobs
from gspo.train.config import TrainConfig
from gspo.train.microbatch import cost, plan
from gspo.train.models import enable_grad_checkpointing
from gspo.train.rollout import Rollout
from gspo.train.tiny import tiny_model
from gspo.train.update import update

B, G, P, T = 12, 4, 6, 5


def grouped_rollout() -> Rollout:
    """3 groups of 4, group g's prompt left-padded by 2g tokens, ragged responses."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(4, 50, (B, P + T), generator=gen)
    mask = torch.ones(B, P + T, dtype=torch.long)
    for g in range(B // G):
        ids[g * G : (g + 1) * G, :P] = ids[g * G, :P]
        mask[g * G : (g + 1) * G, : 2 * g] = 0
    lengths = torch.tensor([5, 1, 3, 2, 4, 5, 1, 2, 3, 3, 5, 1])
    response = torch.arange(T)[None] < lengths[:, None]
    mask[:, P:] = response.long()
    return Rollout(prompts=[{"prompt": "x"}] * B, input_ids=ids, attention_mask=mask,
                   response_mask=response, prompt_len=P, completions=[""] * B)  # fmt: skip


def run_update(config: TrainConfig, dtype, *, lora=False, checkpointing=False):
    model = tiny_model(layers=2, hidden=32, seed=0).to(dtype)
    if lora:
        from gspo.train.lora import wrap

        model = wrap(model, config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_B." in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
    if checkpointing:
        model.train()
        enable_grad_checkpointing(model)
    ref = CausalLMLogprobs(tiny_model(layers=2, hidden=32, seed=1).to(dtype))
    adv = torch.linspace(-1.0, 1.0, B, dtype=dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    history = update(CausalLMLogprobs(model), ref, optimizer, scheduler, grouped_rollout(), adv,
                     config=config)  # fmt: skip
    moved = max((p - s).abs().max().item() for p, s in zip(params, start, strict=True))
    assert moved > 1e-3  # the steps moved the weights
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, history


CASES = {
    "plain": {},
    "micro-batches": {"max_tokens_per_microbatch": 30},
    "kl": {"kl_coef": 0.1},
    "gspo-token": {"loss": "gspo-token"},
}


TODAY = {"shared_prefix": False, "fused_loss": False}


def assert_same_steps(options: dict, dtype, tol, fast=None, **kwargs):
    base = dict(minibatches=3, prompts_per_step=B // G, group_size=G, lr=1e-2,
                max_grad_norm=0.5, **options)  # fmt: skip
    want, want_hist = run_update(TrainConfig(**base, **TODAY), dtype, **kwargs)
    got, got_hist = run_update(TrainConfig(**base, **(fast or {})), dtype, **kwargs)
    for name in want:
        assert (got[name] - want[name]).abs().max().item() < tol, name
    for a, b in zip(got_hist, want_hist, strict=True):
        for key in ("loss", "grad_norm", "ratio_min", "ratio_max", "entropy", "clip_frac_low"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-8), key


@pytest.mark.parametrize("case", CASES)
def test_float64_fast_step_takes_the_same_steps(case, float64_norm):
    assert_same_steps(CASES[case], torch.float64, 1e-10)


@pytest.mark.parametrize("alone", ["shared_prefix", "fused_loss"])
def test_float64_each_change_alone_takes_the_same_steps(alone, float64_norm):
    fast = {**TODAY, alone: True}
    assert_same_steps({"kl_coef": 0.1}, torch.float64, 1e-10, fast=fast)


def test_float64_lora_and_grad_checkpointing_take_the_same_steps(float64_norm):
    options = {"lora_r": 4, "max_tokens_per_microbatch": 40}
    assert_same_steps(options, torch.float64, 1e-10, lora=True, checkpointing=True)


def test_float32_shared_prefix_takes_the_same_steps():
    assert_same_steps({"max_tokens_per_microbatch": 30}, torch.float32, 1e-5)


def test_packed_planner_counts_groups_times_longest_packed_row():
    """Group 0: prompt 6 real tokens, responses 5 1 3 2 -> packed row 17; group 1 (prompt 4
    real tokens): 4 + 4+5+1+2 = 16; group 2 (2 real): 2 + 3+3+5+1 = 14. The plain padded
    batch of 12 rows costs 12 x 11 = 132; packed, 3 x 17 = 51."""
    rollout = grouped_rollout()
    assert cost(rollout) == 132 and cost(rollout, shared=True) == 51
    parts = plan(rollout, 34, shared=True)  # two groups of <= 17 fit: 2 x 17 = 34
    assert parts == [slice(0, 8), slice(8, 12)]
    assert all(cost(rollout.select(s), shared=True) <= 34 for s in parts)
    parts = plan(rollout, 12, shared=True)  # a group split; each piece runs its prompt
    assert [i for s in parts for i in range(s.start, s.stop)] == list(range(B))
    assert all(cost(rollout.select(s), shared=True) <= 12 or s.stop - s.start == 1
               for s in parts)  # fmt: skip
    assert len(plan(rollout, 34, shared=True, count=4)) == 4


def test_the_flags_turn_it_off():
    from gspo.train.cli import parse_config

    assert TrainConfig().shared_prefix is True and TrainConfig().fused_loss is True
    config = parse_config(["--no-shared-prefix", "--no-fused-loss"])[0]
    assert config.shared_prefix is False and config.fused_loss is False
