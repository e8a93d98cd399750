"""`gspo eval`'s defaults are ones a user can wait for (issue 16, item 10): the task's own
answer length, 4 samples, vLLM when installed, a bar over every completion with the time
left; and a training config is still asked exactly as it trained.

main: 256 new tokens and 8 samples per question on HF generate for every task (arith's
answers take 32): 400 arith questions ran for hours on 2 cores with no time estimate."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

from gspo.train import evaluate as ev
from gspo.train.tasks import TASKS


def test_the_task_gives_the_length_unless_a_flag_does():
    lengths = {name: TASKS[name].max_new_tokens for name in ("arith", "digitsum", "copy")}
    assert lengths == {"arith": 32, "digitsum": 6, "copy": 6}
    assert ev.EvalConfig().max_new_tokens == 32  # arith, the default task (main: 256)
    assert ev.EvalConfig(task="digitsum").max_new_tokens == 6  # main: 256
    assert ev.EvalConfig(task="digitsum", max_new_tokens=9).max_new_tokens == 9
    assert ev.parse_config(["--task", "digitsum"]).max_new_tokens == 6
    assert ev.parse_config(["--task", "digitsum", "--max-new-tokens", "40"]).max_new_tokens == 40
    config = ev.EvalConfig(task="copy")
    assert config.replace(n=0).max_new_tokens == 6  # a copy keeps its sampling concern
    assert ev.EvalConfig().n == 4  # main: 8


def test_the_engine_is_vllm_when_installed(monkeypatch):
    installed = importlib.util.find_spec("vllm") is not None
    assert ev.EvalConfig().rollout == ("vllm" if installed else "hf")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert ev.EvalConfig().rollout == "hf"
    assert ev.parse_config(["--engine", "vllm"]).rollout == "vllm"
    # calls as large as each engine batches well (vLLM: 6 questions a call took 1.5x the
    # time of 20, SmolLM2 on CPU), unless given
    assert ev.EvalConfig(engine="vllm").sequences_per_call == 128
    assert ev.EvalConfig(engine="hf").sequences_per_call == 32
    assert ev.EvalConfig(engine="vllm", batch_size=8).sequences_per_call == 8


def test_a_training_config_is_asked_as_it_trained(tmp_path):
    """A recipe that leaves max_new_tokens and rollout out trained with gspo train's
    defaults (6 tokens, hf): eval asks with those, not with its own (main: 256)."""
    recipe = tmp_path / "r.toml"
    recipe.write_text('model = "tiny"\ntask = "arith"\ntemperature = 0.7\n')
    config = ev.parse_config(["--config", str(recipe)])
    assert (config.max_new_tokens, config.rollout, config.temperature) == (6, "hf", 0.7)
    config = ev.parse_config(["--config", str(recipe), "--max-new-tokens", "32"])
    assert config.max_new_tokens == 32  # a flag given here still wins


def test_progress_counts_every_completion_with_the_time_left(capsys):
    """3 questions x (1 greedy + 3 samples) = 12 completions, asked 2 questions per call
    (batch_size 8 // 4): the bar's total is 12 and it shows an ETA."""
    calls = []

    class Sampler:
        def sample(self, prompts, *, group_size, greedy):
            calls.append((len(prompts), group_size, greedy))
            rows = [p for p in prompts for _ in range(group_size)]
            return SimpleNamespace(prompts=rows, completions=["Answer: 2"] * len(rows),
                                   episodes=None)  # fmt: skip

    questions = [{"prompt": f"p{i}", "question": "1+1", "answer": "2"} for i in range(3)]
    config = ev.EvalConfig(n=3, batch_size=8)
    summary, records = ev.evaluate(None, None, questions, config, Sampler())
    assert calls == [(2, 1, True), (2, 3, False), (1, 1, True), (1, 3, False)]
    assert summary["greedy_accuracy"] == 1.0 and all(len(r["samples"]) == 3 for r in records)
    err = capsys.readouterr().err
    assert "0/12" in err and "<?" in err  # tqdm: done/total [elapsed<remaining]
    ev.evaluate(None, None, questions, config.replace(progress=False), Sampler())
    assert capsys.readouterr().err == ""
