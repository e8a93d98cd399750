"""Tasks behind one class and a registry: a task registered at run time (here, from a test)
is a choice of `gspo train --task` and `gspo eval --task`, and trains and evaluates like a
built-in one; the config's loss names are gspo_loss's variants."""

from __future__ import annotations

import json

import pytest

from gspo.train.tasks import TASKS, Task, register


class Vowels(Task):
    """Write vowels: the reward is the share of the completion's characters that are."""

    name = "vowels"

    def prompts(self, n, seed, levels=()):
        return [{"prompt": f"vowels {i % 10}:", "index": i} for i in range(seed, seed + n)]

    def reward(self, prompts, completions, **fields):
        return [sum(c in "aeiou" for c in text) / max(len(text), 1) for text in completions]


@pytest.fixture
def vowels():
    task = register(Vowels())
    yield task
    del TASKS[task.name]


def test_a_registered_task_is_a_choice_of_train_and_eval(vowels, tmp_path, capsys):
    from gspo.cli import main

    assert "vowels" in TASKS and "vowels" not in {"digitsum", "copy", "arith"}
    run = tmp_path / "run"
    args = ["train", "--task", "vowels", "--steps", "2", "--tiny-layers", "1", "--tiny-hidden",
            "32", "--prompts-per-step", "4", "--group-size", "2", "--minibatches", "1",
            "--eval-prompts", "2", "--eval-every", "2", "--run-dir", str(run), "--no-progress",
            "--no-plot"]  # fmt: skip
    assert main(args) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and 0 <= rows[-1]["eval_reward"] <= 1
    samples = json.loads((run / "samples.jsonl").read_text().splitlines()[0])
    assert samples["prompt"].startswith("vowels ")  # the task's own prompts were sampled
    capsys.readouterr()
    assert main(["eval", "--task", "vowels", "--model", "tiny", "--questions", "3", "-n", "0",
                 "--max-new-tokens", "3", "--engine", "hf",
                 "--out", str(tmp_path / "c.jsonl")]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["questions"] == 3


def test_an_unregistered_task_is_refused_with_the_choices(capsys):
    from gspo.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "--task", "vowels"])
    assert exc.value.code == 2
    assert "'vowels' is not one of ['digitsum', 'copy', 'arith', 'wordproblems']" in capsys.readouterr().err


def test_task_levels_and_rows_follow_the_task_s_own_declarations(vowels):
    from gspo.train.config import TrainConfig

    with pytest.raises(ValueError, match="only --task arith has levels"):
        TrainConfig(task="vowels", task_levels=(1,))
    with pytest.raises(ValueError, match="your prompts need your reward"):
        TrainConfig(task="vowels", prompts="rows.jsonl")


def test_the_config_s_loss_names_are_the_registry_s():
    """--loss's help and checks read the registry: every name is accepted, one outside it is
    refused with the list."""
    from gspo.objectives import names
    from gspo.train.config import TrainConfig

    for name in names():
        assert TrainConfig(loss=name).objective.gspo_loss_options()["variant"] == name
    with pytest.raises(ValueError, match=r"'loss' = 'ppo' must be one of \['gspo'"):
        TrainConfig(loss="ppo")
