"""GPU checks (marker `cuda`; skipped with a reason on machines without CUDA). Run them with
`pytest -m cuda`. The same properties are tested on CPU elsewhere; these make sure the
device-agnostic code also holds on CUDA, where bf16 matmuls and reductions differ."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.cuda


def test_bf16_step_on_cuda_is_within_the_rounding_bound_of_fp32():
    from test_train_update import bf16_vs_fp32_step, check_bf16_step

    check_bf16_step(bf16_vs_fp32_step("cuda"))


def test_loss_on_cuda_equals_cpu():
    from gspo.loss import gspo_loss

    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(6, 9, generator=g, dtype=torch.float64) * 3
    logp_old = logp + (torch.rand(6, 9, generator=g, dtype=torch.float64) - 0.5) * 0.02
    mask = torch.rand(6, 9, generator=g) < 0.8
    mask[:, 0] = True
    adv = torch.randn(6, generator=g, dtype=torch.float64)
    results = []
    for device in ("cpu", "cuda"):
        x = logp.to(device).requires_grad_()
        for variant in ("gspo", "gspo-token", "grpo"):
            loss, _ = gspo_loss(x, logp_old.to(device), mask.to(device), advantages=adv.to(device),
                                variant=variant)  # fmt: skip
            (grad,) = torch.autograd.grad(loss, x)
            results.append((device, variant, loss.detach().cpu(), grad.cpu()))
    cpu, cuda = results[:3], results[3:]
    for (_, variant, l1, g1), (_, _, l2, g2) in zip(cpu, cuda, strict=True):
        torch.testing.assert_close(l2, l1, rtol=0, atol=1e-12, msg=variant)
        torch.testing.assert_close(g2, g1, rtol=0, atol=1e-12, msg=variant)


def test_chunked_logprobs_on_cuda_match_naive():
    from gspo.chunked import token_logprobs
    from gspo.logprobs import naive_token_logprobs

    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(300, 64, generator=g).cuda().requires_grad_()
    weight = torch.randn(1000, 64, generator=g).cuda().requires_grad_()
    labels = torch.randint(0, 1000, (300,), generator=g).cuda()
    got = token_logprobs(hidden, weight, labels, chunk_size=128, softcap=5.0)
    want = naive_token_logprobs(hidden, weight, labels, softcap=5.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    ga = torch.autograd.grad(got.sum(), (hidden, weight))
    gb = torch.autograd.grad(want.sum(), (hidden, weight))
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_short_bf16_training_run_on_cuda(tmp_path):
    from gspo.train.config import TrainConfig
    from gspo.train.loop import train

    config = TrainConfig(device="cuda", dtype="bf16", steps=3, eval_every=3, eval_prompts=8,
                         max_tokens_per_microbatch=256, grad_checkpointing=True,
                         run_dir=str(tmp_path), progress=False, plot=False)  # fmt: skip
    summary = train(config)
    assert summary["finished"] and summary["step"] == 3


# --- issue 26: the fast step's defaults on the GPU (device-agnostic helpers, run on CUDA) ---

BF16_U = 2.0**-8  # bf16's unit roundoff (8 significant bits)


def on(device, rollout):
    from gspo.train.rollout import Rollout

    moved = {k: getattr(rollout, k).to(device)
             for k in ("input_ids", "attention_mask", "response_mask")}  # fmt: skip
    return Rollout(**{**vars(rollout), **moved})


def on_policy_ratios(device: str) -> dict:
    """One bf16 update with --shared-prefix and --fused-loss, old log-probs from the trainer
    at the same weights: the first minibatch's ratios (every sequence's exp of its mean
    log-ratio) are exactly 1 when the old pass and the loss pass compute the same bf16
    numbers (the same packing, kernels and reduction order)."""
    from gspo.causal_lm import CausalLMLogprobs
    from gspo.train.config import TrainConfig
    from gspo.train.tiny import tiny_model
    from gspo.train.update import update
    from test_prefix_update import B, grouped_rollout

    model = tiny_model(layers=2, hidden=64).to(device)
    engine = CausalLMLogprobs(model, compute_dtype=torch.bfloat16)
    config = TrainConfig(prompts_per_step=3, group_size=4, minibatches=2, lr=1e-3,
                         dtype="bf16", old_logprobs="trainer", shared_prefix=True,
                         fused_loss=True)  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    adv = torch.linspace(-1.0, 1.0, B, device=device)
    return update(engine, None, optimizer, scheduler, on(device, grouped_rollout()), adv,
                  config=config)  # fmt: skip


def test_bf16_shared_prefix_fused_loss_on_policy_ratio_is_exactly_one():
    first, second = on_policy_ratios("cuda")
    assert first["ratio_min"] == first["ratio_max"] == 1.0
    assert second["ratio_max"] - second["ratio_min"] > 0  # after a step: off-policy, ratios move


def sampler_trainer_mismatch(device: str) -> tuple[float, float]:
    """HF generate's own log-probs (its raw logits, bf16 autocast, KV cache) against the
    trainer's bf16 shared-prefix log-probs of the same tokens: (max |difference|, max |logit|)."""
    from gspo.causal_lm import CausalLMLogprobs
    from gspo.train.tiny import tiny_model
    from test_prefix_update import P

    model = tiny_model(layers=2, hidden=64).to(device)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(4, 50, (2, P), generator=gen).repeat_interleave(4, dim=0).to(device)
    torch.manual_seed(0)
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                             top_k=0, top_p=1.0, max_new_tokens=8, min_new_tokens=8,
                             output_logits=True, return_dict_in_generate=True,
                             pad_token_id=0)  # fmt: skip
    logits = torch.stack(out.logits, dim=1).float()  # [B, T, V]
    new = out.sequences[:, P:]
    sampler = logits.log_softmax(-1).gather(-1, new[..., None])[..., 0]
    engine = CausalLMLogprobs(model, compute_dtype=torch.bfloat16)
    with torch.no_grad():
        trainer = engine(out.sequences, torch.ones_like(out.sequences), prompt_len=P)[:, P - 1 :]
    return float((sampler - trainer).abs().max()), float(logits.abs().max())


def test_bf16_sampler_trainer_mismatch_is_bf16_rounding():
    """Both are the same bf16 model, computed in different orders (a KV cache one token at a
    time; one packed pass): they differ by rounding only, within check_bf16_step's bound
    32 u max|logit|, and they do differ (bf16 ran)."""
    mismatch, zmax = sampler_trainer_mismatch("cuda")
    assert 0 < mismatch <= 32 * BF16_U * zmax


def fsdp_vs_single(device: str) -> float:
    """One bf16 update under FSDP2 on a one-rank process group (nccl on CUDA, gloo on CPU)
    against the same update without it: the largest parameter difference over the largest
    parameter move."""
    import os

    import torch.distributed as dist

    from gspo.causal_lm import CausalLMLogprobs
    from gspo.train import distributed as dd
    from gspo.train.config import TrainConfig
    from gspo.train.tiny import tiny_model
    from gspo.train.update import update
    from test_prefix_distributed import free_port
    from test_prefix_update import B, grouped_rollout

    config = TrainConfig(prompts_per_step=3, group_size=4, minibatches=1, lr=1e-2, dtype="bf16",
                         old_logprobs="trainer", fsdp=True)  # fmt: skip
    start = tiny_model(layers=2, hidden=64).state_dict()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    try:
        results = []
        for fsdp in (False, True):
            model = tiny_model(layers=2, hidden=64).to(device)
            world = dd.World(rank=0, size=1, local_rank=0, device=torch.device(device))
            engine = dd.wrap(CausalLMLogprobs(model, compute_dtype=torch.bfloat16), world,
                             fsdp=fsdp)  # fmt: skip
            # SGD: the move is the gradient (AdamW's first step is its sign, which rounding
            # flips for the near-zero entries)
            optimizer = torch.optim.SGD(list(engine.parameters()), lr=config.lr)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
            adv = torch.linspace(-1.0, 1.0, B, device=device)
            update(engine, None, optimizer, scheduler, on(device, grouped_rollout()), adv,
                   config=config)  # fmt: skip
            results.append({k: v.float().cpu() for k, v in dd.full_state_dict(model, world).items()})
    finally:
        dist.destroy_process_group()
    moved = max((results[0][k] - start[k]).abs().max() for k in results[0])
    return float(max((results[0][k] - results[1][k]).abs().max() for k in results[0]) / moved)


def test_fsdp2_on_one_gpu_takes_the_single_process_step():
    """FSDP2's bf16 copies of the fp32 shards compute what autocast computes: one SGD step's
    parameter moves agree to bf16 rounding of the gradient (32 u, check_bf16_step's bound)."""
    assert 0 <= fsdp_vs_single("cuda") < 32 * BF16_U


def checkpointing_vs_plain(device: str) -> float:
    """bf16 shared-prefix + fused-loss gradients with and without gradient checkpointing:
    the recompute runs the same kernels on the same inputs, so they agree exactly."""
    from gspo.causal_lm import CausalLMLogprobs
    from gspo.train.config import TrainConfig
    from gspo.train.models import enable_grad_checkpointing
    from gspo.train.tiny import tiny_model
    from gspo.train.update import minibatch_loss
    from test_prefix_update import B, grouped_rollout

    rollout = on(device, grouped_rollout())
    config = TrainConfig(prompts_per_step=3, group_size=4, dtype="bf16", old_logprobs="trainer")
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(layers=2, hidden=64).to(device).train()
        if checkpointing:
            enable_grad_checkpointing(model)
        engine = CausalLMLogprobs(model, compute_dtype=torch.bfloat16)
        logp_old = torch.zeros(rollout.response_mask.shape, device=device) - 3.0
        loss, _ = minibatch_loss(engine, rollout, logp_old=logp_old,
                                 adv=torch.linspace(-1.0, 1.0, B, device=device),
                                 ref_logp=None, config=config, world_size=1)  # fmt: skip
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return float((grads[0] - grads[1]).abs().max() / grads[0].abs().max())


def test_grad_checkpointing_bf16_gives_the_same_gradients():
    assert checkpointing_vs_plain("cuda") < 1e-6


def rows_vs_dense(device: str, dtype: torch.dtype) -> float:
    """The maskless shared-prefix attention (gspo.prefix_attention) against the dense block
    mask on this device: the largest log-prob and gradient difference."""
    from gspo.train.tiny import tiny_model
    from test_prefix import P, batch

    model = tiny_model(layers=2, hidden=64).to(device=device, dtype=dtype)
    ids, mask, target = (x.to(device) for x in batch())
    from gspo.causal_lm import CausalLMLogprobs

    out = []
    for attention in ("dense", "rows"):
        logp = CausalLMLogprobs(model, prefix_attention=attention)(
            ids, mask, target_mask=target, prompt_len=P)
        grads = torch.autograd.grad(logp.sum(), list(model.parameters()))
        out.append(torch.cat([logp.flatten().detach(), *(g.flatten() for g in grads)]))
    return float((out[0] - out[1]).abs().max())


def test_maskless_prefix_attention_on_cuda_equals_the_dense_mask():
    """float64 (the math kernel) to 1e-10; float32 (CUDA's flash / memory-efficient kernels
    for the rows, the masked kernel for the dense mask: different summation orders) to 1e-4."""
    assert rows_vs_dense("cuda", torch.float64) < 1e-10
    assert rows_vs_dense("cuda", torch.float32) < 1e-4
