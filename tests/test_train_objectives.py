"""`gspo train --loss sapo | cispo | gmpo`: the trainer hands gspo_loss each objective's own
options, an on-policy step moves the log-prob with the advantage, micro-batches give the
whole minibatch's update (CISPO's divisor is the minibatch's token count, not each piece's),
and options that do not apply to a loss are refused at start."""

from __future__ import annotations

import json

import pytest
import torch

from gspo.causal_lm import CausalLMLogprobs
from gspo.train.config import TrainConfig
from gspo.train.tiny import tiny_model
from gspo.train.update import update
from test_train_update import one_update, ragged_batch, rollout_of, sequence_logp

P, T = 4, 5
NEW = ["sapo", "cispo", "gmpo", "dppo-tv", "dppo-kl", "vespo", "luspo"]


@pytest.mark.parametrize("loss", NEW)
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["adv+1", "adv-1"])
def test_one_update_moves_the_log_prob_with_the_advantage(loss, sign):
    """As for gspo (test_train_update): on-policy every objective's gradient is the policy
    gradient's direction, so the sequence's log-prob follows the advantage's sign."""
    model = tiny_model(layers=1, hidden=32, seed=0)
    ids = torch.randint(4, 50, (1, P + T), generator=torch.Generator().manual_seed(1))
    rollout = rollout_of(ids, [T])
    config = TrainConfig(loss=loss, minibatches=1, lr=1e-3, max_grad_norm=1e9)
    before = sequence_logp(CausalLMLogprobs(model), rollout)
    one_update(model, rollout, torch.tensor([sign]), config)
    after = sequence_logp(CausalLMLogprobs(model), rollout)
    assert sign * float(after - before) > 0.01, (float(before), float(after))


@pytest.mark.parametrize("loss", NEW)
@pytest.mark.parametrize("budget", [5, 13])
def test_microbatches_give_the_whole_minibatch_update(loss, budget):
    """float64, 2 minibatches of 4 ragged sequences: parameters after update() agree to 1e-6
    with the unsplit update. For CISPO a piece that divided by its own tokens would weight
    short pieces up (off by up to 5x here)."""
    results = []
    for extra in ({}, {"max_tokens_per_microbatch": budget}):
        model, rollout, adv = ragged_batch()
        config = TrainConfig(loss=loss, minibatches=2, lr=1e-2, max_grad_norm=0.5, **extra)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        history = update(CausalLMLogprobs(model), None, optimizer, scheduler, rollout, adv,
                         config=config)  # fmt: skip
        results.append((model.state_dict(), history))
    (want, want_hist), (got, got_hist) = results
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6, msg=name)
    for a, b in zip(got_hist, want_hist, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-9)
        assert a["ratio_mean"] == pytest.approx(b["ratio_mean"], rel=1e-6)


def test_each_loss_gets_its_own_options():
    from gspo.train.config import TrainConfig

    assert TrainConfig().objective.gspo_loss_options() == {
        "variant": "gspo", "eps_low": 0.003, "eps_high": 0.004}  # fmt: skip
    assert TrainConfig(loss="sapo").objective.gspo_loss_options() == {"variant": "sapo"}
    assert TrainConfig(loss="sapo", tau_neg=2.0).objective.gspo_loss_options() == {
        "variant": "sapo", "tau_neg": 2.0}  # fmt: skip
    assert TrainConfig(loss="cispo", eps_high=0.28).objective.gspo_loss_options() == {
        "variant": "cispo", "eps_high": 0.28}  # fmt: skip
    assert TrainConfig(loss="gmpo").objective.gspo_loss_options() == {"variant": "gmpo"}


@pytest.mark.parametrize("kwargs, field, fix", [
    ({"loss": "sapo", "eps_low": 0.2}, "eps_low", "--loss sapo does not use it"),
    ({"loss": "gspo", "tau_pos": 1.0}, "tau_pos", "it applies to --loss sapo"),
    ({"loss": "gmpo", "rollout_correction": "token-tis"}, "rollout_correction", "per-token"),
    ({"loss": "gspo", "eps_low": 1.5}, "eps_low", "positive ratio"),
])  # fmt: skip
def test_options_that_do_not_apply_are_refused(kwargs, field, fix):
    with pytest.raises(ValueError, match=rf"--{field.replace('_', '-')} / {field} = .*{fix}"):
        TrainConfig(**kwargs)


@pytest.mark.parametrize("loss", NEW)
def test_a_short_run_of_each_loss(loss, tmp_path):
    from gspo.train.cli import main

    run = tmp_path / loss
    assert main(["--loss", loss, "--steps", "2", "--tiny-layers", "1", "--tiny-hidden", "32",
                 "--prompts-per-step", "4", "--group-size", "4", "--minibatches", "2",
                 "--eval-prompts", "4", "--run-dir", str(run), "--no-progress",
                 "--no-plot"]) == 0  # fmt: skip
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    own = {"sapo": "gate_weight_mean", "cispo": "bound_frac_high", "gmpo": "clip_frac",
           "dppo-tv": "mask_frac_high", "dppo-kl": "mask_frac_low", "vespo": "phi_mean",
           "luspo": "clip_frac"}[loss]  # fmt: skip
    assert own in last and all(isinstance(v, float | int) for v in last.values())


@pytest.mark.parametrize("spec, want", [
    ("vespo:k_pos=1,lambda_pos=0.5", {"variant": "vespo", "k_pos": 1.0, "lambda_pos": 0.5}),
    ("dppo-kl:delta_high=0.1", {"variant": "dppo-kl", "delta_high": 0.1}),
    ("luspo", {"variant": "luspo", "eps_low": 0.003, "eps_high": 0.004}),
    ("luspo:eps_low=0.2", {"variant": "luspo", "eps_low": 0.2, "eps_high": 0.004}),
    ("gspo:seq_mask_delta=0.01", {"variant": "gspo", "eps_low": 0.003, "eps_high": 0.004,
                                  "seq_mask_delta": 0.01}),
])  # fmt: skip
def test_loss_name_takes_the_objective_s_options(spec, want):
    from gspo.train.cli import parse_config

    config, _ = parse_config(["--loss", spec])
    assert config.objective.gspo_loss_options() == want
    assert config.objective.name == spec.partition(":")[0]


@pytest.mark.parametrize("argv, match", [
    (["--loss", "vespo:eps_low=0.2"], "'eps_low=0.2' is not option=value of vespo's options"),
    (["--loss", "vespo:k_pos=x"], "k_pos='x' is not a number"),
    (["--loss", "vespo:k_pos=-1"], "k_pos must be finite and >= 0"),
    (["--loss", "dppo-tv", "--eps-low", "0.1"], "DPPO bounds the token probability"),
    (["--loss", "luspo:eps_low=0.1", "--eps-low", "0.2"], "gives it too"),
    (["--loss", "ppo"], "must be one of"),
    (["--loss", "gspo:seq_mask_delta=0"], "seq_mask_delta must be finite and > 0"),
])  # fmt: skip
def test_bad_loss_options_exit_2_naming_them(argv, match, capsys):
    from gspo.train.cli import main

    assert main([*argv, "--steps", "0"]) == 2
    assert match in capsys.readouterr().err
