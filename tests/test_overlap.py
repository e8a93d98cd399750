"""--async-rollouts (gspo.train.overlap): the schedule (batch k sampled by W_{max(0, k-1-S)},
policy_lag = min(k-1, S)), a resumed source equal to a straight one, errors of the sampler
thread reaching the trainer, and whole HF runs: a resume equals a straight run, and the
sampler really lags (its log-probs leave the trainer's after step 1, and only then)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from gspo.train import overlap
from gspo.train.cli import main, parse_config
from gspo.train.config import TrainConfig
from gspo.train.episodes import SingleTurn
from gspo.train.loop import train
from gspo.train.overlap import Synchronous
from test_train_e2e import TINY, rows, weights


class FakePolicy:
    def __init__(self):
        self.version = 0

    def sampler_weights(self):
        return [("version", torch.tensor(float(self.version)))]


class FakeSampler:
    """Returns (prompts, version of the weights it holds, seed) and checks that nothing
    loads weights into it while it samples (the engine is not thread-safe)."""

    def __init__(self, held: int = 0, fail_at: int | None = None):
        self.held, self.fail_at, self.busy = held, fail_at, threading.Event()

    def sample(self, prompts, *, group_size, greedy, seed=None):
        self.busy.set()
        try:
            if self.fail_at is not None and seed == self.fail_at:
                raise KeyError("broken sampler")
            time.sleep(0.005)  # long enough for the trainer's thread to run meanwhile
            return (tuple(prompts), self.held, seed)
        finally:
            self.busy.clear()

    def load_weights(self, named):
        assert not self.busy.is_set(), "weights loaded while the sampler samples"
        self.held = int(dict(named)["version"].item())


def Overlapped(sampler, *args, **kwargs):  # noqa: N802 - the class, on single-turn episodes
    return overlap.Overlapped(sampler, SingleTurn(sampler, None), *args, **kwargs)


def prompts_of(step):
    return [f"p{step}a", f"p{step}b"]


def drive(source, policy, first: int, last: int) -> list:
    """The loop's calls for steps first..last; returns (rollout, lag) per step."""
    out = []
    for step in range(first, last + 1):
        batch = source.next(step)
        rollout = batch.rollout  # the loop samples now when nothing came ahead (or_now)
        if rollout is None:
            rollout = source.sampler.sample(prompts_of(step), group_size=2, greedy=False)
        out.append((rollout, batch.lag))
        policy.version = step  # the update: W_step
        source.updated(step)
    return out


@pytest.mark.parametrize("staleness", [1, 2])
def test_batch_k_is_sampled_by_the_weights_of_step_k_minus_1_minus_s(staleness):
    policy = FakePolicy()
    source = Overlapped(FakeSampler(), policy, prompts_of, group_size=2, staleness=staleness,
                        resumed={}, start=0)  # fmt: skip
    try:
        got = drive(source, policy, 1, 7)
    finally:
        source.close()
    for step, ((prompts, version, seed), lag) in enumerate(got, start=1):
        assert prompts == tuple(prompts_of(step)) and seed == step
        # S = 1: versions 0, 0, 1, 2, ... (a bug sampling the current weights gives step-1)
        assert version == max(0, step - 1 - staleness), (step, version)
        assert lag == min(step - 1, staleness)


def test_synchronous_source_samples_the_current_weights():
    policy = FakePolicy()
    source = Synchronous(FakeSampler(), policy, prompts_of, group_size=2)
    got = drive(source, policy, 1, 4)
    assert [(r[1], r[2], lag) for r, lag in got] == [(k - 1, None, 0) for k in range(1, 5)]


@pytest.mark.parametrize("staleness", [1, 2])
def test_resumed_source_equals_a_straight_one(staleness):
    def source(start, resumed, held):
        return Overlapped(FakeSampler(held=held), policy, prompts_of, group_size=2,
                          staleness=staleness, resumed=resumed, start=start)  # fmt: skip

    policy = FakePolicy()
    straight = source(0, {}, 0)
    want = drive(straight, policy, 1, 6)
    straight.close()
    policy = FakePolicy()
    first = source(0, {}, 0)
    drive(first, policy, 1, 3)
    saved = first.pending(3)  # what the checkpoint after step 3 holds
    first.close()
    assert sorted(saved["batches"]) == list(range(4, 4 + staleness))  # 3+1+S drawn again
    again = source(3, saved, 3)  # the engine is rebuilt from the checkpoint's W_3
    got = drive(again, policy, 4, 6)
    again.close()
    assert got == want[3:]


def test_a_sampler_error_reaches_the_trainer():
    policy = FakePolicy()
    source = Overlapped(FakeSampler(fail_at=3), policy, prompts_of, group_size=2,
                        staleness=1, resumed={}, start=0)  # fmt: skip
    try:
        with pytest.raises(RuntimeError, match="sampler thread failed") as info:
            drive(source, policy, 1, 5)
        assert isinstance(info.value.__cause__, KeyError)
    finally:
        source.close()


# ---------------------------------------------------------------- whole runs (HF engine)

ASYNC = [*TINY, "--no-plot", "--async-rollouts", "--warmup-steps", "0", "--lr", "3e-3"]


def test_async_resume_equals_straight_run(tmp_path):
    common = [*ASYNC, "--steps", "5", "--checkpoint-every", "10", "--seed", "3"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(parse_config([*common, "--run-dir", str(straight)])[0])
    summary = train(parse_config([*common, "--run-dir", str(stopped)])[0], stop_after=2)
    assert summary["step"] == 2 and not summary["finished"]
    assert main(["--resume", str(stopped)]) == 0
    a, b = weights(straight), weights(stopped)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)
    for x, y in zip(rows(straight), rows(stopped), strict=True):
        assert x.get("reward_mean") == y.get("reward_mean") and x.get("loss") == y.get("loss")


def test_the_sampler_lags_one_step_and_only_after_the_first(tmp_path):
    """The sampler's log-probs equal the trainer's old ones while both hold W_0 (step 1),
    and differ by one update's worth afterwards; the synchronous run's never differ. A
    sampler sampling the moving policy module (no copy) or the current weights would give
    ~0 at every step; one never refreshed would drift further every step."""
    lagged = rows(train(parse_config([*ASYNC, "--steps", "6", "--run-dir",
                                      str(tmp_path / "a")])[0])["run_dir"])  # fmt: skip
    steps = [r for r in lagged if "policy_lag" in r]
    assert [r["policy_lag"] for r in steps] == [0, 1, 1, 1, 1, 1]
    assert steps[0]["mismatch_k3"] < 1e-10
    assert all(r["mismatch_k3"] > 1e-6 for r in steps[1:]), [r["mismatch_k3"] for r in steps]
    sync = rows(train(parse_config([*TINY, "--no-plot", "--warmup-steps", "0", "--lr", "3e-3",
                                    "--steps", "6", "--run-dir",
                                    str(tmp_path / "s")])[0])["run_dir"])  # fmt: skip
    for r in sync[1:]:
        assert r["policy_lag"] == 0 and r["mismatch_k3"] < 1e-10, r


@pytest.mark.parametrize(("extra", "flag"), [
    (["--fsdp"], "--fsdp"), (["--lora-r", "4"], "--lora-r"), (["--keep-dropout"], "--keep-dropout"),
])  # fmt: skip
def test_async_with_the_hf_engine_refuses_what_its_copy_cannot_do(extra, flag, capsys):
    with pytest.raises(ValueError, match=f"{flag} .*--rollout vllm"):
        parse_config(["--async-rollouts", *extra])
    assert main(["--async-rollouts", *extra]) == 2
    assert "--rollout vllm" in capsys.readouterr().err


def test_option_errors_name_the_flag():
    with pytest.raises(ValueError, match="--max-staleness .*add it"):
        TrainConfig(max_staleness=2)
    with pytest.raises(ValueError, match="--max-staleness .*positive"):
        TrainConfig(async_rollouts=True, max_staleness=0)
    with pytest.raises(ValueError, match="--vllm-tp .*--rollout vllm"):
        TrainConfig(vllm_tp=2)
    TrainConfig(async_rollouts=True, max_staleness=2)  # accepted


def test_async_takes_the_samplers_log_probs_by_default_and_only_then():
    assert TrainConfig(async_rollouts=True).old_logprobs == "sampler"
    assert TrainConfig().old_logprobs == "trainer"
    corrected = TrainConfig(async_rollouts=True, rollout_correction="seq-tis")
    assert corrected.old_logprobs == "trainer"  # a correction weighs the trainer's
    assert TrainConfig(async_rollouts=True, old_logprobs="trainer").old_logprobs == "trainer"
    with pytest.raises(ValueError, match="--rollout-correction .*--old-logprobs trainer"):
        TrainConfig(old_logprobs="sampler", rollout_correction="seq-tis")


def test_batches_saved_on_another_number_of_ranks_are_drawn_again():
    """Each rank's saved batch holds its share of the prompts: on another world size they
    would be the wrong prompts, so they are drawn again from the checkpoint's weights."""
    policy = FakePolicy()
    first = Overlapped(FakeSampler(), policy, prompts_of, group_size=2, staleness=1,
                       resumed={}, start=0, world_size=2)  # fmt: skip
    drive(first, policy, 1, 3)
    saved = first.pending(3)
    first.close()
    again = Overlapped(FakeSampler(held=3), policy, prompts_of, group_size=2, staleness=1,
                       resumed=saved, start=3, world_size=1)  # fmt: skip
    (rollout, lag), *_ = drive(again, policy, 4, 5)
    again.close()
    assert rollout[1] == 3 and lag == 0  # drawn again by W_3, not the saved W_2 batch
