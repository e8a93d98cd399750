"""The GSPO training loop, top to bottom.

Launch:
    gspo train                                   # built-in: tiny Qwen2 learns digit sums (CPU)
    gspo train --model ./my-hf-model --prompts data.jsonl --reward mypkg.rewards:score
    gspo train --resume runs/20261124-120000     # continue from the last checkpoint
    gspo train --rollout vllm                    # sample with vLLM (one engine, in process)
    gspo train --lora-r 8 --lr 3e-2 --merge      # LoRA adapters (PEFT), base weights frozen
    torchrun --nproc-per-node 2 -m gspo train    # DDP, gloo on CPU / nccl on CUDA
    torchrun --nproc-per-node 2 -m gspo train --fsdp   # FSDP2 (fully_shard)

One step:
    prompts (this rank's share) -> G samples each (the --rollout engine) -> rewards -> group
    advantages -> old log-probs once (+ sampler mismatch) -> ``minibatches`` optimizer steps
    (gspo_loss, optional k3 KL) -> the new weights into the sampler
    -> metrics.jsonl, progress bar, held-out greedy eval every ``eval_every`` steps
    -> checkpoint every ``checkpoint_every`` steps, on SIGINT/SIGTERM and on reward errors.
"""

from __future__ import annotations

import contextlib
import functools
import random
import shutil
import signal
import time
from pathlib import Path

import torch

from gspo.advantages import advantages
from gspo.config import TrainConfig, to_dict
from gspo.train import checkpoint as ckpt
from gspo.train import data, engines, lora, rundir
from gspo.train import distributed as dd
from gspo.train.report import Report, format_group, sample_groups
from gspo.train.rewards import RewardError, build_task, prompts_at, score
from gspo.train.tiny import load_model_and_tokenizer
from gspo.train.update import COMPUTE_DTYPES, enable_grad_checkpointing, lr_lambda, update


class Stop:
    """Set by SIGINT/SIGTERM; the loop finishes the step, checkpoints and exits.
    A second signal interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self.signal = None
        self._old = {}

    def __enter__(self) -> Stop:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a test runner): no handlers
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signal = True, signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def train(config: TrainConfig, *, stop_after: int | None = None) -> dict:
    """Run (or resume) training; returns a summary. ``stop_after`` simulates a kill after
    that many total steps (the same path as SIGINT: checkpoint, then return)."""
    world = dd.init(config.device)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # save_pretrained's shard bars would break our own bar
    try:
        with contextlib.ExitStack() as cleanup:  # closes the rollout engine on any exit
            return _train(config, world, stop_after, cleanup)
    finally:
        dd.shutdown(world)


def _train(config: TrainConfig, world: dd.World, stop_after: int | None, cleanup) -> dict:
    _check_world(config, world)
    run_dir = rundir.resolve(config, world)  # created only once every check has passed
    resume_from = ckpt.latest(run_dir) if config.resume else None
    if config.threads or config.model == "tiny":
        torch.set_num_threads(config.threads or 1)
    # Per-rank seeds: ranks must sample different completions for their prompts.
    random.seed(config.seed + 7919 * world.rank)
    torch.manual_seed(config.seed + 7919 * world.rank)

    # ---- model (with LoRA adapters under --lora-r), reference, task
    model, tokenizer = load_model_and_tokenizer(
        config.model, layers=config.tiny_layers, hidden=config.tiny_hidden, seed=config.seed
    )
    model = lora.wrap(model, config)  # --lora-r: a PeftModel whose adapters alone train
    # The KL reference is the initial policy: copied before a checkpoint is loaded (under
    # LoRA no copy: the same model with its adapters disabled is the initial policy).
    frozen = lora.frozen_copy(model, config)
    if resume_from is not None:
        lora.load_checkpoint(model, resume_from)  # the model's weights, or the adapter
    # Dropout off (eval mode) unless asked: its noise alone moves on-policy ratios off 1.
    model.to(world.device).train(config.keep_dropout)
    if config.grad_checkpointing:
        enable_grad_checkpointing(model, keep_dropout=config.keep_dropout)
    pool, held_out, reward_fn = build_task(
        task=config.task, prompts_file=config.prompts, reward=config.reward,
        reward_weights=config.reward_weights, eval_size=config.eval_prompts, seed=config.seed,
        levels=config.task_levels, dataset=config.dataset, dataset_split=config.dataset_split,
        prompt_field=config.prompt_field, answer_field=config.answer_field,
    )  # fmt: skip
    pool, held_out, dropped = data.fit_prompts(pool, held_out, tokenizer, model, config)
    if world.main:
        data.start_warnings(config, len(pool), dropped)

    # ---- log-prob modules (the chunked path), data parallel engine, optimizer
    from gspo.causal_lm import CausalLMLogprobs

    low = COMPUTE_DTYPES[config.dtype]  # None (fp32) or bf16; parameters stay fp32
    engine = dd.wrap(CausalLMLogprobs(model, compute_dtype=low), world, fsdp=config.fsdp)
    ref_logprobs = lora.reference_logprobs(engine, model, frozen, config, device=world.device,
                                           compute_dtype=low)  # fmt: skip
    optimizer = torch.optim.AdamW(
        [p for p in engine.parameters() if p.requires_grad],
        lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.99),
    )  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lr_lambda(config.warmup_steps * config.minibatches, config.steps * config.minibatches,
                  config.min_lr_ratio),
    )  # fmt: skip
    start, position = 0, 0  # steps done; prompts consumed from the data stream
    if resume_from is not None:
        start, position = _restore(resume_from, engine, optimizer, scheduler, world)
    # the sampler (--rollout): built once, from the current (resumed) weights
    sampler = engines.build(config, model, tokenizer, world, engine)
    cleanup.callback(sampler.close)

    def sample(prompts, *, greedy):
        return sampler.sample(prompts, group_size=1 if greedy else config.group_size,
                              greedy=greedy)  # fmt: skip

    def evaluate() -> float:
        mine = held_out[world.rank :: world.size]
        rollout = sample(mine, greedy=True)
        rewards = _score_all(reward_fn, rollout, world, lambda: save(step, position))
        total, count = dd.all_sum([sum(rewards), float(len(rewards))], world)
        return total / count

    def save(at_step: int, at_position: int, rng: dict | None = None) -> None:
        _save(run_dir, at_step, at_position, model, tokenizer, engine, optimizer, scheduler,
              config, world, rng)  # fmt: skip

    # ---- the loop
    rundir.create(run_dir, config, world)
    log = Report(run_dir, main=world.main, truncate_after=start, report_to=config.report_to,
                 config=to_dict(config), samples_per_step=config.samples_per_step)  # fmt: skip
    bar = _progress(config, world, start)
    step = start
    if start == 0:
        first = {"step": 0, "eval_reward": evaluate()}
        if config.max_prompt_tokens is not None:
            first["prompts_dropped"] = dropped  # over the limit, removed before training
        log.metrics(first)
    with Stop() as stop:
        for step in range(start + 1, config.steps + 1):
            t0, rng_before = time.perf_counter(), ckpt.rng_state()
            # prompts -> rollouts: this rank's contiguous share of the step's prompts
            prompts = prompts_at(pool, config.seed, position, config.prompts_per_step)
            rollout = sample(dd.shard(prompts, world), greedy=False)
            times = {"time_rollout": time.perf_counter() - t0}
            # rewards -> advantages over whole groups, once per rollout batch (spec step 1)
            # on a reward error, save the state this step started from (RNG included)
            on_error = functools.partial(save, step - 1, position, rng_before)
            rewards = _score_all(reward_fn, rollout, world, on_error)
            position += config.prompts_per_step
            reward_t = torch.tensor(rewards, dtype=torch.float32, device=world.device)
            adv = advantages(reward_t, group_size=config.group_size, norm=config.adv_norm)
            # old log-probs once, then the minibatch optimizer steps
            t1 = time.perf_counter()
            history = update(engine, ref_logprobs, optimizer, scheduler, rollout, adv,
                             config=config, world_size=world.size)  # fmt: skip
            t2 = time.perf_counter()
            # the next step samples the new policy (under LoRA: W + s B A, merged on the fly)
            sampler.load_weights(lora.sampler_weights(model))
            times["time_weight_sync"] = time.perf_counter() - t2
            times["time_update"] = t2 - t1  # old log-probs included; also given apart below
            record = _step_metrics(step, rewards, rollout, history, t0, scheduler, world)
            record.update(times)
            groups = sample_groups(rollout.prompts, rollout.completions, rewards, adv.tolist(),
                                   group_size=config.group_size,
                                   count=config.samples_per_step)  # fmt: skip
            log.samples(step, groups)
            if step % config.eval_every == 0 or step == config.steps:
                record["eval_reward"] = evaluate()
                for group in groups[:1] if world.main and config.progress else ():
                    bar.write(f"step {step}:\n{format_group(group)}")
            log.metrics(record)
            bar.update(1)
            bar.set_postfix(reward=f"{record['reward_mean']:.3f}",
                            clip=f"{record['clip_frac']:.3f}",
                            eval=f"{log.last_eval:.3f}")  # fmt: skip
            interrupted = dd.any_rank(stop.requested or step == stop_after, world)
            if step % config.checkpoint_every == 0 or step == config.steps or interrupted:
                save(step, position)
            if interrupted:
                break
    bar.close()
    log.close()
    finished = step == config.steps
    if finished:
        lora.save_final(run_dir, model, tokenizer, world, merge=config.merge)  # RUN_DIR/model
        if config.plot and world.main:
            from gspo.train.plot import plot_run

            plot_run(run_dir)
    return {"run_dir": str(run_dir), "step": step, "main": world.main, "finished": finished,
            "signal": stop.signal, "last_eval": log.last_eval}  # fmt: skip


# ---------------------------------------------------------------- helpers, in call order


def _check_world(config: TrainConfig, world: dd.World) -> None:
    if config.fsdp and not world.distributed:
        again = f"--resume {config.resume} (N = the ranks that saved it)" if config.resume \
            else "--fsdp"  # fmt: skip
        raise ValueError("--fsdp shards the model over several processes: launch with "
                         f"torchrun --nproc-per-node N -m gspo train {again}")  # fmt: skip
    per_rank = config.prompts_per_step * config.group_size // world.size
    if config.prompts_per_step % world.size or per_rank % config.minibatches:
        raise ValueError(
            f"--prompts-per-step {config.prompts_per_step} with --minibatches "
            f"{config.minibatches} on {world.size} ranks: prompts_per_step must divide by the "
            "world size and each rank's prompts_per_step*group_size/world by minibatches"
        )
    if config.eval_prompts < world.size:
        raise ValueError(f"--eval-prompts {config.eval_prompts}: need at least one per rank "
                         f"({world.size})")  # fmt: skip


def _restore(path: Path, engine, optimizer, scheduler, world: dd.World) -> int:
    state = ckpt.load_trainer_state(path)
    ckpt.check_resumable(path)
    mine = ckpt.load_rank_state(path, world.rank)
    dd.load_optimizer(engine, optimizer, path / "optimizer", world)
    scheduler.load_state_dict(state["scheduler"])
    if mine is not None:  # None: a rank the saving run did not have
        ckpt.set_rng_state(mine["rng"])
    return int(state["step"]), int(state["data_position"])


def _score_all(reward_fn, rollout, world: dd.World, on_error) -> list[float]:
    """Score this rank's rollouts; if any rank's reward fails, every rank checkpoints
    (``on_error``) and the run stops with the failing rank's message."""
    error = None
    try:
        rewards = score(reward_fn, rollout.prompts, rollout.completions)
    except RewardError as err:
        error, rewards = err, []
    if dd.any_rank(error is not None, world):
        on_error()
        if error is None:
            raise RewardError("the reward function failed on another rank (see its message)")
        raise error
    return rewards


_EXTREMES = ("ratio_min", "ratio_max", "_max_abs")  # min/max over minibatches and ranks


def _step_metrics(step, rewards, rollout, history, t0, scheduler, world) -> dict:
    n = float(len(rewards))
    lengths = rollout.response_mask.sum(dim=1).float()
    s, s2, tokens, count = dd.all_sum(
        [sum(rewards), sum(r * r for r in rewards), float(lengths.sum()), n], world
    )
    mean = s / count
    local = {k: sum(h[k] for h in history) / len(history) for k in history[0]}
    extremes = {k: k.endswith(("_max", "_max_abs")) for k in local if k.endswith(_EXTREMES)}
    for key, largest in extremes.items():
        local[key] = (max if largest else min)(h[key] for h in history)
    # several reward functions: each one's mean on its own (rewards.Scores.parts)
    local.update({f"reward/{name}": sum(v) / n for name, v in rewards.parts.items()})
    merged = dd.all_mean(local, world)
    for key, largest in extremes.items():
        merged[key] = dd.all_extreme(local[key], world, largest=largest)
    elapsed = time.perf_counter() - t0
    return {
        "step": step,
        "reward_mean": mean,
        "reward_std": max(0.0, s2 / count - mean * mean) ** 0.5,
        **merged,
        "clip_frac": merged["clip_frac_low"] + merged["clip_frac_high"],
        "response_len": tokens / count,
        "lr": scheduler.get_last_lr()[0],
        "step_time": elapsed,
        "tokens_per_s": tokens / elapsed,
    }


def _progress(config: TrainConfig, world: dd.World, start: int):
    from tqdm.auto import tqdm

    return tqdm(total=config.steps, initial=start, desc="gspo train", unit="step",
                disable=not (config.progress and world.main), dynamic_ncols=True)  # fmt: skip


def _save(run_dir, step, position, model, tokenizer, engine, optimizer, scheduler, config, world,
          rng=None) -> None:  # fmt: skip
    state = lora.state_dict(model, world)  # collectives first, on every rank
    tmp = ckpt.staging_dir(run_dir, step)
    if world.main and tmp.exists():
        shutil.rmtree(tmp)  # left over from a crash mid-write
    dd.barrier(world)
    dd.save_optimizer(engine, optimizer, tmp / "optimizer", world)
    ckpt.write_rank_state(tmp, world.rank, rng=rng)
    if world.main:
        trainer = {"step": step, "data_position": position,
                   "scheduler": scheduler.state_dict(), "config": to_dict(config)}  # fmt: skip
        ckpt.write_main_state(tmp, model_state=state, model=model, tokenizer=tokenizer,
                              trainer_state=trainer)  # fmt: skip
    dd.barrier(world)
    if world.main:
        ckpt.publish(run_dir, step, config.keep_checkpoints)
    dd.barrier(world)

