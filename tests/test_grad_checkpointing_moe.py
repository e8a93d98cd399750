"""--grad-checkpointing keeps the policy's forward identical to the sampler's (issue 16,
item 6). transformers checkpoints only in training mode, and training mode also turns on
Mixtral's router jitter (``router_jitter_noise``: the router's input times uniform noise
in [1 - j, 1 + j]). The trap: a tiny Mixtral built here with j = 0.5. The first minibatch of
an update is on-policy, so its ratio must be exactly 1; with the jitter on in the loss's
forward it is not (measured before the fix: ratio_min 0.9969, ratio_max 1.0024 on this
batch, next to a clip range of [0.997, 1.004]), and that noise, not the policy's change,
is what the clip then cuts.
"""

from __future__ import annotations

import pytest
import torch

from gspo.causal_lm import CausalLMLogprobs
from gspo.train import models
from gspo.train.config import TrainConfig
from gspo.train.engines.hf import generate
from gspo.train.tasks.digitsum import digitsum_prompts
from gspo.train.tiny import tiny_tokenizer
from gspo.train.update import update


def tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    tok = tiny_tokenizer()
    config = MixtralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.5,
                           max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return MixtralForCausalLM(config), tok


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_on_policy_ratio_is_exactly_one(checkpointing):
    config = TrainConfig(grad_checkpointing=checkpointing, minibatches=1, prompts_per_step=4,
                         group_size=4, max_new_tokens=5, lr=1e-3)  # fmt: skip
    model, tok = tiny_mixtral()
    policy = models.Policy(model, tok, config.optim, None)
    policy.prepare(torch.device("cpu"))
    torch.manual_seed(0)
    rollout = generate(model, tok, digitsum_prompts(4, seed=0), group_size=4, max_new_tokens=5)
    adv = torch.linspace(-1, 1, len(rollout))
    engine = CausalLMLogprobs(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    count = [0]
    model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda *_: count.__setitem__(0, count[0] + 1))  # fmt: skip
    (first,) = update(engine, None, optimizer, scheduler, rollout, adv, config=config)
    assert (first["ratio_min"], first["ratio_max"]) == (1.0, 1.0)
    assert first["clip_frac_low"] == first["clip_frac_high"] == 0.0
    # old log-probs' forward, the loss's, and (checkpointing) the recompute in the backward
    assert count[0] == (3 if checkpointing else 2)


def test_checkpointing_gives_the_same_gradients_in_eval_mode():
    """Checkpointed and plain backward give the same gradients (float32: the MoE's grouped
    matmul has no float64 kernel; the recompute repeats the same ops, so to rounding)."""
    grads = []
    for checkpointing in (False, True):
        model, _ = tiny_mixtral()
        model.eval()
        if checkpointing:
            models.enable_grad_checkpointing(model, keep_dropout=False)
        ids = torch.randint(3, 40, (3, 9), generator=torch.Generator().manual_seed(1))
        logp = CausalLMLogprobs(model)(ids, torch.ones_like(ids))
        (logp * torch.linspace(-1, 1, 8)).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_keep_dropout_trains_in_train_mode():
    """--keep-dropout is the opt-in to training mode: the model trains in it (jitter on)."""
    model, _ = tiny_mixtral()
    models.enable_grad_checkpointing(model.eval(), keep_dropout=True)
    assert all(m.training for m in model.modules())
