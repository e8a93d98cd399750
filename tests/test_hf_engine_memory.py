"""The HF engine's memory (issue 16, item 4): it holds one step's [B, V] scores at most,
never the T x B x V that ``generate(output_scores=True)`` keeps, and generating in batches
of ``--generation-batch-size`` rows samples from the distribution the trainer's log-probs
describe.

How "holds" is measured: a forward hook on the model counts the float32 tensors of shape
[B, V] that are alive (``gc.get_objects``) at each decoding step. Generate itself has a few
per step (the step's logits copy, the processed scores, the probabilities); kept scores add
one per step, so with ``output_scores`` the count grows by one a step (measured before the
fix: 3 at step 2, 13 at step 12), while the recorder keeps it flat (3 at every step).
"""

from __future__ import annotations

import gc

import torch

from gspo.causal_lm import CausalLMLogprobs
from gspo.train.config import SamplingConfig
from gspo.train.engines.hf import HFEngine, generate
from gspo.train.tasks.digitsum import digitsum_prompts
from gspo.train.tiny import tiny_model, tiny_tokenizer
from gspo.train.update import response_logprobs

STEPS = 12


def _alive(shape: tuple[int, int]) -> int:
    return sum(1 for obj in gc.get_objects()
               if type(obj) is torch.Tensor and obj.dtype == torch.float32
               and tuple(obj.shape) == shape)  # fmt: skip


def test_generate_holds_one_steps_scores_at_most():
    model, tok = tiny_model(layers=1, hidden=32, seed=0), tiny_tokenizer()
    prompts = digitsum_prompts(3, seed=0)
    B, V = 3 * 2, model.config.vocab_size
    counts = []
    hook = model.register_forward_hook(lambda *_: counts.append(_alive((B, V))))
    try:
        torch.manual_seed(0)
        r = generate(model, tok, prompts, group_size=2, max_new_tokens=STEPS, temperature=0.7)
    finally:
        hook.remove()
    assert len(counts) == STEPS  # one forward per new token (prefill included)
    assert r.logp_sampler is not None and r.logp_sampler.shape[0] == B
    # kept scores: counts[-1] - counts[1] == STEPS - 2 (= 10)
    assert counts[-1] <= counts[1], counts


def test_batched_generation_logprobs_equal_the_trainers():
    """12 rows in calls of 5, 5 and 2 (a group of 3 split across calls): every sampled
    token's log-prob equals the trainer's forward (CausalLMLogprobs) to float32 rounding,
    and the groups stay contiguous rows of their prompt."""
    model, tok = tiny_model(layers=2, hidden=64, seed=1), tiny_tokenizer()
    prompts = digitsum_prompts(4, seed=3)
    sampling = SamplingConfig(temperature=0.7, max_new_tokens=6, generation_batch_size=5)
    torch.manual_seed(0)
    r = HFEngine(model, tok, sampling).sample(prompts, group_size=3, greedy=False)
    assert len(r) == 12 and r.prompts == [p for p in prompts for _ in range(3)]
    with torch.no_grad():
        logp, _ = response_logprobs(CausalLMLogprobs(model), r, temperature=0.7)
    mask = r.response_mask
    assert mask.sum() > 12  # responses of more than one token
    diff = torch.where(mask, logp - r.logp_sampler, 0.0).abs().max()
    assert diff < 2e-5, diff  # a wrong row, token or temperature: > 1e-2


def test_default_batch_is_one_call_and_bit_identical_to_generate():
    """generation_batch_size 0 = every row in one generate call: the same samples and
    log-probs as generate() itself under the same seed (the trainer's default run)."""
    model, tok = tiny_model(layers=1, hidden=32, seed=0), tiny_tokenizer()
    prompts = digitsum_prompts(5, seed=1)
    torch.manual_seed(7)
    direct = generate(model, tok, prompts, group_size=4, max_new_tokens=5, top_p=0.9)
    torch.manual_seed(7)
    sampling = SamplingConfig(max_new_tokens=5, top_p=0.9)
    engine = HFEngine(model, tok, sampling).sample(prompts, group_size=4, greedy=False)
    assert torch.equal(direct.input_ids, engine.input_ids)
    assert torch.equal(direct.logp_sampler, engine.logp_sampler)


def test_eval_batch_size_is_an_alias_of_generation_batch_size():
    from gspo.train.evaluate import parse_config

    default = parse_config(["--engine", "hf"])  # 0: 32 sequences a call on hf, 128 on vllm
    assert default.sampling.generation_batch_size == 0 and default.sequences_per_call == 32
    assert parse_config(["--engine", "vllm"]).sequences_per_call == 128
    assert parse_config(["--batch-size", "7"]).sampling.generation_batch_size == 7
    assert parse_config(["--generation-batch-size", "5"]).batch_size == 5
    assert parse_config(["--batch-size", "7"]).sequences_per_call == 7


def test_a_batch_size_vllm_would_ignore_is_refused():
    import pytest

    from gspo.train.config import TrainConfig

    TrainConfig(generation_batch_size=8)  # hf: generates 8 rows at a time
    with pytest.raises(ValueError, match="generation-batch-size .* schedules its own"):
        TrainConfig(rollout="vllm", generation_batch_size=8)
    with pytest.raises(ValueError, match="use >= 0"):
        TrainConfig(generation_batch_size=-1)
