"""The update step: it moves the policy the way the advantage says, micro-batches by token
budget give the whole-minibatch update, gradient checkpointing and bf16 change nothing they
should not."""

from __future__ import annotations

import pytest
import torch

from gspo.causal_lm import CausalLMLogprobs
from gspo.train.config import TrainConfig
from gspo.train.models import enable_grad_checkpointing
from gspo.train.rollout import Rollout
from gspo.train.tiny import tiny_model
from gspo.train.update import (
    minibatch_loss,
    response_logprobs,
    update,
)

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


# ---------------------------------------------------------------- micro-batches


PADS = [0, 2, 1, 3, 0, 0, 2, 1]  # left padding of each prompt (P = 4)
LENGTHS = [5, 1, 3, 2, 4, 5, 1, 2]  # response lengths (T = 5)


def ragged_batch(dtype=torch.float64):
    model = tiny_model(layers=1, hidden=32, seed=0).to(dtype)
    ids = torch.randint(4, 50, (8, P + T), generator=torch.Generator().manual_seed(2))
    adv = torch.tensor([1.0, -0.5, 0.3, -0.8, 0.9, -1.2, 0.1, 0.4], dtype=dtype)
    return model, rollout_of(ids, LENGTHS, PADS), adv


@pytest.mark.parametrize("budget", [0, 5, 9, 13, 20, 1000], ids=lambda b: f"budget={b}")
def test_microbatches_by_token_budget_give_the_whole_minibatch_update(budget):
    """float64, 2 minibatches of 4 ragged sequences (36 padded tokens each), KL on, clipping
    on: the parameters after update() agree to 1e-6 with the unsplit update, for budgets below
    one sequence (5: every row alone), dividing (9, 20) and not dividing (13) the batch.
    Dividing each piece's loss by its own sequence count instead is off by 2-4x."""
    from gspo.train.microbatch import cost, plan

    config = TrainConfig(minibatches=2, lr=1e-2, max_grad_norm=0.5, kl_coef=0.1,
                         max_tokens_per_microbatch=budget)  # fmt: skip
    whole = TrainConfig(minibatches=2, lr=1e-2, max_grad_norm=0.5, kl_coef=0.1)
    results = []
    for cfg in (whole, config):
        model, rollout, adv = ragged_batch()
        ref = CausalLMLogprobs(tiny_model(layers=1, hidden=32, seed=1).double())
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        history = update(CausalLMLogprobs(model), ref, optimizer, scheduler, rollout, adv,
                         config=cfg)  # fmt: skip
        results.append((model.state_dict(), history))
    (want, want_hist), (got, got_hist) = results
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6, msg=name)
    start = tiny_model(layers=1, hidden=32, seed=0).double().state_dict()
    assert (want["lm_head.weight"] - start["lm_head.weight"]).abs().max() > 1e-3  # it moved
    for a, b in zip(got_hist, want_hist, strict=True):
        for key in ("loss", "grad_norm", "ratio_min", "ratio_max", "kl_ref", "entropy",
                    "adv_std", "clip_frac_low", "clip_frac_high"):  # fmt: skip
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key
    _, rollout, _ = ragged_batch()
    half = rollout.select(slice(0, 4))
    parts = plan(half, budget)
    assert [i for s in parts for i in range(s.start, s.stop)] == [0, 1, 2, 3]
    if budget:
        assert all(cost(half.select(s)) <= budget or s.stop - s.start == 1 for s in parts)
    assert len(parts) == {0: 1, 5: 4, 9: 4, 13: 3, 20: 2, 1000: 1}[budget]


def test_plan_splits_further_to_match_other_ranks():
    from gspo.train.microbatch import plan

    _, rollout, _ = ragged_batch()
    parts = plan(rollout, 1000, count=5)
    assert len(parts) == 5 and all(s.stop > s.start for s in parts)
    assert [i for s in parts for i in range(s.start, s.stop)] == list(range(8))
    with pytest.raises(ValueError, match="count"):
        plan(rollout, 1000, count=9)


# ---------------------------------------------------------------- gradient checkpointing


def checkpointing_grads(build, config, layer_of) -> tuple[list[dict], list[int]]:
    """One minibatch loss's gradients of ``build()``'s (model, rollout, adv) without and
    with gradient checkpointing, and how often ``layer_of(model)`` ran forward in the
    loss's forward + backward (1, then 2 when it is recomputed)."""
    grads, calls = [], []
    for checkpointing in (False, True):
        model, rollout, adv = build(checkpointing)
        count = [0]
        # a pre-hook: the recompute stops early, once the last saved tensor it needs is back
        layer_of(model).register_forward_pre_hook(
            lambda *_, count=count: count.__setitem__(0, count[0] + 1))  # fmt: skip
        engine = CausalLMLogprobs(model)
        with torch.no_grad():
            logp_old, _ = response_logprobs(engine, rollout, temperature=1.0)
        count[0] = 0
        loss, _ = minibatch_loss(engine, rollout, logp_old=logp_old - 0.01, adv=adv,
                                 ref_logp=None, config=config, world_size=1)  # fmt: skip
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                      if p.requires_grad})  # fmt: skip
        calls.append(count[0])
    return grads, calls


def assert_same_grads(grads: list[dict]) -> None:
    for name, g in grads[0].items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], g, rtol=0, atol=1e-12, msg=name)


def test_grad_checkpointing_gives_the_same_gradients():
    """HF gradient checkpointing (non-reentrant) recomputes each decoder layer in the
    backward: same gradients to float64 rounding, and each layer's forward runs twice."""

    def build(checkpointing):
        model, rollout, adv = ragged_batch()
        model.train()
        if checkpointing:
            enable_grad_checkpointing(model)
        return model, rollout, adv

    grads, calls = checkpointing_grads(build, TrainConfig(), lambda m: m.model.layers[0].mlp)
    assert calls == [1, 2]
    assert_same_grads(grads)


def test_grad_checkpointing_without_dropout_computes_the_eval_mode_model():
    """The trainer runs with dropout off (eval mode); transformers checkpoints only in train
    mode, so checkpointing keeps the model in eval mode and makes its layers checkpoint
    there too: a GPT-2 with dropout 0.3 then gives its eval-mode log-probs, and still
    recomputes its blocks."""
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=64,
        n_positions=16,
        n_embd=32,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.3,
        embd_pdrop=0.3,
        attn_pdrop=0.3,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 64, (2, 8))
    mask = torch.ones_like(ids)
    want = CausalLMLogprobs(model)(ids, mask)
    enable_grad_checkpointing(model, keep_dropout=False)
    assert not any(m.training for m in model.modules())
    count = [0]
    model.transformer.h[0].mlp.register_forward_pre_hook(
        lambda *a: count.__setitem__(0, count[0] + 1)
    )
    got = CausalLMLogprobs(model)(ids, mask)
    got.sum().backward()
    assert count[0] == 2  # forward, and the recompute in the backward
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- bf16


def bf16_vs_fp32_step(device="cpu"):
    """Loss, per-token logp and flat gradient of one minibatch in fp32 and in bf16 compute."""
    from gspo.train.models import COMPUTE_DTYPES
    from gspo.train.update import minibatch_loss

    out = {}
    for name in ("fp32", "bf16"):
        model, rollout, adv = ragged_batch(torch.float32)
        model.to(device)
        rollout = Rollout(**{**vars(rollout), **{k: getattr(rollout, k).to(device) for k in
                             ("input_ids", "attention_mask", "response_mask")}})  # fmt: skip
        adv = adv.float().to(device)
        engine = CausalLMLogprobs(model, compute_dtype=COMPUTE_DTYPES[name])
        with torch.no_grad():
            exact, _ = response_logprobs(CausalLMLogprobs(model), rollout, temperature=1.0)
            logp, _ = response_logprobs(engine, rollout, temperature=1.0)
            zmax = (
                model(rollout.input_ids, attention_mask=rollout.attention_mask).logits.abs().max()
            )
        loss, _ = minibatch_loss(engine, rollout, logp_old=exact - 0.002, adv=adv, ref_logp=None,
                                 config=TrainConfig(), world_size=1)  # fmt: skip
        loss.backward()
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32
                   for p in model.parameters())  # fp32 master weights and gradients  # fmt: skip
        grad = torch.cat([p.grad.flatten() for p in model.parameters()])
        out[name] = (loss.detach(), logp, grad, float(zmax), adv)
    return out


def check_bf16_step(out):
    """The bounds, derived from bf16's unit roundoff u = 2**-8 (8 significant bits):

    - logp: the path to a logit rounds its operands to bf16 in 8 matmuls (q, k, v, o,
      gate, up, down, head: one layer), two operands each: 16 roundings of relative size u,
      so |d logit| <= 16 u max|logit| and |d logp| = |d z_y - d lse| <= 32 u max|logit|.
    - loss = -mean_i r_i A_i with r_i = exp(mean_t(logp - logp_old)) (fp32 arithmetic on
      the bf16 log-probs): |d loss| <= max|A| max r max_t |d logp|, with the measured d logp.
    - gradient: the backward repeats the 16 roundings: normwise relative error <= 32 u.
    Measured on CPU: d logp ~7e-4 (max|logit| 0.8), d loss ~6e-5, gradient 0.3%: the
    worst-case bounds are loose, but catch a gradient off by a factor or a sign (>= 100%),
    bf16 weights, gradients or log-probs (dtype checks), and bf16 not running at all (a
    difference of exactly 0).
    """
    u = 2.0**-8
    loss32, logp32, g32, zmax, adv = out["fp32"]
    loss16, logp16, g16, _, _ = out["bf16"]
    assert logp16.dtype == torch.float32 and loss16.dtype == torch.float32
    dlogp = (logp16 - logp32).abs().max()
    assert dlogp <= 32 * u * zmax
    ratio_max = float(torch.exp(0.002 + dlogp))  # logp_old = fp32 logp - 0.002
    assert (loss16 - loss32).abs() <= adv.abs().max() * ratio_max * dlogp + 1e-7
    assert (g16 - g32).norm() <= 32 * u * g32.norm()
    assert dlogp > 0 and (g16 - g32).norm() > 0  # bf16 did run


def test_bf16_step_is_within_the_rounding_bound_of_fp32():
    check_bf16_step(bf16_vs_fp32_step())
