"""Rollout engines: both sample from exactly the distribution the trainer's log-probs
describe, and vLLM follows the policy after an update.

The trap: a tiny model whose saved generation_config.json sets repetition_penalty=1.3,
top_k=5 and no_repeat_ngram_size=2, lists two EOS ids, and whose attention dropout is 0.5
while the policy is in train mode. An engine that inherits any of it, or samples / scores
with dropout on, gives log-probs that differ from the trainer's by far more than the
float32 tolerance (measured: >= 1e-2; the tolerance is ~1e-5).

One vLLM engine serves the whole module (it takes ~10 s to start on 2 cores).
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

from gspo.causal_lm import CausalLMLogprobs
from gspo.train import checkpoint as ckpt
from gspo.train import distributed as dd
from gspo.train import engines, models
from gspo.train.config import TrainConfig
from gspo.train.engines.hf import HFEngine
from gspo.train.models import load as load_model_and_tokenizer
from gspo.train.rollout import assemble, encode_prompts, eos_ids, stop_reason
from gspo.train.tasks.digitsum import digitsum_prompts
from gspo.train.tiny import tiny_model, tiny_tokenizer
from gspo.train.update import lr_lambda, old_logprobs, response_logprobs, update

# tiny_hidden 128: 4 heads of 32; vLLM's CPU attention has no kernel for head size 8 or 16.
CONFIG = TrainConfig(temperature=0.7, max_new_tokens=8, prompts_per_step=4, group_size=4,
                     minibatches=1, tiny_hidden=128)  # fmt: skip
PROMPTS = digitsum_prompts(4, seed=0)


def build(config, model, tok, world):
    """The engine ``config.rollout`` names, for ``model`` trained whole on this rank."""
    policy = models.Policy(model, tok, config.optim, None)
    return engines.build(config.sampling, policy, world, None, seed=config.seed)


@pytest.fixture(scope="module")
def trap(tmp_path_factory):
    """(model, tokenizer) loaded from a directory whose generation config must be ignored."""
    path = tmp_path_factory.mktemp("trap")
    model, tok = tiny_model(layers=2, hidden=128, seed=0), tiny_tokenizer()
    colon = tok.convert_tokens_to_ids(":")  # the untrained model's favourite token
    model.config.attention_dropout = 0.5
    model.generation_config.update(do_sample=True, repetition_penalty=1.3, top_k=5,
                                   no_repeat_ngram_size=2, eos_token_id=[2, colon])  # fmt: skip
    model.save_pretrained(path)
    tok.save_pretrained(path)
    model, tok = load_model_and_tokenizer(str(path), layers=0, hidden=0, seed=0)
    gc = model.generation_config
    assert (gc.repetition_penalty, gc.top_k, gc.no_repeat_ngram_size) == (1.3, 5, 2)
    assert eos_ids(model, tok) == [2, colon]
    return model.train(), tok  # train mode: dropout would be on if nothing turned it off


@pytest.fixture(scope="module")
def vllm_engine(trap):
    model, tok = trap
    random.seed(1)
    torch.manual_seed(1)
    rng, threads = ckpt.rng_state(), torch.get_num_threads()
    engine = build(dataclasses_replace(rollout="vllm"), model, tok, dd.World())
    # vLLM re-seeds the global RNGs and pins torch's threads when it starts; in process
    # those are the trainer's, so the engine must hand them back untouched.
    assert torch.equal(torch.get_rng_state(), rng["torch"]) and random.getstate() == rng["python"]
    assert torch.get_num_threads() == threads
    yield engine
    engine.close()


def dataclasses_replace(**change) -> TrainConfig:
    import dataclasses

    return dataclasses.replace(CONFIG, **change)


def trainer_logp(model, rollout):
    """The trainer's old log-probs, as update() computes them (eval mode inside)."""
    with torch.no_grad():
        logp, _, _ = old_logprobs(CausalLMLogprobs(model), rollout, torch.zeros(len(rollout)),
                                  CONFIG)  # fmt: skip
    return logp


def tolerance(model, rollout) -> float:
    """16x the float32 rounding of the trainer's own log-probs on this batch (float32 vs
    float64 forward), floored at 1e-6. Two float32 engines differ by their kernels' rounding
    (KV cache vs full sequence, vLLM's attention vs SDPA), which is of that order; a
    repetition penalty, top-k, dropout or stale weights move log-probs by >= 1e-2."""
    m64 = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        lp32, _ = response_logprobs(CausalLMLogprobs(model.eval()), rollout, temperature=0.7)
        lp64, _ = response_logprobs(CausalLMLogprobs(m64), rollout, temperature=0.7)
    model.train()
    scale = (lp32.double() - lp64)[rollout.response_mask].abs().max().item()
    return max(16 * scale, 1e-6)


def max_diff(a, b, mask) -> float:
    return (a - b)[mask].abs().max().item()


def test_hf_logp_samplerrobs_are_the_trainers_old_logprobs(trap):
    model, tok = trap
    torch.manual_seed(0)
    r = HFEngine(model, tok, CONFIG.sampling).sample(PROMPTS, group_size=4, greedy=False)
    assert model.training  # handed back in the mode it came in
    tol = tolerance(model, r)
    assert max_diff(trainer_logp(model, r), r.logp_sampler, r.response_mask) <= tol
    assert tol < 1e-4  # the bound is float32 rounding, not slack


def test_vllm_logp_samplerrobs_are_the_trainers_old_logprobs(trap, vllm_engine):
    model, _ = trap
    r = vllm_engine.sample(PROMPTS, group_size=4, greedy=False)
    assert len(r) == 16 and r.logp_sampler.shape == r.response_mask.shape
    assert torch.all(r.logp_sampler[~r.response_mask] == 0)
    assert torch.all(r.logp_sampler[r.response_mask] < 0)
    tol = tolerance(model, r)
    assert max_diff(trainer_logp(model, r), r.logp_sampler, r.response_mask) <= tol


def test_both_engines_stop_at_every_eos_and_agree_greedily(trap, vllm_engine):
    """The same prompt ids, the same greedy tokens, the same masks: ':' is the model's second
    EOS id, so a response that starts with ':' is that one token (kept, masked in)."""
    model, tok = trap
    a = HFEngine(model, tok, CONFIG.sampling).sample(PROMPTS, group_size=1, greedy=True)
    b = vllm_engine.sample(PROMPTS, group_size=1, greedy=True)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.response_mask, b.response_mask)
    assert a.completions == b.completions
    colon = tok.convert_tokens_to_ids(":")
    first = b.input_ids[:, b.prompt_len]
    stopped = first == colon
    assert stopped.any(), "the test needs a response that hits the second EOS id"
    assert torch.all(b.response_mask[stopped].sum(dim=1) == 1)


def test_vllm_follows_the_policy_after_an_update(trap, vllm_engine):
    """After an optimizer step and load_weights, the engine's log-probs are the updated
    model's. Without the sync they are not (the stale-weight bug this test catches)."""
    model, tok = trap
    policy = copy.deepcopy(model)
    r = vllm_engine.sample(PROMPTS, group_size=4, greedy=False)
    config = dataclasses_replace(lr=1e-2, warmup_steps=0)
    lp = CausalLMLogprobs(policy)
    opt = torch.optim.AdamW(policy.parameters(), lr=config.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(0, 1, 1.0))
    adv = torch.linspace(-1, 1, len(r))
    update(lp, None, opt, sched, r, adv, config=config)
    try:
        stale = vllm_engine.sample(PROMPTS, group_size=4, greedy=False)
        tol = tolerance(policy, stale)
        assert max_diff(trainer_logp(policy, stale), stale.logp_sampler,
                        stale.response_mask) > 100 * tol  # fmt: skip
        vllm_engine.load_weights(dd.full_params(policy))
        fresh = vllm_engine.sample(PROMPTS, group_size=4, greedy=False)
        tol = tolerance(policy, fresh)
        assert max_diff(trainer_logp(policy, fresh), fresh.logp_sampler,
                        fresh.response_mask) <= tol  # fmt: skip
    finally:
        vllm_engine.load_weights(dd.full_params(model))  # the module's engine: back to `trap`


def test_prompts_keep_bos_unless_a_chat_template_writes_it():
    from tokenizers import processors

    tok = tiny_tokenizer()
    assert encode_prompts(tok, [{"prompt": "ab"}]) == [tok("ab")["input_ids"]]
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)]
    )
    a, b = tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b")
    assert encode_prompts(tok, [{"prompt": "ab"}]) == [[tok.bos_token_id, a, b]]
    tok.chat_template = "{% for m in messages %}<s>{{ m.content }}{% endfor %}"
    # the template writes its own <s>; a second one from the tokenizer would be a bug
    assert encode_prompts(tok, [{"prompt": "ab"}]) == [[tok.bos_token_id, a, b]]


def test_assemble_masks_after_any_eos_and_pads():
    tok = tiny_tokenizer()
    r = assemble(tok, [{"prompt": "x"}] * 3, [[5], [6, 7], [8]],
                 [[9, 4, 9], [9, 9], [2]], [[-1.0, -2.0, -3.0], [-1.0, -1.5], [-0.5]],
                 eos=[2, 4])  # fmt: skip
    assert r.prompt_len == 2 and r.input_ids[0, :2].tolist() == [tok.pad_token_id, 5]
    assert r.response_mask.tolist() == [[True, True, False], [True, True, False],
                                         [True, False, False]]  # fmt: skip
    assert r.logp_sampler.tolist() == [[-1.0, -2.0, 0.0], [-1.0, -1.5, 0.0], [-0.5, 0.0, 0.0]]
    assert r.input_ids[0, 4].item() == tok.pad_token_id  # after EOS: pad
    assert r.completions[0] == tok.decode([9])


def test_both_engines_continue_ids_with_one_primitive(trap, vllm_engine):
    """``continue_ids``: n continuations per sequence, contiguous; the greedy ones of both
    engines agree token for token, and each says why it stopped: ':' (an EOS id) ends a
    reply as "eos", 8 tokens without one are "max_new_tokens"; sampled ones carry one
    sampler log-prob per token, and a seeded batch repeats."""
    model, tok = trap
    ids = encode_prompts(tok, PROMPTS)
    hf = HFEngine(model, tok, CONFIG.sampling)
    a = hf.continue_ids(ids, n=2, greedy=True)
    b = vllm_engine.continue_ids(ids, n=2, greedy=True)
    assert len(a) == len(b) == 2 * len(ids)
    assert [c.ids for c in a] == [c.ids for c in b] and [c.stop for c in a] == [c.stop for c in b]
    assert all(c.logp is None for c in a + b)
    assert a[0].ids == a[1].ids  # greedy: the n rows of a sequence are alike
    colon = tok.convert_tokens_to_ids(":")
    for c in a:
        assert c.stop == ("eos" if c.ids[-1] in (2, colon) else "max_new_tokens")
        assert c.stop == "eos" or len(c.ids) == CONFIG.max_new_tokens
    assert {c.stop for c in a} == {"eos", "max_new_tokens"}, "the test needs both reasons"
    for engine in (hf, vllm_engine):
        first = engine.continue_ids(ids, n=3, greedy=False, seed=5)
        again = engine.continue_ids(ids, n=3, greedy=False, seed=5)
        assert [c.ids for c in first] == [c.ids for c in again]
        assert all(len(c.logp) == len(c.ids) and max(c.logp) <= 0 for c in first)


def test_stop_reason_tells_positions_from_max_new_tokens():
    """A continuation without EOS that stopped short of --max-new-tokens ran out of the
    model's positions (prompt 120 + 8 = 128 = the limit); a full one is max_new_tokens even
    when it also fills the positions (the limit the user set came first)."""
    assert stop_reason(120, [5] * 8, eos=[2], max_new_tokens=10, max_len=128) == "positions"
    assert stop_reason(118, [5] * 10, eos=[2], max_new_tokens=10, max_len=128) == "max_new_tokens"
    assert stop_reason(100, [5] * 8, eos=[2], max_new_tokens=10, max_len=128) == "max_new_tokens"
    assert stop_reason(120, [5] * 7 + [2], eos=[2], max_new_tokens=10, max_len=128) == "eos"
    assert stop_reason(120, [5] * 8, eos=[2], max_new_tokens=10, max_len=None) == "max_new_tokens"
