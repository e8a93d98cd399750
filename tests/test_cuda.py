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
