"""`gspo train --env` at tiny sizes with the HF engine: a one-turn environment reproduces the
single-turn run bit for bit; environment tokens get exactly zero gradient and never reach
the loss; the on-policy ratio is exactly 1; a resumed multi-turn run equals the straight
one; a step moves the model's tokens in the advantage's direction; a failing environment
stops the run with a checkpoint and exit 3; a ten-line user environment trains and
`gspo eval --env` reports its episodes."""

from __future__ import annotations

import json

import torch

from gspo.causal_lm import CausalLMLogprobs
from gspo.loss import gspo_loss
from gspo.train import episodes
from gspo.train.checkpoint import list_checkpoints
from gspo.train.cli import main, parse_config
from gspo.train.config import TrainConfig
from gspo.train.engines.hf import HFEngine
from gspo.train.loop import train
from gspo.train.tasks import POOL_SIZE
from gspo.train.tasks.digitsum import digitsum_reward
from gspo.train.tiny import tiny_model, tiny_tokenizer
from gspo.train.update import k3_kl, lr_lambda, response_logprobs, update
from test_train_e2e import TINY, rows, weights

# (truncated_frac is compared: a one-turn episode is truncated exactly as a completion is)
NOT_COMPARED = ("time", "step_time", "tokens_per_s", "turns_per_episode", "tool_call_rate",
                "cut_frac")  # fmt: skip


class OneTurn:
    """The built-in digitsum task as an environment of one turn."""

    def __init__(self, **fields):
        self.prompt, self.target, self.reply = fields["prompt"], fields["target"], None

    def reset(self):
        return self.prompt

    def step(self, reply):
        self.reply = reply

    def reward(self):
        return digitsum_reward([self.prompt], [self.reply], [self.target])[0]


class Digits:
    """The ten-line contract: two replies, rewarded by how many digits they hold."""

    def __init__(self, **fields):
        self.prompt, self.replies = fields["prompt"], []

    def reset(self):
        return self.prompt

    def step(self, reply):
        self.replies.append(reply)
        return None if len(self.replies) == 2 else "more:"

    def reward(self):
        return sum(c.isdigit() for c in "".join(self.replies)) / 8


class BreaksOnTurn2(Digits):
    def step(self, reply):
        if self.replies:
            raise RuntimeError("the tool is down")
        return super().step(reply)


class BreaksInBatch2(Digits):
    made = 0  # episodes constructed in this process: batch 1 is 0-15, batch 2 16-31

    def __init__(self, **fields):
        super().__init__(**fields)
        self.index, BreaksInBatch2.made = BreaksInBatch2.made, BreaksInBatch2.made + 1

    def step(self, reply):
        if 16 <= self.index < 32:
            raise RuntimeError("the tool is down")
        return super().step(reply)


def _kept(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(NOT_COMPARED)}


def test_one_turn_env_reproduces_the_single_turn_run_bit_for_bit(tmp_path):
    common = [*TINY, "--steps", "3", "--seed", "5", "--no-plot"]
    plain, env = tmp_path / "plain", tmp_path / "env"
    assert main([*common, "--run-dir", str(plain)]) == 0
    assert main([*common, "--env", "test_train_envs:OneTurn", "--max-turns", "1",
                 "--run-dir", str(env)]) == 0  # fmt: skip
    a, b = rows(plain), rows(env)
    assert [_kept(r) for r in a] == [_kept(r) for r in b]  # every metric, exactly
    assert all(r["turns_per_episode"] == 1 and r["cut_frac"] == 0 for r in b[1:])
    assert any(r["truncated_frac"] > 0 for r in b[1:])  # so the comparison above means something
    wa, wb = weights(plain), weights(env)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _multi_turn_rollout(seed=0, greedy=False, group_size=2):
    torch.manual_seed(seed)
    model, tok = tiny_model(layers=1, hidden=32, seed=seed), tiny_tokenizer()
    config = TrainConfig(max_new_tokens=3, env="test_train_envs:Digits", max_turns=3,
                         minibatches=1, prompts_per_step=2, group_size=group_size, lr=1e-3,
                         warmup_steps=0)  # fmt: skip
    sampler = HFEngine(model, tok, config.sampling)
    collect = episodes.build(config.data, config.sampling, sampler, tok, model, None)
    prompts = [{"prompt": "sum 07:"}, {"prompt": "sum 12:"}]
    return model, config, collect.rollout(prompts, group_size=group_size, greedy=greedy)


def test_environment_tokens_get_zero_gradient_and_never_reach_the_loss():
    model, config, rollout = _multi_turn_rollout()
    mask = rollout.response_mask
    env = (rollout.attention_mask[:, rollout.prompt_len :] == 1) & ~mask
    assert env.any() and mask.any()  # episodes of model and environment tokens
    # T_i: the model's tokens, 2 turns x at most 3 each (3 + "\nmore:\n" 7 + 3 in the ids)
    assert (mask.sum(1) <= 6).all() and (rollout.attention_mask.sum(1) > mask.sum(1) + 6).all()
    logprobs = CausalLMLogprobs(model)
    with torch.no_grad():
        logp_old = response_logprobs(logprobs, rollout, temperature=1.0)[0]
    logp = response_logprobs(logprobs, rollout, temperature=1.0)[0]
    # on policy (the same forward, dropout off in eval): the ratio is exactly 1
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    loss, metrics = gspo_loss(logp, logp_old, mask, advantages=adv, eps_low=0.003,
                              eps_high=0.004)  # fmt: skip
    assert metrics["ratio_min"] == 1.0 and metrics["ratio_max"] == 1.0
    leaf = logp.detach().requires_grad_()
    gspo_loss(leaf, logp_old, mask, advantages=adv, eps_low=0.003, eps_high=0.004)[0].backward()
    assert (leaf.grad[env] == 0).all() and (leaf.grad[mask] != 0).any()
    # garbage (NaN, huge values) in every environment slot: loss, metrics and KL unchanged
    garbage = torch.where(env, torch.nan, 0.0)
    loss2, metrics2 = gspo_loss(torch.where(env, 1e9, logp), logp_old + garbage, mask,
                                advantages=adv, eps_low=0.003, eps_high=0.004)  # fmt: skip
    assert torch.equal(loss, loss2)
    assert all(torch.equal(torch.as_tensor(metrics[k]), torch.as_tensor(metrics2[k]))
               for k in metrics)  # fmt: skip
    assert torch.equal(k3_kl(logp, logp_old, mask), k3_kl(logp, logp_old + garbage, mask))
    # the sampler's log-probs are kept for the model's tokens only, and match the trainer's
    assert (rollout.logp_sampler[~mask] == 0).all()
    assert (rollout.logp_sampler[mask] - logp_old[mask]).abs().max() < 1e-5


def test_a_step_moves_the_model_tokens_in_the_advantage_direction():
    model, config, rollout = _multi_turn_rollout(seed=1)
    logprobs = CausalLMLogprobs(model)
    mask = rollout.response_mask
    opt = torch.optim.AdamW(logprobs.parameters(), lr=config.optim.lr, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(0, 1, 1.0))

    def seq_logp():
        with torch.no_grad():
            logp = response_logprobs(logprobs, rollout, temperature=1.0)[0]
        return torch.where(mask, logp, 0.0).sum(1) / mask.sum(1)

    before = seq_logp()
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    update(logprobs, None, opt, sched, rollout, adv, config=config)
    moved = seq_logp() - before
    # GSPO ascends sum_i A_i s_i (s_i: the mean log-prob of episode i's model tokens): within
    # each group the positive episode gains on the negative one. (A sign error, or a loss
    # that also scored the environment's tokens, fails this for some seed.)
    assert (adv * moved).sum() > 0, moved
    assert moved[0] > moved[1] and moved[2] > moved[3], moved


def test_resumed_multi_turn_run_equals_the_straight_run(tmp_path):
    common = [*TINY, "--steps", "4", "--checkpoint-every", "10", "--seed", "3", "--no-plot",
              "--env", "test_train_envs:Digits", "--max-turns", "2"]  # fmt: skip
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(parse_config([*common, "--run-dir", str(straight)])[0])
    assert train(parse_config([*common, "--run-dir", str(stopped)])[0], stop_after=2)["step"] == 2
    assert main(["--resume", str(stopped)]) == 0
    a, b = weights(straight), weights(stopped)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [_kept(r) for r in rows(straight)] == [_kept(r) for r in rows(stopped)]


def test_user_environment_trains_and_samples_show_turns(tmp_path):
    run = tmp_path / "run"
    assert main([*TINY, "--steps", "2", "--no-plot", "--env", "test_train_envs:Digits",
                 "--run-dir", str(run)]) == 0  # fmt: skip
    metrics = rows(run)
    for r in metrics[1:]:
        assert r["turns_per_episode"] == 2 and r["tool_call_rate"] == 1.0
        assert r["cut_frac"] == 0 and r["mismatch_max_abs"] < 1e-5
    sample = json.loads((run / "samples.jsonl").read_text().splitlines()[0])
    turns = sample["completions"][0]["turns"]
    assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant"]
    assert turns[2]["content"] == "more:"
    config = json.loads((run / "config.json").read_text())
    assert config["env"] == "test_train_envs:Digits" and config["max_turns"] == 4


def test_max_turns_truncates_and_says_so(tmp_path):
    run = tmp_path / "run"
    assert main([*TINY, "--steps", "1", "--no-plot", "--env", "test_train_envs:Digits",
                 "--max-turns", "1", "--run-dir", str(run)]) == 0  # fmt: skip
    r = rows(run)[1]
    assert r["turns_per_episode"] == 1 and r["truncated_frac"] == 1.0 and r["cut_frac"] == 1.0
    assert r["tool_call_rate"] == 0.0  # the environment's answer came after the last turn


def test_failing_environment_stops_with_a_checkpoint_and_exit_3(tmp_path, capsys):
    run = tmp_path / "run"
    code = main([*TINY, "--steps", "2", "--no-plot", "--env", "test_train_envs:BreaksOnTurn2",
                 "--run-dir", str(run)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 3, err
    assert "environment error: environment BreaksOnTurn2.step() raised RuntimeError: the " \
        "tool is down in episode 0" in err and "turn 2" in err  # fmt: skip
    assert "gspo train --resume RUN_DIR" in err
    assert [p.name for p in list_checkpoints(run)] == ["step-000000"]  # before the failed step


def test_gspo_eval_env_reports_episodes(tmp_path, capsys):
    from gspo.cli import main as gspo_main

    out = tmp_path / "completions.jsonl"
    assert gspo_main(["eval", "--model", "tiny", "--tiny-hidden", "32", "--task", "digitsum",
                      "--env", "test_train_envs:Digits", "--max-turns", "2", "--questions", "3",
                      "-n", "2", "--max-new-tokens", "3", "--engine", "hf", "--out", str(out),
                      "--device", "cpu"]) == 0  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["turns_per_episode"] == 2 and summary["tool_call_rate"] == 1.0
    assert summary["cut_frac"] == 0 and "pass@2" in summary
    greedy = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["truncated_frac"] == sum(g["greedy_truncated"] for g in greedy) / len(greedy)
    assert any("tool-call rate 1.000, turns per episode 2.00" in line for line in lines)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 3
    assert [t["role"] for t in records[0]["greedy_turns"]] == ["user", "assistant", "user",
                                                               "assistant"]  # fmt: skip


def test_two_ranks_run_multi_turn_episodes_and_resume_exactly(tmp_path):
    """--env under torchrun (2 gloo ranks, DDP): each rank runs the episodes of its share of
    the prompts (they end after different numbers of turns), and a run resumed from its
    step-2 checkpoint equals the straight one (weights to 1e-6, every reward_mean)."""
    import inspect

    from test_train_distributed import TINY as TORCHRUN_TINY
    from test_train_distributed import straight_and_resumed

    (tmp_path / "myenv.py").write_text(inspect.getsource(Digits))
    straight, rows_, _ = straight_and_resumed(
        tmp_path, [*TORCHRUN_TINY, "--env", "myenv:Digits", "--max-turns", "2"])
    assert [r["step"] for r in rows_] == [0, 1, 2, 3, 4]
    assert all(r["turns_per_episode"] > 1 for r in rows_[1:]), rows_


def test_async_rollouts_run_episodes_ahead_and_resume_equals_straight(tmp_path):
    """--env with --async-rollouts: the sampler thread runs the episodes (environment calls
    included) one step ahead, each turn from its own seed, so a run stopped after step 2
    and resumed (its pending batch from the checkpoint) equals the straight one. Batch 1
    comes from the initial weights (lag 0: the sampler's log-probs are the trainer's), the
    later ones one update behind (lag 1)."""
    common = [*TINY, "--steps", "4", "--checkpoint-every", "10", "--seed", "3", "--no-plot",
              "--env", "test_train_envs:Digits", "--max-turns", "2",
              "--async-rollouts"]  # fmt: skip
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(parse_config([*common, "--run-dir", str(straight)])[0])
    assert train(parse_config([*common, "--run-dir", str(stopped)])[0], stop_after=2)["step"] == 2
    assert main(["--resume", str(stopped)]) == 0
    a, b = weights(straight), weights(stopped)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra = rows(straight)
    assert [_kept(r) for r in ra] == [_kept(r) for r in rows(stopped)]
    assert [r["policy_lag"] for r in ra[1:]] == [0, 1, 1, 1]
    assert all(r["turns_per_episode"] == 2 and r["tool_call_rate"] == 1.0 for r in ra[1:])
    assert ra[1]["mismatch_max_abs"] < 1e-5 and ra[3]["mismatch_max_abs"] > 1e-4


def test_async_environment_error_checkpoints_and_exits_3(tmp_path, capsys):
    """An environment that fails on the sampler thread stops the run as a synchronous one
    does: the state before the failing step saved, the environment's message, exit 3.
    (BreaksInBatch2 fails in the episodes of batch 2 only, which the thread runs while
    step 1 trains; the held-out episodes at step 0 come after batches 1 and 2.)"""
    run = tmp_path / "run"
    # the start-up check reads each row's first message from an instance of its own
    # (data.fit): one per training row (the task's pool) and held-out row (--eval-prompts 4)
    BreaksInBatch2.made = -(POOL_SIZE + 4)
    code = main([*TINY, "--steps", "2", "--no-plot", "--env", "test_train_envs:BreaksInBatch2",
                 "--async-rollouts", "--run-dir", str(run)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 3, err
    assert "environment BreaksInBatch2.step() raised RuntimeError: the tool is down" in err
    assert list_checkpoints(run)[-1].name == "step-000001"  # the state step 2 began from
