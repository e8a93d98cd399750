"""Run directories and resume: a non-empty RUN_DIR is not reused without --resume, a launch
that fails before training leaves nothing behind, a checkpoint of another model (or of
FSDP2 shards in one process) is refused with what to do, and the resume hint names torchrun."""

from __future__ import annotations

import json
import os

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
    rundir.release(run)
    (run / "metrics.jsonl").write_text('{"step": 0}\n')
    with pytest.raises(
        ValueError,
        match=rf"--run-dir '{run}' is not empty \(it holds "
        rf"metrics.jsonl\); continue that run with --resume",
    ):
        rundir.resolve(TrainConfig(run_dir=str(run)), World())
    assert rundir.resolve(TrainConfig(resume=str(run)), World()) == run
    rundir.release(run)
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]  # the lock is gone


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
    assert rundir.resolve(config, World()) == run and run.is_dir()  # claimed at launch
    rundir.create(run, config, World())
    rundir.release(run)
    assert json.loads((run / "config.json").read_text())["run_dir"] == str(run)


def test_two_launches_in_the_same_second_get_two_run_dirs(tmp_path, monkeypatch):
    # Both took runs/<timestamp>: metrics interleaved and one died with FileNotFoundError.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(rundir.time, "strftime", lambda fmt: "20261205-063000")
    first = rundir.resolve(TrainConfig(), World())
    second = rundir.resolve(TrainConfig(), World())
    assert (first.name, second.name) == ("20261205-063000", "20261205-063000-2")
    assert first.is_dir() and second.is_dir()
    for path in (first, second):
        rundir.release(path)  # nothing started in them: removed
    assert not any((tmp_path / "runs").iterdir())


def test_a_run_dir_a_live_run_holds_is_refused_and_a_stale_lock_is_not(tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*TINY, "--steps", "1", "--run-dir", str(run)]) == 0
    assert rundir.resolve(TrainConfig(resume=str(run)), World()) == run  # a live run again
    fresh = tmp_path / "fresh"
    assert rundir.resolve(TrainConfig(run_dir=str(fresh)), World()) == fresh  # and another
    for flags in (["--run-dir", str(fresh)], ["--resume", str(run)], ["--run-dir", str(run)]):
        assert main([*TINY, "--steps", "2", *flags]) == 2
        err = capsys.readouterr().err
        assert f"' is in use by a live run (pid {os.getpid()} on" in err, err
        assert "Traceback" not in err
    rundir.release(run)
    rundir.release(fresh)
    assert main([*TINY, "--steps", "2", "--resume", str(run)]) == 0  # free again
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / rundir.LOCK).write_text("pid 1 on a killed launch\n")  # no process holds it
    assert main([*TINY, "--steps", "1", "--run-dir", str(stale)]) == 0
    assert not (stale / rundir.LOCK).exists() and (stale / "metrics.jsonl").exists()


def test_an_unwritable_run_dir_exits_2_before_the_model_loads(tmp_path, monkeypatch, capsys):
    # It failed with a traceback after the model loaded and step 0's evaluation ran.
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setattr(models, "build", lambda config: pytest.fail("the model loaded"))
    bad = tmp_path / "file" / "run"
    assert main([*TINY, "--steps", "1", "--run-dir", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write '{bad}'" in err and "Traceback" not in err


def test_an_os_error_on_a_run_file_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    from gspo.train import checkpoint

    def full_disk(run_dir, *args, **kwargs):
        raise OSError(28, "No space left on device", str(run_dir / "checkpoint-1"))

    monkeypatch.setattr(checkpoint, "save", full_disk)
    run = tmp_path / "run"
    assert main([*TINY, "--steps", "1", "--checkpoint-every", "1", "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"gspo train: error: {run / 'checkpoint-1'}: No space left on device" in err
    assert "Traceback" not in err
