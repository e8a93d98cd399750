"""Data parallel equivalence: 2 gloo ranks (DDP or FSDP2), each holding whole groups, give the
same gradient as one process on the whole batch, to 1e-5.

The bug this guards against: dividing each rank's loss by its *local* sequence count and then
letting DDP average over ranks gives a gradient world_size times too small (world_size^2 if
the count is also divided by world_size, as once in verl)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from gspo.train.config import TrainConfig
from gspo.train.rollout import Rollout
from gspo.train.tiny import tiny_model
from gspo.train.update import minibatch_loss

REPO = Path(__file__).resolve().parents[1]
B, G, P, T = 16, 4, 3, 5  # 4 groups: each of 2 ranks holds 2 whole groups


def make_batch(gpt2: bool = False, lora: bool = False):
    """A fixed batch: random tokens, ragged response masks, off-policy logp_old; the model is
    the tiny Qwen2, or a tiny GPT-2 (its blocks are ``transformer.h``, not ``layers``); with
    ``lora`` the Qwen2 with rank-4 adapters, B drawn at random (B = 0 gives A no gradient)."""
    gen = torch.Generator().manual_seed(0)
    model = tiny_gpt2() if gpt2 else tiny_model(layers=1, hidden=32, seed=0)
    if lora:
        from gspo.train.lora import wrap

        model = wrap(model, TrainConfig(lora_r=4))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_B." in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    ids = torch.randint(4, 50, (B, P + T), generator=gen)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    response_mask = torch.arange(T)[None, :] < lengths[:, None]
    attention = torch.cat([torch.ones(B, P, dtype=torch.long), response_mask.long()], dim=1)
    rollout = Rollout(
        prompts=[{"prompt": "x"}] * B, input_ids=ids, attention_mask=attention,
        response_mask=response_mask, prompt_len=P, completions=[""] * B,
    )  # fmt: skip
    from gspo.advantages import advantages

    adv = advantages(torch.rand(B, generator=gen), group_size=G)
    # logp_old = current logp shifted per sequence so some ratios leave [1-eps, 1+eps]
    from gspo.causal_lm import CausalLMLogprobs

    with torch.no_grad():
        logp = CausalLMLogprobs(model)(ids, attention)[:, P - 1 :]
    shift = (torch.rand(B, 1, generator=gen) - 0.5) * 0.02
    logp_old = torch.where(response_mask, logp + shift, torch.zeros_like(logp))
    ref_logp = torch.where(response_mask, logp - 0.1, torch.zeros_like(logp))
    return model, rollout, adv, logp_old, ref_logp


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=16,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return GPT2LMHeadModel(config)


CONFIG = TrainConfig(eps_low=0.003, eps_high=0.004, kl_coef=0.05)


def gradients(model, engine, rollout, adv, logp_old, ref_logp, rows, world_size):
    loss, _ = minibatch_loss(
        engine, rollout.select(rows), logp_old=logp_old[rows], adv=adv[rows],
        ref_logp=ref_logp[rows], config=CONFIG, world_size=world_size,
    )  # fmt: skip
    loss.backward()
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:  # LoRA's frozen base
            continue
        g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        out[name] = g.detach().clone()
    return out


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    """DDP, then FSDP2 on a fresh model, in one pair of processes (spawning is the slow part)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    from gspo.causal_lm import CausalLMLogprobs
    from gspo.train import distributed as dd

    world = dd.init("cpu")
    per = B // world_size
    rows = slice(rank * per, (rank + 1) * per)
    results = {}
    for mode in ("ddp", "fsdp2"):
        model, rollout, adv, logp_old, ref_logp = make_batch()
        engine = dd.wrap(CausalLMLogprobs(model), world, fsdp=mode == "fsdp2")
        results[mode] = gradients(model, engine, rollout, adv, logp_old, ref_logp, rows,
                                  world_size)  # fmt: skip
        model, rollout, adv, _, _ = make_batch()
        engine = dd.wrap(CausalLMLogprobs(model), world, fsdp=mode == "fsdp2")
        updated = updated_weights(model, engine, rollout.select(rows), adv[rows], world)
        results[mode + "-update"] = updated
        model, rollout, adv, logp_old, ref_logp = make_batch()  # bf16 compute
        engine = dd.wrap(CausalLMLogprobs(model, compute_dtype=torch.bfloat16), world,
                         fsdp=mode == "fsdp2")  # fmt: skip
        results[mode + "-bf16"] = gradients(model, engine, rollout, adv, logp_old, ref_logp,
                                            rows, world_size)  # fmt: skip
        model, rollout, adv, _, _ = make_batch()  # again, in micro-batches of <= 13 tokens
        engine = dd.wrap(CausalLMLogprobs(model), world, fsdp=mode == "fsdp2")
        results[mode + "-update-mb"] = updated_weights(model, engine, rollout.select(rows),
                                                       adv[rows], world, UPDATE_MB)  # fmt: skip
        for sign in (1.0, -1.0):
            model, rollout, _, _, _ = make_batch()
            engine = dd.wrap(CausalLMLogprobs(model), world, fsdp=mode == "fsdp2")
            results[f"{mode}-direction{sign:+.0f}"] = logp_change(engine, rollout.select(rows),
                                                                  sign, world)  # fmt: skip
    model, rollout, adv, logp_old, ref_logp = make_batch(gpt2=True)
    engine = dd.wrap(CausalLMLogprobs(model), world, fsdp=True)
    results["fsdp2-gpt2"] = gradients(model, engine, rollout, adv, logp_old, ref_logp, rows,
                                      world_size)  # fmt: skip
    for mode in ("ddp", "fsdp2"):  # LoRA: the adapters' gradients (the base is frozen)
        model, rollout, adv, logp_old, ref_logp = make_batch(lora=True)
        engine = dd.wrap(CausalLMLogprobs(model), world, fsdp=mode == "fsdp2")
        results[mode + "-lora"] = gradients(model, engine, rollout, adv, logp_old, ref_logp,
                                            rows, world_size)  # fmt: skip
    if rank == 0:
        torch.save(results, out)
    dd.shutdown(world)


UPDATE = TrainConfig(minibatches=2, max_grad_norm=0.05, lr=1e-2, warmup_steps=0)
# 13 tokens: 1 sequence (8 tokens) per micro-batch, sometimes 2 short ones; ranks may need
# different counts and then split further to match (FSDP2's collectives need equal counts)
UPDATE_MB = TrainConfig(minibatches=2, max_grad_norm=0.05, lr=1e-2, warmup_steps=0,
                        max_tokens_per_microbatch=13)  # fmt: skip


def updated_weights(model, engine, rollout, adv, world, config=UPDATE):
    """Parameters after one full ``update`` (2 minibatch AdamW steps, clipping active), built
    the way the loop builds its optimizer: from ``engine.parameters()`` after wrapping."""
    from gspo.train import distributed as dd
    from gspo.train.update import lr_lambda, update

    optimizer = torch.optim.AdamW(list(engine.parameters()), lr=UPDATE.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(0, 2, 0.1))
    history = update(engine, None, optimizer, scheduler, rollout, adv, config=config,
                     world_size=world.size)  # fmt: skip
    assert all(h["grad_norm"] > config.max_grad_norm for h in history)  # clipping acted
    return dd.full_state_dict(model, world)


DIRECTION = TrainConfig(minibatches=1, lr=1e-3, max_grad_norm=1e9)


def logp_change(engine, rollout, sign, world) -> float:
    """Change of the summed response log-prob of all ranks' sequences after one on-policy
    update with advantage ``sign`` on every sequence."""
    from gspo.train import distributed as dd
    from gspo.train.update import response_logprobs, update

    def total() -> float:
        with torch.no_grad():
            logp, _ = response_logprobs(engine, rollout, temperature=1.0)
        return dd.all_sum([float(logp.sum())], world)[0]

    # The optimizer first: after a root forward FSDP2 keeps the root's parameters gathered,
    # and .parameters() would then give temporary tensors that the step never writes back.
    optimizer = torch.optim.AdamW(list(engine.parameters()), lr=DIRECTION.lr)
    before = total()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    adv = torch.full((len(rollout),), sign)
    update(engine, None, optimizer, scheduler, rollout, adv, config=DIRECTION,
           world_size=world.size)  # fmt: skip
    return total() - before


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_gradients(tmp_path_factory):
    out = tmp_path_factory.mktemp("grads") / "grads.pt"
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return torch.load(out)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2", "fsdp2-gpt2", "ddp-lora", "fsdp2-lora"])
def test_two_ranks_give_the_single_process_gradient(two_rank_gradients, mode):
    from gspo.causal_lm import CausalLMLogprobs

    model, rollout, adv, logp_old, ref_logp = make_batch(gpt2=mode.endswith("gpt2"),
                                                         lora=mode.endswith("lora"))  # fmt: skip
    assert adv.abs().sum() > 0
    expected = gradients(model, CausalLMLogprobs(model), rollout, adv, logp_old, ref_logp,
                         slice(0, B), world_size=1)  # fmt: skip
    got = two_rank_gradients[mode]
    assert set(got) == set(expected)
    for name, g in expected.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(got[name], g, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_ranks_in_bf16_stay_within_the_rounding_bound(two_rank_gradients, mode):
    """DDP under autocast, FSDP2 with MixedPrecisionPolicy(bf16 params, fp32 reduction): the
    fp32 gradients (master weights) are within 32 u = 12.5% of the fp32 run's, normwise (the
    bound of test_train_update.check_bf16_step), and not equal to it (bf16 ran)."""
    from gspo.causal_lm import CausalLMLogprobs

    model, rollout, adv, logp_old, ref_logp = make_batch()
    expected = gradients(model, CausalLMLogprobs(model), rollout, adv, logp_old, ref_logp,
                         slice(0, B), world_size=1)  # fmt: skip
    got = two_rank_gradients[mode + "-bf16"]
    assert all(g.dtype == torch.float32 for g in got.values())
    flat_got = torch.cat([got[n].flatten() for n in expected])
    flat_want = torch.cat([g.flatten() for g in expected.values()])
    err = (flat_got - flat_want).norm()
    assert 0 < err <= 2.0**-3 * flat_want.norm(), float(err / flat_want.norm())


@pytest.mark.parametrize("mode", ["ddp", "fsdp2", "ddp-mb", "fsdp2-mb"])
def test_two_ranks_take_the_single_process_update_step(two_rank_gradients, mode):
    """Whole update(): old log-probs, 2 minibatches, grad clipping, AdamW. Once failed for
    FSDP2 because the optimizer held the root group's temporary unsharded tensors, so the
    embeddings never trained and clipping ignored their gradient."""
    from gspo.causal_lm import CausalLMLogprobs
    from gspo.train.distributed import World

    model, rollout, adv, _, _ = make_batch()
    # rank r holds rows 8r..8r+7 and its minibatch k is rows 8r+4k..8r+4k+3; the single
    # process sees each global minibatch (both ranks' slices) as one contiguous slice
    order = torch.tensor([0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15])
    single = Rollout(
        prompts=[rollout.prompts[i] for i in order], input_ids=rollout.input_ids[order],
        attention_mask=rollout.attention_mask[order], response_mask=rollout.response_mask[order],
        prompt_len=P, completions=[""] * B,
    )  # fmt: skip
    expected = updated_weights(model, CausalLMLogprobs(model), single, adv[order], World())
    # "-mb": each rank in micro-batches of <= 13 tokens, against the unsplit single process
    got = two_rank_gradients[mode.replace("-mb", "") + "-update" + ("-mb" if "mb" in mode else "")]
    assert set(got) == set(expected)
    start = tiny_model(layers=1, hidden=32, seed=0).state_dict()
    assert not torch.equal(
        expected["model.embed_tokens.weight"], start["model.embed_tokens.weight"]
    )
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_ranks_move_the_log_prob_with_the_advantage(two_rank_gradients, mode):
    """Advantage +1 on every sequence raises their summed log-prob, -1 lowers it (about 0.14
    nats per sequence here, as in one process); a sign flip in the rank scaling or the engine
    reverses it."""
    up, down = two_rank_gradients[mode + "-direction+1"], two_rank_gradients[mode + "-direction-1"]
    from gspo.causal_lm import CausalLMLogprobs
    from gspo.train.distributed import World

    assert up > 0.1 and down < -0.1, (up, down)
    for sign, got in ((1.0, up), (-1.0, down)):  # and by as much as one process on all 16
        model, rollout, _, _, _ = make_batch()
        single = logp_change(CausalLMLogprobs(model), rollout, sign, World())
        assert got == pytest.approx(single, abs=1e-3), (sign, got, single)


def torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(free_port()), "-m", "gspo", "train", *args]  # fmt: skip
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def run_and_resume(tmp_path, args: list[str]) -> tuple[Path, Path]:
    """A 4-step torchrun run with ``args`` (checkpoints at steps 2 and 4), and a copy of its
    directory without the step-4 checkpoint and the final model, resumed from step 2.
    Returns the straight run's directory and the resumed run's."""
    import shutil

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    done = torchrun([*args, "--steps", "4", "--checkpoint-every", "2",
                     "--run-dir", str(straight)], tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000004")
    shutil.rmtree(resumed / "model")
    again = torchrun(["--resume", str(resumed)], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    return straight, resumed


def straight_and_resumed(tmp_path, args: list[str]):
    """``run_and_resume``: the final weights agree to 1e-6 and every step's reward_mean is
    equal. Returns the straight run's directory, the resumed run's rows and the straight
    run's rows."""
    from safetensors.torch import load_file

    straight, resumed = run_and_resume(tmp_path, args)
    a = load_file(straight / "model" / "model.safetensors")
    b = load_file(resumed / "model" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
    second, first = (
        [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        for d in (resumed, straight)
    )
    assert [r.get("reward_mean") for r in second] == [r.get("reward_mean") for r in first]
    return straight, second, first


TINY = ["--tiny-hidden", "32", "--tiny-layers", "1", "--prompts-per-step", "4",
        "--group-size", "4", "--minibatches", "2", "--max-new-tokens", "4",
        "--eval-prompts", "4", "--eval-every", "2", "--no-progress", "--no-plot"]  # fmt: skip


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_torchrun_two_ranks_train_stop_and_resume(tmp_path, fsdp):
    """The whole loop under torchrun: sampling (synced under FSDP2), checkpoints of sharded
    state, and a resume on the same number of ranks that reproduces the straight run."""
    extra = ["--fsdp"] if fsdp else []
    straight, rows, first = straight_and_resumed(tmp_path, [*TINY, *extra])
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    # the 2-rank checkpoint resumes on 1 process too (DCP reshards the optimizer state)
    import shutil

    single = tmp_path / "single"
    shutil.copytree(straight, single)
    shutil.rmtree(single / "checkpoints" / "step-000004")
    shutil.rmtree(single / "model")
    assert_full_optimizer_state(single / "checkpoints" / "step-000002", steps=2 * 2)
    alone = subprocess.run(
        [sys.executable, "-m", "gspo", "train", "--resume", str(single), "--no-fsdp"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )  # fmt: skip
    assert alone.returncode == 0, alone.stderr[-3000:]
    rows = [json.loads(x) for x in (single / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[:3] == first[:3]  # the steps before the checkpoint are kept as they were


def test_torchrun_fsdp2_lora_stops_and_resumes_exactly(tmp_path):
    """LoRA under FSDP2 (adapters sharded with the frozen base; the adapter, the optimizer
    and the merged weights gathered for checkpoints, outputs and the sampler): a copy
    resumed from step 2 ends with the straight run's adapter and merged model."""
    import shutil

    from safetensors.torch import load_file

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    done = torchrun([*TINY, "--fsdp", "--lora-r", "4", "--kl-coef", "0.1", "--merge",
                     "--steps", "3", "--checkpoint-every", "2", "--run-dir", str(straight)],
                    tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    shutil.copytree(straight, resumed)
    for gone in ("checkpoints/step-000003", "model", "merged"):
        shutil.rmtree(resumed / gone)
    again = torchrun(["--resume", str(resumed)], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    for file in ("model/adapter_model.safetensors", "merged/model.safetensors"):
        a, b = load_file(straight / file), load_file(resumed / file)
        assert set(a) == set(b), file
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)


def assert_full_optimizer_state(path: Path, steps: int) -> None:
    """One process loads a 2-rank checkpoint's AdamW state: every parameter's moments come
    back whole (full shape, not one rank's shard), with the step count of the saving run."""
    from transformers import AutoModelForCausalLM

    from gspo.causal_lm import CausalLMLogprobs
    from gspo.train import distributed as dd

    model = AutoModelForCausalLM.from_pretrained(path)
    engine = CausalLMLogprobs(model)
    optimizer = torch.optim.AdamW(list(engine.parameters()), lr=1e-3)
    dd.load_optimizer(engine, optimizer, path / "optimizer", dd.World())
    for name, p in engine.named_parameters():
        state = optimizer.state[p]
        assert state["exp_avg"].shape == p.shape, name
        assert float(state["step"]) == steps, name
        assert state["exp_avg_sq"].abs().sum() > 0, name


def _tiny_hf(kind: str):
    import transformers as tf

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                 num_attention_heads=2)  # fmt: skip
    configs = {
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=3,
                                                         n_head=2, n_positions=16)),
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**small)),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**small)),
        "gpt_neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**small)),
    }  # fmt: skip
    return configs[kind]()


BLOCKS = {"gpt2": "transformer.h", "llama": "model.layers", "qwen2": "model.layers",
          "gpt_neox": "gpt_neox.layers"}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(BLOCKS))
def test_fsdp_finds_the_decoder_blocks_of_common_architectures(kind):
    """The bug: --fsdp looked only for a ModuleList named 'layers' and refused GPT-2."""
    from gspo.causal_lm import CausalLMLogprobs
    from gspo.train.distributed import decoder_layers

    model = _tiny_hf(kind)
    expected = list(model.get_submodule(BLOCKS[kind]))
    found = decoder_layers(CausalLMLogprobs(model))
    assert len(found) == 3 and all(a is b for a, b in zip(found, expected, strict=True))


def test_fsdp_without_repeated_blocks_finds_none():
    from gspo.train.distributed import decoder_layers

    other = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ModuleList([torch.nn.ReLU()]))
    assert decoder_layers(other) == []  # one parameter-free ReLU: nothing worth sharding
    assert decoder_layers(torch.nn.Linear(2, 2)) == []
