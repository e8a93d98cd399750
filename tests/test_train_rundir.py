"""Run directories and resume: a non-empty RUN_DIR is not reused without --resume, a launch
that fails before training leaves nothing behind, a checkpoint of another model (or of
FSDP2 shards in one process) is refused with what to do, and the resume hint names torchrun."""

from __future__ import annotations

import json

import pytest

from gspo.train import models, rundir
from gspo.train.cli import main, resume_command
from gspo.train.config import TrainConfig
from gspo.train.distributed import World
from gspo.train.tiny import tiny_model

TINY = ["--tiny-hidden", "32", "--tiny-layers", "1", "--prompts-per-step", "4",
        "--group-size", "4", "--minibatches", "2", "--max-new-tokens", "4",
        "--eval-prompts", "4", "--eval-every", "2", "--no-progress", "--no-plot"]  # fmt: skip


def test_non_empty_run_dir_without_resume_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert rundir.resolve(TrainConfig(run_dir=str(run)), World()) == run  # empty: fine
    (run / "metrics.jsonl").write_text('{"step": 0}\n')
    with pytest.raises(
        ValueError,
        match=rf"--run-dir '{run}' is not empty \(it holds "
        rf"metrics.jsonl\); continue that run with --resume",
    ):
        rundir.resolve(TrainConfig(run_dir=str(run)), World())
    assert rundir.resolve(TrainConfig(resume=str(run)), World()) == run


def test_cli_refuses_a_used_run_dir_and_leaves_it_alone(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("theirs\n")
    (run / "config.json").write_text("{}\n")
    assert main([*TINY, "--steps", "1", "--run-dir", str(run)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == "theirs\n"  # not truncated
    assert (run / "config.json").read_text() == "{}\n"  # not overwritten


@pytest.mark.parametrize(
    "bad", [["--model", "no/such/dir"], ["--prompts", "no.jsonl", "--reward", "m:f"]],
    ids=["model", "prompts"],
)  # fmt: skip
def test_a_launch_that_fails_before_training_leaves_no_run_dir(tmp_path, monkeypatch, bad):
    monkeypatch.chdir(tmp_path)
    assert main([*TINY, *bad]) == 2
    assert not (tmp_path / "runs").exists()


def test_checkpoint_of_another_model_is_refused_naming_both(tmp_path):
    tiny_model(layers=1, hidden=32).save_pretrained(tmp_path)
    models.load_model_weights(tiny_model(layers=1, hidden=32, seed=3), tmp_path)  # same: loads
    with pytest.raises(
        ValueError,
        match=r"checkpoint .* qwen2 \(hidden_size 32, "
        r"intermediate_size 128\), config qwen2 \(hidden_size 64,"
        r" intermediate_size 256\); resume with the run's own",
    ):
        models.load_model_weights(tiny_model(layers=1, hidden=64), tmp_path)


def test_resume_with_another_model_flag_exits_2(tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*TINY, "--steps", "1", "--run-dir", str(run)]) == 0
    assert main(["--resume", str(run), "--tiny-hidden", "64"]) == 2
    assert "--tiny-hidden 32 -> 64" in capsys.readouterr().err  # gspo.train.resume.check


def test_resume_hint_under_torchrun_names_torchrun(monkeypatch):
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert resume_command("runs/x") == "gspo train --resume runs/x"
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resume_command("runs/x") == "torchrun --nproc-per-node 4 -m gspo train --resume runs/x"
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert resume_command("runs/x") == (
        "torchrun --nnodes 2 --nproc-per-node 4 -m gspo train --resume runs/x"
    )


def test_config_json_is_written_when_training_starts(tmp_path):
    run = tmp_path / "run"
    config = TrainConfig(run_dir=str(run))
    rundir.create(run, config, World())
    assert json.loads((run / "config.json").read_text())["run_dir"] == str(run)
