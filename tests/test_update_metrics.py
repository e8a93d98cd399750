"""Step metrics do not depend on how the step is cut into micro-batches (issue 16, item
11): with --rollout-correction token-tis the advantages are per token [B, T], and their
padded slots must not enter adv_mean / adv_std / zero_adv_frac."""

from __future__ import annotations

import pytest
import torch

from gspo.causal_lm import CausalLMLogprobs
from gspo.train.config import TrainConfig
from gspo.train.update import advantage_metrics, response_logprobs, update
from test_train_update import ragged_batch

KEYS = ("adv_mean", "adv_std", "zero_adv_frac")


def test_per_token_advantage_metrics_ignore_padding_by_hand():
    """Row 0: 2 tokens of 1.0 and a padded slot holding NaN; row 1: 1 token of -1.0 and two
    pads of 7. Over the 3 tokens: mean 1/3, std sqrt(8/9), no zero. Taking the whole [2, 3]
    instead gives NaN (or, with finite pads, mean 2.5)."""
    adv = torch.tensor([[1.0, 1.0, float("nan")], [-1.0, 7.0, 7.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    got = advantage_metrics(adv, mask)
    assert float(got["adv_mean"]) == pytest.approx(1 / 3)
    assert float(got["adv_std"]) == pytest.approx((8 / 9) ** 0.5)
    assert float(got["zero_adv_frac"]) == 0.0


@pytest.mark.parametrize("budget", [5, 13, 20])
def test_token_tis_advantage_metrics_do_not_change_with_microbatches(budget):
    """8 ragged sequences (responses of different lengths), sampler log-probs off the
    trainer's so token-tis weighs every token: the adv_* metrics with micro-batches equal
    the unsplit ones (measured before the fix, budget 5: adv_mean 0.0677 vs 0.1743)."""
    results = []
    for b in (0, budget):
        config = TrainConfig(minibatches=1, loss="grpo", rollout_correction="token-tis",
                             max_tokens_per_microbatch=b)  # fmt: skip
        model, rollout, adv = ragged_batch()
        noise = torch.randn(rollout.response_mask.shape, dtype=torch.float64,
                            generator=torch.Generator().manual_seed(0))  # fmt: skip
        engine = CausalLMLogprobs(model)
        with torch.no_grad():
            logp, _ = response_logprobs(engine, rollout, temperature=1.0)
        rollout.logp_sampler = torch.where(rollout.response_mask, logp + 0.3 * noise, 0.0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        (metrics,) = update(engine, None, optimizer, scheduler, rollout, adv, config=config)
        results.append(metrics)
    whole, split = results
    assert whole["mismatch_max_abs"] > 0.1  # token-tis weights exp(delta) are not all 1
    for key in KEYS:
        assert split[key] == pytest.approx(whole[key], rel=1e-9, abs=1e-12), key
