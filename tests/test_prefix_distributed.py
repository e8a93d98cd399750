"""The fast step on 2 gloo ranks (DDP and FSDP2): each rank holds whole groups that share
their prompts (left-padded differently), runs them packed with the fused loss, and the
summed gradient equals one process on the whole batch through today's path
(--no-shared-prefix --no-fused-loss), to 1e-5 in float32. The update step with micro-batches
too. (The pattern of tests/test_train_distributed.py, whose batches share no prompt.)"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from gspo.train.config import TrainConfig
from gspo.train.rollout import Rollout
from gspo.train.tiny import tiny_model
from gspo.train.update import minibatch_loss

B, G, P, T = 16, 4, 5, 5  # 4 groups: each of 2 ranks holds 2 whole groups
FAST = TrainConfig(kl_coef=0.05, eps_low=0.003, eps_high=0.004)
TODAY = TrainConfig(kl_coef=0.05, eps_low=0.003, eps_high=0.004, shared_prefix=False,
                    fused_loss=False)  # fmt: skip
UPDATE = dict(minibatches=2, max_grad_norm=0.05, lr=1e-2, warmup_steps=0,
              max_tokens_per_microbatch=30)  # fmt: skip


def make_batch():
    """Random groups of G rows sharing a prompt, group g left-padded by g tokens; ragged
    responses; off-policy logp_old and a reference shifted from the current log-probs."""
    gen = torch.Generator().manual_seed(0)
    model = tiny_model(layers=1, hidden=32, seed=0)
    ids = torch.randint(4, 50, (B, P + T), generator=gen)
    mask = torch.ones(B, P + T, dtype=torch.long)
    for g in range(B // G):
        ids[g * G : (g + 1) * G, :P] = ids[g * G, :P]
        mask[g * G : (g + 1) * G, :g] = 0
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    response = torch.arange(T)[None, :] < lengths[:, None]
    mask[:, P:] = response.long()
    rollout = Rollout(prompts=[{"prompt": "x"}] * B, input_ids=ids, attention_mask=mask,
                      response_mask=response, prompt_len=P, completions=[""] * B)  # fmt: skip
    from gspo.advantages import advantages
    from gspo.causal_lm import CausalLMLogprobs
    from gspo.train.update import response_logprobs

    adv = advantages(torch.rand(B, generator=gen), group_size=G)
    with torch.no_grad():
        logp, _ = response_logprobs(CausalLMLogprobs(model), rollout, temperature=1.0)
    shift = (torch.rand(B, 1, generator=gen) - 0.5) * 0.02
    logp_old = torch.where(response, logp + shift, 0.0)
    ref_logp = torch.where(response, logp - 0.1, 0.0)
    return model, rollout, adv, logp_old, ref_logp


def gradients(model, engine, rows, world_size, config):
    _, rollout, adv, logp_old, ref_logp = make_batch()
    loss, _ = minibatch_loss(engine, rollout.select(rows), logp_old=logp_old[rows],
                             adv=adv[rows], ref_logp=ref_logp[rows], config=config,
                             world_size=world_size)  # fmt: skip
    loss.backward()
    from torch.distributed.tensor import DTensor

    return {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
            for n, p in model.named_parameters()}  # fmt: skip


def updated(model, engine, rows, world, config, optimizer=torch.optim.AdamW):
    """The parameters after update() on ``rows`` (a tensor: the single process, in that
    order), with ``optimizer`` (a class) at config.lr."""
    from gspo.train import distributed as dd
    from gspo.train.update import update

    _, rollout, adv, _, _ = make_batch()
    if isinstance(rows, torch.Tensor):  # the single process: rows in this order
        rollout = Rollout(prompts=[rollout.prompts[i] for i in rows],
                          input_ids=rollout.input_ids[rows],
                          attention_mask=rollout.attention_mask[rows],
                          response_mask=rollout.response_mask[rows], prompt_len=P,
                          completions=[""] * B)  # fmt: skip
        rollout, adv, rows = rollout, adv[rows], slice(0, B)
    optimizer = optimizer(list(engine.parameters()), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    update(engine, None, optimizer, scheduler, rollout.select(rows), adv[rows], config=config,
           world_size=world.size)  # fmt: skip
    return dd.full_state_dict(model, world)


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    from gspo.causal_lm import CausalLMLogprobs
    from gspo.train import distributed as dd

    world = dd.init("cpu")
    rows = slice(rank * B // world_size, (rank + 1) * B // world_size)
    results = {}
    for mode in ("ddp", "fsdp2"):
        model = make_batch()[0]
        engine = dd.wrap(CausalLMLogprobs(model), world, fsdp=mode == "fsdp2")
        results[mode] = gradients(model, engine, rows, world_size, FAST)
        model = make_batch()[0]
        engine = dd.wrap(CausalLMLogprobs(model), world, fsdp=mode == "fsdp2")
        results[mode + "-update"] = updated(model, engine, rows, world, TrainConfig(**UPDATE))
    if rank == 0:
        torch.save(results, out)
    dd.shutdown(world)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("prefix") / "grads.pt"
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return torch.load(out)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_ranks_packed_and_fused_give_todays_single_process_gradient(two_ranks, mode):
    from gspo.causal_lm import CausalLMLogprobs

    model = make_batch()[0]
    expected = gradients(model, CausalLMLogprobs(model), slice(0, B), 1, TODAY)
    for name, g in expected.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(two_ranks[mode][name], g, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_ranks_take_todays_single_process_update_step(two_ranks, mode):
    from gspo.causal_lm import CausalLMLogprobs

    model = make_batch()[0]
    today = TrainConfig(**UPDATE, shared_prefix=False, fused_loss=False)
    # rank r holds rows 8r..8r+7 (groups 2r, 2r+1) and its minibatch k is rows 8r+4k..+3;
    # the single process sees each global minibatch (both ranks' slices) as one slice
    order = torch.tensor([0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15])
    expected = updated(model, CausalLMLogprobs(model), order, _single(), today)
    start = make_batch()[0].state_dict()
    assert max((expected[n] - start[n]).abs().max() for n in expected) > 1e-3  # it moved
    for name, value in expected.items():
        torch.testing.assert_close(two_ranks[mode + "-update"][name], value, rtol=0,
                                   atol=1e-5, msg=name)  # fmt: skip


def _single():
    from gspo.train import distributed as dd

    return dd.World()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
