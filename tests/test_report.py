"""Run reporting: metrics/samples JSONL (with resume truncation), TensorBoard, W&B offline."""

import json

import pytest

from gspo.train.report import Report, format_group, sample_groups


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sample_groups_and_jsonl_resume_truncation(tmp_path):
    prompts = [{"prompt": "p0"}] * 2 + [{"prompt": "p1"}] * 2 + [{"prompt": "p2"}] * 2
    groups = sample_groups(prompts, ["a", "b", "c", "d", "e", "f"], [1, 0, 0.5, 0.5, 0, 0],
                           [1, -1, 0, 0, 0, 0], group_size=2, count=2)  # fmt: skip
    assert [g["prompt"] for g in groups] == ["p0", "p1"]
    assert groups[0]["completions"][1] == {"text": "b", "reward": 0.0, "advantage": -1.0}
    assert "r=+1.00 A=+1.00 | a" in format_group(groups[0])

    report = Report(tmp_path, main=True, truncate_after=0)
    for step in (1, 2, 3):
        report.metrics({"step": step, "reward_mean": step / 10, "eval_reward": step})
        report.samples(step, groups)
    report.close()
    assert len(_rows(tmp_path / "samples.jsonl")) == 6
    # Resumed from the step-2 checkpoint: step 3's lines go, so nothing is logged twice.
    resumed = Report(tmp_path, main=True, truncate_after=2)
    assert [r["step"] for r in _rows(tmp_path / "metrics.jsonl")] == [1, 2]
    assert [r["step"] for r in _rows(tmp_path / "samples.jsonl")] == [1, 1, 2, 2]
    assert resumed.last_eval == 2
    Report(tmp_path, main=True, truncate_after=0)  # a fresh run starts both files empty
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_non_main_ranks_write_nothing(tmp_path):
    report = Report(tmp_path, main=False, truncate_after=0, report_to=("tensorboard",))
    report.metrics({"step": 1, "reward_mean": 0.5})
    report.samples(1, [{"prompt": "p", "completions": []}])
    assert list(tmp_path.iterdir()) == []


def test_tensorboard_events_are_readable(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    report = Report(tmp_path, main=True, truncate_after=0, report_to=("tensorboard",))
    for step in (1, 2):
        report.metrics({"step": step, "reward_mean": 0.25 * step, "note": "text", "ok": True})
    report.samples(2, [{"prompt": "p", "completions": [{"text": "t", "reward": 1.0,
                                                        "advantage": 0.5}]}])  # fmt: skip
    report.close()
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert events.Tags()["scalars"] == ["reward_mean"]  # strings and bools are not scalars
    assert [(e.step, e.value) for e in events.Scalars("reward_mean")] == [(1, 0.25), (2, 0.5)]


def test_wandb_offline_needs_no_network(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    report = Report(tmp_path, main=True, truncate_after=0, report_to=("wandb",), config={"lr": 1})
    report.metrics({"step": 1, "reward_mean": 0.5})
    report.close()
    assert "WANDB_MODE" not in __import__("os").environ  # chosen per run, not leaked
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_a_training_run_writes_samples_tensorboard_and_timings(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gspo.train import TrainConfig, train

    config = TrainConfig(steps=3, eval_every=2, run_dir=str(tmp_path / "run"), progress=False,
                         plot=False, report_to=("tensorboard",), samples_per_step=1)  # fmt: skip
    train(config)
    run = tmp_path / "run"
    samples = _rows(run / "samples.jsonl")
    assert [s["step"] for s in samples] == [1, 2, 3]
    assert len(samples[0]["completions"]) == config.group_size
    rows = _rows(run / "metrics.jsonl")
    for key in ("time_rollout", "time_old_logprobs", "time_update", "time_weight_sync"):
        assert all(row[key] >= 0 for row in rows[1:]), key
    assert rows[1]["time_old_logprobs"] <= rows[1]["time_update"]
    events = EventAccumulator(str(run / "tb")).Reload()
    assert [e.step for e in events.Scalars("reward_mean")] == [1, 2, 3]


def test_a_group_is_printed_at_each_evaluation(tmp_path, capsys):
    from gspo.train import TrainConfig, train

    config = TrainConfig(steps=2, eval_every=2, warmup_steps=0, run_dir=str(tmp_path / "run"),
                         plot=False, tiny_hidden=32, tiny_layers=1, prompts_per_step=4,
                         group_size=2, minibatches=2, eval_prompts=4)  # fmt: skip
    train(config)
    printed = capsys.readouterr()
    text = printed.out + printed.err
    # Only at the evaluation (step 2), not at step 1: the step's first group, one line each.
    assert "step 1:" not in text and text.count("step 2:\nprompt: sum ") == 1
    assert text.count("  r=") == config.group_size
