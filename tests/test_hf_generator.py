"""The HF engine's seeded batches (the --async-rollouts sampler thread's) draw from a
torch.Generator of their own: the trainer's process-wide RNG, and the checkpoint that saves
it, depend on nothing the sampler draws, and a batch on nothing drawn before it. Tokens are
drawn by the Gumbel-max rule, which must sample exactly softmax(scores)."""

from __future__ import annotations

import torch

from gspo.train.engines.hf import HFEngine, _gumbel_argmax
from gspo.train.tiny import tiny_model, tiny_tokenizer
from test_engines import CONFIG, PROMPTS, max_diff, tolerance, trainer_logp


def engine(seed: int = 5) -> HFEngine:
    model = tiny_model(layers=2, hidden=128, seed=0)
    return HFEngine(model, tiny_tokenizer(), CONFIG.sampling).detach(seed=seed)


def test_a_seeded_batch_leaves_the_process_rng_alone_and_repeats():
    sampler = engine()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = sampler.sample(PROMPTS, group_size=4, greedy=False, seed=7)
    # it re-seeded the process-wide RNG with (engine seed, step) before
    assert torch.equal(torch.get_rng_state(), before)
    torch.rand(1000)  # the trainer's thread draws between two batches
    b = sampler.sample(PROMPTS, group_size=4, greedy=False, seed=7)
    c = sampler.sample(PROMPTS, group_size=4, greedy=False, seed=8)
    assert a.completions == b.completions and torch.equal(a.input_ids, b.input_ids)
    assert c.completions != a.completions
    assert len(set(a.completions)) > 4  # sampled, not greedy


def test_seeded_log_probs_are_the_trainers():
    sampler = engine()
    r = sampler.sample(PROMPTS, group_size=4, greedy=False, seed=3)
    assert max_diff(trainer_logp(sampler.model, r), r.logp_sampler, r.response_mask) <= \
        tolerance(sampler.model, r)


def test_gumbel_argmax_draws_softmax_and_keeps_the_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    scores = probs.log().expand(40_000, 5)  # the last is -inf, as top-p leaves it
    generator = torch.Generator().manual_seed(0)
    drawn = _gumbel_argmax(generator, None, scores).argmax(dim=-1)
    freq = torch.bincount(drawn, minlength=5).double() / len(drawn)
    # binomial standard error at 40,000 draws is <= 0.0025; 4 of them
    assert torch.allclose(freq, probs.double(), atol=0.01), freq
    assert freq[4] == 0
