"""--resume with changed flags (issue 16, item 2): what may change takes effect, every other
change is refused at start naming the flag, the saved value and the new one; and a reward
error in a mid-run evaluation keeps that step's metrics line (item 11).

The runs: the tiny model, 3 steps of 2 minibatches, warmup 1 step (2 optimizer steps), a
checkpoint every step; a copy stopped after step 2 is resumed with other flags."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from gspo.train.checkpoint import list_checkpoints
from gspo.train.cli import main
from gspo.train.resume import CHANGEABLE, retime
from gspo.train.update import lr_lambda
from test_train_e2e import TINY, rows, user_rewards

COMMON = [*TINY, "--steps", "3", "--warmup-steps", "1", "--checkpoint-every", "1",
          "--keep-checkpoints", "5", "--no-plot"]  # fmt: skip


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A 3-step run at lr 1e-3, and a copy of it with only its step-2 checkpoint (as if it
    was killed after step 2)."""
    base = tmp_path_factory.mktemp("runs")
    straight = base / "straight"
    assert main([*COMMON, "--run-dir", str(straight)]) == 0
    cut = base / "cut"
    shutil.copytree(straight, cut)
    shutil.rmtree(cut / "checkpoints" / "step-000003")
    shutil.rmtree(cut / "model")
    return straight, cut


def copy(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def lr_at(step: int, peak: float, steps: int) -> float:
    """The lr logged after training step ``step``: peak x factor(k) after its 2 minibatches."""
    return peak * lr_lambda(2, steps * 2, 0.1)(step * 2)


def test_a_new_lr_applies_from_the_resumed_step(stopped, tmp_path):
    """Before the fix the scheduler's restored base_lrs kept 1e-3 (step 3 logged 1e-4, the
    straight run's number, instead of 5e-5) while config.json said 5e-4."""
    straight, cut = stopped
    run = copy(cut, tmp_path)
    assert rows(straight)[-1]["lr"] == pytest.approx(lr_at(3, 1e-3, 3), rel=1e-9)
    assert main(["--resume", str(run), "--lr", "5e-4"]) == 0
    assert rows(run)[-1]["lr"] == pytest.approx(lr_at(3, 5e-4, 3), rel=1e-9)
    assert rows(run)[-1]["lr"] == pytest.approx(rows(straight)[-1]["lr"] / 2, rel=1e-9)
    assert json.loads((run / "config.json").read_text())["lr"] == 5e-4


def test_a_longer_run_re_times_the_schedule_and_runs_to_its_end(stopped, tmp_path, capsys):
    _, cut = stopped
    run = copy(cut, tmp_path)
    assert main(["--resume", str(run), "--steps", "5"]) == 0
    got = rows(run)
    assert [r["step"] for r in got] == [0, 1, 2, 3, 4, 5]
    for r in got[3:]:
        assert r["lr"] == pytest.approx(lr_at(r["step"], 1e-3, 5), rel=1e-9), r["step"]
    assert "--steps 3 -> 5" in capsys.readouterr().err  # the warning at start
    assert json.loads((run / "config.json").read_text())["steps"] == 5


def test_unchanged_settings_resume_to_the_straight_run(stopped, tmp_path):
    """Cadence and logging flags change nothing computed: step 3 equals the straight run's."""
    straight, cut = stopped
    run = copy(cut, tmp_path)
    assert main(["--resume", str(run), "--eval-every", "1", "--samples-per-step", "0"]) == 0
    a, b = rows(straight)[-1], rows(run)[-1]
    for key in ("reward_mean", "loss", "ratio_min", "ratio_max", "lr", "eval_reward"):
        assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), key


@pytest.mark.parametrize(("flags", "named"), [
    (["--seed", "1"], "--seed 0 -> 1"),
    (["--group-size", "2"], "--group-size 4 -> 2"),
    (["--prompts-per-step", "8"], "--prompts-per-step 4 -> 8"),
    (["--minibatches", "4"], "--minibatches 2 -> 4"),
    (["--loss", "grpo", "--eps-high", "0.2"], "--loss 'gspo' -> 'grpo'; --eps-high "),
    (["--run-dir", "elsewhere"], "--run-dir"),
], ids=["seed", "group-size", "prompts-per-step", "minibatches", "objective", "run-dir"])  # fmt: skip
def test_other_changes_are_refused_at_start(stopped, tmp_path, capsys, flags, named):
    """Exit 2 before anything is written (config.json, metrics, checkpoints as they were).
    Before the fix --seed 1 trained on another data stream from the saved position."""
    _, cut = stopped
    run = copy(cut, tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert main(["--resume", str(run), *flags]) == 2
    err = capsys.readouterr().err
    assert named in err and "checkpoint step-000002" in err and "--lr" in err  # what may change
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert [p.name for p in list_checkpoints(run)] == ["step-000001", "step-000002"]


def test_steps_behind_the_checkpoint_are_refused(stopped, tmp_path, capsys):
    _, cut = stopped
    assert main(["--resume", str(copy(cut, tmp_path)), "--steps", "1"]) == 2
    assert "is at step 2: --steps 1 is behind it" in capsys.readouterr().err


def test_retime_sets_the_new_peak_at_the_saved_step():
    """LambdaLR restores the saved peak; retime gives lr x factor(k) of the new schedule."""
    weight = torch.nn.Parameter(torch.zeros(2))

    def schedule(lr, total):
        optimizer = torch.optim.AdamW([weight], lr=lr)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(2, total, 0.1))

    optimizer, scheduler = schedule(1e-3, 10)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    optimizer, scheduler = schedule(5e-4, 20)
    scheduler.load_state_dict(state)
    assert scheduler.base_lrs == [1e-3]  # the restored peak: the bug
    retime(optimizer, scheduler, 5e-4)
    want = 5e-4 * lr_lambda(2, 20, 0.1)(4)
    assert optimizer.param_groups[0]["lr"] == want and scheduler.get_last_lr() == [want]
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-4 * lr_lambda(2, 20, 0.1)(5))


def test_changeable_names_options():
    from gspo.config import flags
    from gspo.train.config import TrainConfig

    assert set(CHANGEABLE) <= {f.name for f in flags(TrainConfig)}


FAILS_IN_EVAL = """
CALLS = []

def score(prompts, completions, target):
    CALLS.append(1)
    if len(CALLS) == 4:  # 1 = step-0 eval, 2 = step 1, 3 = step 2, 4 = step 2's eval
        raise RuntimeError("transient")
    return [0.1 * (len(c) % 7) + 0.01 * t for c, t in zip(completions, target)]
"""


def test_a_reward_error_in_a_mid_run_evaluation_keeps_the_steps_metrics(tmp_path, monkeypatch):
    """The evaluation after step 2 fails; the checkpoint is at step 2 (its update is done),
    so metrics.jsonl must already hold step 2's line, which the resumed run keeps (before
    the fix it was never written: the resumed run's rows were steps 0, 1, 3)."""
    prompts = user_rewards(tmp_path, monkeypatch, "eval_flaky", FAILS_IN_EVAL)
    run = tmp_path / "run"
    args = [*TINY, "--steps", "3", "--checkpoint-every", "10", "--no-plot", "--prompts",
            str(prompts), "--reward", "eval_flaky:score", "--run-dir", str(run)]  # fmt: skip
    assert main(args) == 3
    assert [p.name for p in list_checkpoints(run)] == ["step-000002"]
    assert [r["step"] for r in rows(run)] == [0, 1, 2]
    assert main(["--resume", str(run)]) == 0
    got = rows(run)
    assert [r["step"] for r in got] == [0, 1, 2, 3]
    assert "reward_mean" in got[2] and "eval_reward" not in got[2]  # its evaluation failed
