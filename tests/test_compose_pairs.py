"""Pairs of settings run together (docs/settings.md, "Every pair of settings"): each test
turns on several features at once at tiny sizes and checks what must hold for all of them
together: a run stopped after step 2 and resumed equals the straight one (weights and every
metric, so any state a feature holds is saved and restored), the ratio of the first
minibatch is 1 on policy, and each feature did its work (truncated episodes dropped,
lengths penalised, top-p's log-probs the trainer's, the warm start ran once).

The table's cells name these tests for the pairs no narrower test covers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gspo.train.cli import main, parse_config
from gspo.train.loop import train
from test_train_e2e import TINY, rows

VOLATILE = ("time", "step_time", "tokens_per_s")  # wall-clock metrics


def _warm_start_file(tmp_path: Path) -> str:
    path = tmp_path / "demos.jsonl"
    lines = [json.dumps({"messages": [{"role": "user", "content": f"sum {i}{i}:"},
                                      {"role": "assistant", "content": str(2 * i)}]})
             for i in range(8)]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _saved(run: Path) -> dict[str, torch.Tensor]:
    model = run / "model"
    name = "adapter_model.safetensors" if (model / "adapter_model.safetensors").exists() \
        else "model.safetensors"  # fmt: skip
    return load_file(model / name)


def _kept(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(VOLATILE)}


def straight_and_resumed(tmp_path: Path, args: list[str]) -> list[dict]:
    """A 4-step run with ``args`` and the same run stopped after step 2 and resumed: equal
    weights (bit for bit) and equal metrics lines; the straight run's rows."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    common = [*args, "--steps", "4", "--checkpoint-every", "10", "--no-plot"]
    train(parse_config([*common, "--run-dir", str(straight)])[0])
    assert train(parse_config([*common, "--run-dir", str(stopped)])[0], stop_after=2)["step"] == 2
    assert main(["--resume", str(stopped)]) == 0
    a, b = _saved(straight), _saved(stopped)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = rows(straight), rows(stopped)
    assert [_kept(r) for r in ra] == [_kept(r) for r in rb]
    return ra


def torchrun_straight_and_resumed(tmp_path: Path, args: list[str], *,
                                  atol: float = 1e-6) -> list[dict]:  # fmt: skip
    """``test_train_distributed.run_and_resume`` with ``args`` (2 torchrun ranks, 4 steps,
    resumed from step 2): weights (the model or the LoRA adapter) within ``atol``, every
    step's reward_mean equal; the straight run's rows."""
    from test_train_distributed import run_and_resume

    straight, resumed = run_and_resume(tmp_path, args)
    a, b = _saved(straight), _saved(resumed)
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=atol, msg=name)
    first, second = rows(straight), rows(resumed)
    assert [r.get("reward_mean") for r in second] == [r.get("reward_mean") for r in first]
    return first


ENV = ["--env", "test_train_envs:Digits", "--max-turns", "2"]
HYGIENE = ["--mask-truncated", "--overlong-penalty", "2"]


def test_hf_env_hygiene_dynamic_sampling_lora_top_p_prefix_warm_start_resume(tmp_path):
    """--env with --mask-truncated, --overlong-penalty, --dynamic-sampling, LoRA, top-p,
    --shared-prefix and --warm-start, on the HF engine in one process: a resumed run
    equals the straight one, one minibatch per step has ratio 1, the sampler's top-p
    log-probs are the trainer's, truncated episodes leave the loss."""
    records = straight_and_resumed(tmp_path, [
        *TINY, *ENV, *HYGIENE, "--dynamic-sampling", "--max-sampling-rounds", "2",
        "--lora-r", "4", "--lr", "1e-2", "--top-p", "0.9", "--shared-prefix",
        "--minibatches", "1", "--warm-start", _warm_start_file(tmp_path),
        "--warm-start-lr", "1e-3", "--seed", "3"])  # fmt: skip
    assert records[0]["warm_start_loss"] > 0
    stepped = [r for r in records[1:] if r["ratio_min"] == r["ratio_min"]]  # not NaN
    assert stepped, records  # a step whose sequences were all masked logs NaN, not 1
    for r in stepped:
        assert r["ratio_min"] == r["ratio_max"] == 1.0, r
    for r in records[1:]:
        assert r["mismatch_max_abs"] < 1e-5 and r["turns_per_episode"] > 1, r
    assert any(r["truncated_frac"] > 0 for r in records[1:])  # so the masking had work


def test_hf_async_env_hygiene_top_p_prefix_bf16_warm_start_resume(tmp_path):
    """--async-rollouts (HF: the sampler's own copy) with --env, --mask-truncated,
    --overlong-penalty, top-p, --shared-prefix, --dtype bf16 (with the trainer's old
    log-probs: the sampler's are refused under bf16) and --warm-start: a resumed run
    equals the straight one and batches after the first lag one update."""
    records = straight_and_resumed(tmp_path, [
        *TINY, *ENV, *HYGIENE, "--async-rollouts", "--top-p", "0.9", "--shared-prefix",
        "--dtype", "bf16", "--old-logprobs", "trainer", "--minibatches", "1",
        "--warm-start", _warm_start_file(tmp_path), "--warm-start-lr", "1e-3",
        "--seed", "4"])  # fmt: skip
    assert [r["policy_lag"] for r in records[1:]] == [0, 1, 1, 1]
    assert records[0]["warm_start_loss"] > 0
    stepped = [r for r in records[1:] if r["ratio_min"] == r["ratio_min"]]  # not NaN
    assert stepped, records
    for r in stepped:
        assert r["ratio_min"] == r["ratio_max"] == 1.0, r  # old log-probs: the bf16 policy's
    assert all(r["turns_per_episode"] > 1 for r in records[1:])


def test_vllm_env_async_hygiene_top_p_lora_prefix_warm_start_resume(tmp_path):
    """vLLM in one process with --env, --async-rollouts (one step off, the sampler's
    log-probs as the old policy), --mask-truncated, --overlong-penalty, top-p, LoRA,
    --shared-prefix and --warm-start: a resumed run equals the straight one (the pending
    batch restored from the checkpoint) and batches after the first lag one update."""
    pytest.importorskip("vllm")
    from test_train_vllm import TINY as VLLM

    records = straight_and_resumed(tmp_path, [
        *VLLM, *ENV, *HYGIENE, "--async-rollouts", "--top-p", "0.9", "--lora-r", "4",
        "--lr", "1e-2", "--shared-prefix", "--warm-start", _warm_start_file(tmp_path),
        "--warm-start-lr", "1e-3", "--seed", "5"])  # fmt: skip
    assert [r["policy_lag"] for r in records[1:]] == [0, 1, 1, 1]
    assert any(r["ratio_min"] == r["ratio_min"] for r in records[1:])  # a step trained
    assert all(r["turns_per_episode"] > 1 for r in records[1:])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_vllm_device_env_hygiene_dynamic_sampling_top_p_lora_prefix_warm_start_resume(
        tmp_path, dtype):  # fmt: skip
    """The engine in a process of its own (--vllm-device cpu: weights reach it through
    files) with --env, --mask-truncated, --overlong-penalty, --dynamic-sampling, top-p,
    LoRA (the merged weights pushed), --shared-prefix, --warm-start and each --dtype: a
    resumed run equals the straight one (the engine's batch seeds come from the trainer's
    checkpointed RNG). fp32 trains on the sampler's log-probs: ratio 1 and sampler-trainer
    mismatch at float rounding (a stale engine gives 0.1-2). bf16 trains on the trainer's
    (the sampler's are refused under bf16): ratio exactly 1, the mismatch bf16's."""
    pytest.importorskip("vllm")
    from test_train_vllm import TINY as VLLM

    old = "sampler" if dtype == "fp32" else "trainer"
    records = straight_and_resumed(tmp_path, [
        *VLLM, "--vllm-device", "cpu", *ENV, *HYGIENE, "--dynamic-sampling",
        "--max-sampling-rounds", "2", "--top-p", "0.9", "--lora-r", "4", "--lr", "1e-2",
        "--shared-prefix", "--dtype", dtype, "--old-logprobs", old, "--minibatches", "1",
        "--warm-start", _warm_start_file(tmp_path), "--warm-start-lr", "1e-3",
        "--seed", "6"])  # fmt: skip
    assert records[0]["warm_start_loss"] > 0
    assert all(r["turns_per_episode"] > 1 for r in records[1:])
    assert any(r["truncated_frac"] > 0 for r in records[1:])  # so the masking had work
    # a step whose episodes were all truncated logs NaN ratios (and, on the sampler's
    # log-probs, no mismatch): nothing of it reached the loss
    stepped = [r for r in records[1:] if r["ratio_min"] == r["ratio_min"]]  # not NaN
    assert stepped, records
    for r in stepped:
        if dtype == "fp32":  # measured: k3 ~3e-14, ratios 1 - 2e-7
            assert r["mismatch_k3"] < 1e-8 and r["mismatch_max_abs"] < 1e-5, r
            assert 1 - 1e-5 < r["ratio_min"] <= r["ratio_max"] < 1 + 1e-5, r
        else:  # the fp32 engine against the bf16 policy, measured: k3 ~9e-7
            assert 1e-8 < r["mismatch_k3"] < 1e-5, r
            assert r["ratio_min"] == r["ratio_max"] == 1.0, r


def test_env_on_a_tensor_parallel_vllm_engine_under_torchrun(tmp_path):
    """--env with --vllm-tp 2 on 2 torchrun ranks (one engine over both, gloo on CPU),
    with top-p, --mask-truncated, --overlong-penalty and --dynamic-sampling: every turn
    gathers the group's episodes and shares its seed, the ranks take as many turns as the
    longest episode needs, the sampler agrees with each rank's trainer, and a run resumed
    from step 2 equals the straight one."""
    pytest.importorskip("vllm")
    import inspect

    from test_scaleout_vllm import assert_agree
    from test_scaleout_vllm import straight_and_resumed as torchrun_resumed
    from test_train_envs import Digits

    (tmp_path / "myenv.py").write_text(inspect.getsource(Digits))
    records = torchrun_resumed(tmp_path, [
        "--vllm-tp", "2", "--env", "myenv:Digits", "--max-turns", "2", "--top-p", "0.9",
        *HYGIENE, "--dynamic-sampling", "--max-sampling-rounds", "2"])  # fmt: skip
    assert len(records) == 5
    for r in records[1:]:
        assert_agree(r)
        assert r["turns_per_episode"] > 1, r


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_tensor_parallel_vllm_async_bf16_lora_prefix_warm_start_resume(tmp_path, fsdp):
    """One vLLM engine over 2 torchrun ranks (--vllm-tp 2, gloo on CPU), under DDP or
    FSDP2, with --async-rollouts, --dtype bf16 (the trainer's old log-probs: the sampler's
    are refused under bf16), LoRA (the merged weights pushed to both halves of the engine),
    top-p, --shared-prefix and --warm-start: batches after the first lag one update, the
    first minibatch's ratio is 1, and a run resumed from step 2 equals the straight one."""
    pytest.importorskip("vllm")
    from test_scaleout_vllm import TINY as VLLM

    extra = ["--fsdp"] if fsdp else []
    records = torchrun_straight_and_resumed(tmp_path, [
        *VLLM, *extra, "--vllm-tp", "2", "--async-rollouts", "--dtype", "bf16",
        "--old-logprobs", "trainer", "--lora-r", "4", "--lr", "1e-2", "--top-p", "0.9",
        "--shared-prefix", "--minibatches", "1", "--warm-start", _warm_start_file(tmp_path),
        "--warm-start-lr", "1e-3"], atol=0)  # fmt: skip
    assert records[0]["warm_start_loss"] > 0
    assert [r["policy_lag"] for r in records[1:]] == [0, 1, 1, 1]
    for r in records[1:]:
        assert r["ratio_min"] == r["ratio_max"] == 1.0, r  # old log-probs: the bf16 policy's


def test_vllm_async_bf16_two_minibatches_resume_bit_for_bit(tmp_path):
    """--async-rollouts on vLLM under torchrun, --dtype bf16, --old-logprobs trainer and 2
    minibatches: a run resumed from step 2 ends with the straight run's weights bit for bit.
    The resumed run's step 3 updates while the sampler thread generates batch 4; the straight
    run's updated with the thread idle (batch 4 was done during step 2's evaluation and
    checkpoint). With AdamW's default (foreach) step that overlap alone changed the last bit
    of the weights (vLLM's generation sets torch.compiler.is_compiling() for every thread:
    gspo.train.loop._optimizer); bf16's second minibatch grew it to 1.3e-4 by step 4 (step
    4's loss 4.0e-4, straight 3.4e-4). The fused step: 0."""
    pytest.importorskip("vllm")
    from test_scaleout_vllm import TINY as VLLM

    torchrun_straight_and_resumed(tmp_path, [
        *VLLM, "--async-rollouts", "--dtype", "bf16", "--old-logprobs", "trainer",
        "--minibatches", "2"], atol=0)  # fmt: skip


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_ranks_with_top_p_bf16_prefix_and_warm_start_resume_exactly(tmp_path, fsdp):
    """2 gloo ranks under torchrun (DDP, or FSDP2) with top-p, --dtype bf16,
    --shared-prefix and --warm-start: a run resumed from step 2 equals the straight one
    (weights to 1e-6, every reward_mean)."""
    from test_train_distributed import TINY as TORCHRUN
    from test_train_distributed import straight_and_resumed as torchrun_resumed

    extra = ["--fsdp"] if fsdp else []
    _, records, _ = torchrun_resumed(tmp_path, [
        *TORCHRUN, *extra, "--top-p", "0.9", "--dtype", "bf16", "--shared-prefix",
        "--warm-start", _warm_start_file(tmp_path), "--warm-start-lr", "1e-3"])  # fmt: skip
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    assert records[0]["warm_start_loss"] > 0


@pytest.mark.parametrize(("options", "why"), [
    ({"env": "calculator", "fsdp": True}, "multi-turn episodes run under DDP or one process"),
    ({"tools": "m:f", "fsdp": True}, "multi-turn episodes run under DDP or one process"),
    ({"vllm_tp": 2}, "tensor-parallel sampling is vLLM's: add --rollout vllm"),
    ({"vllm_device": "cpu"}, "it places vLLM's engine: add --rollout vllm"),
    ({"async_rollouts": True, "dynamic_sampling": True}, "the data position of a refill"),
    ({"async_rollouts": True, "lora_r": 4}, "the sampler's copy would hold the adapters"),
    ({"async_rollouts": True, "fsdp": True}, "the sampler's copy would be a whole model"),
    ({"async_rollouts": True, "dtype": "bf16"}, "under --dtype bf16 the sampler's log-probs"),
])  # fmt: skip
def test_refused_pairs_say_why(options, why):
    from gspo.train.config import TrainConfig

    with pytest.raises(ValueError, match=why):
        TrainConfig(**options)


def test_vllm_device_with_a_tensor_parallel_engine_is_refused():
    """--vllm-tp K > 1 needs K torchrun ranks (the engine's group), where --vllm-device
    is refused: each rank's engine runs in the rank's own process."""
    pytest.importorskip("vllm")
    from gspo.train.config import SamplingConfig
    from gspo.train.distributed import World
    from gspo.train.engines.vllm import VLLMEngine

    for size in (1, 2):
        sampling = SamplingConfig(rollout="vllm", vllm_tp=2, vllm_device="cpu")
        why = "must split into groups of 2" if size == 1 else "under torchrun each rank"
        with pytest.raises(ValueError, match=why):
            VLLMEngine.for_run(sampling, None, World(rank=0, size=size), None, seed=0)
