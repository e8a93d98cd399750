"""The GSPO training loop, top to bottom.

Launch:
    gspo train                                   # built-in: tiny Qwen2 learns digit sums (CPU)
    gspo train --model ./my-hf-model --prompts data.jsonl --reward mypkg.rewards:score
    gspo train --resume runs/20261124-120000     # continue from the last checkpoint
    gspo train --rollout vllm                    # sample with vLLM (one engine, in process)
    gspo train --async-rollouts                  # generate batch k+1 during update k
    gspo train --lora-r 8 --lr 3e-2 --merge      # LoRA adapters (PEFT), base weights frozen
    torchrun --nproc-per-node 2 -m gspo train    # DDP, gloo on CPU / nccl on CUDA
    torchrun --nproc-per-node 2 -m gspo train --fsdp   # FSDP2 (fully_shard)
    torchrun --nproc-per-node 2 -m gspo train --rollout vllm   # a vLLM engine on every rank

One step:
    prompts (this rank's share) -> G samples each (the --rollout engine, now or generated
    ahead by a sampler thread: overlap.py) -> rewards (and, with --dynamic-sampling, more
    rounds until the step's groups are informative: sampling.py) -> group advantages
    -> old log-probs once (+ sampler mismatch) -> ``minibatches`` optimizer steps
    (gspo_loss, optional k3 KL) -> the new weights into the sampler
    -> metrics.jsonl, progress bar, held-out greedy eval every ``eval_every`` steps
    -> checkpoint every ``checkpoint_every`` steps, on SIGINT/SIGTERM and on reward errors.
With ``--env`` a rollout is a batch of multi-turn episodes (episodes.py): the same step.

Each concern is behind its own module, so this file holds no model-, task- or engine-specific
branch: models.py (the policy, its reference, its weights for the sampler, save and load),
tasks/ (prompts and rewards), engines/ (samplers), overlap.py (when they sample), update.py
(old log-probs and the optimizer steps), checkpoint.py (save and restore everything),
report.py (metrics, samples, progress). The run's state (the step, the data position,
the log) is one ``Trainer``, made by ``_build``, whose stages ``_train`` calls in order;
each stage is handed the config concerns it reads (``sampling.concerns``,
``update.Concerns``, the RunConfig for overlap.py), not the whole TrainConfig.
"""

from __future__ import annotations

import contextlib
import functools
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gspo.advantages import advantages
from gspo.causal_lm import CausalLMLogprobs
from gspo.config import to_dict
from gspo.train import checkpoint as ckpt
from gspo.train import data, engines, episodes, models, overlap, resume, rundir, sampling, warmstart
from gspo.train import distributed as dd
from gspo.train.config import TrainConfig
from gspo.train.console import log_path, to_log
from gspo.train.report import Report, sample_groups, step_metrics
from gspo.train.rewards import RewardError
from gspo.train.rollout import eos_ids
from gspo.train.tasks import build_task, prompts_at
from gspo.train.update import Concerns, lr_lambda, update


class Stop:
    """Set by SIGINT/SIGTERM; the loop finishes the step, checkpoints and exits.
    A second signal interrupts at once, and so does the SIGTERM torchrun sends when another
    rank failed (its notice is in the job's store): that rank cannot join a checkpoint."""

    def __init__(self, world: dd.World) -> None:
        self.world = world
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
        peer = dd.peer_failure(self.world)
        if peer is not None:
            raise peer
        self.requested, self.signal = True, signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def train(config: TrainConfig, *, stop_after: int | None = None) -> dict:
    """Run (or resume) training; returns a summary. ``stop_after`` simulates a kill after
    that many total steps (the same path as SIGINT: checkpoint, then return)."""
    world = dd.init(config.run.device)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # save_pretrained's shard bars would break our own bar
    run_dir = None
    try:
        with contextlib.ExitStack() as cleanup:  # closes the rollout engine on any exit
            try:
                _check_world(config, world)
                engines.preflight(config.sampling)  # e.g. --vllm-servers answer, before the model
                run_dir = rundir.resolve(config, world)  # made and locked: writable, not shared
                cleanup.callback(rundir.release, run_dir)  # unlock; removed if never trained in
                summary = _train(config, world, run_dir, stop_after, cleanup)
            except BaseException as err:  # before the cleanup, which may take seconds:
                # under torchrun our failure goes to the other ranks, or theirs stops us
                peer = dd.stopped_by_peer(world, err)
                if peer is None:
                    raise
                peer.run_dir = run_dir
                raise peer from None
    except BaseException:
        dd.shutdown(world, clean=False)
        raise
    dd.shutdown(world)
    return summary


def _train(config: TrainConfig, world: dd.World, run_dir, stop_after: int | None,
           cleanup) -> dict:  # fmt: skip
    run = config.run
    trainer = _build(config, world, run_dir, cleanup)
    # Step 0's evaluation is the engine's first work: it runs before RUN_DIR exists, so an
    # engine that fails there (memory, a kernel) leaves no half-made run behind
    first = trainer.first_record() if trainer.step == 0 else None
    rundir.create(run_dir, config, world)
    trainer.log = Report(run_dir, main=world.main, truncate_after=trainer.step,
                         report_to=run.report_to, config=to_dict(config),
                         samples_per_step=run.samples_per_step, total_steps=run.steps,
                         progress=run.progress)  # fmt: skip
    if first is not None:
        trainer.log.metrics(first)
    with Stop(world) as stop:
        for step in range(trainer.step + 1, run.steps + 1):
            record, groups = trainer.train_step(step)
            evaluating = step % run.eval_every == 0 or step == run.steps
            if evaluating:  # a reward error here: the step's line, then its checkpoint
                on_error = functools.partial(trainer.save_after_log, record, groups)
                record["eval_reward"] = trainer.evaluate(on_error)
            trainer.log.step_done(record, groups, show_sample=evaluating)
            interrupted = dd.any_rank(stop.requested or step == stop_after, world)
            if step % run.checkpoint_every == 0 or step == run.steps or interrupted:
                trainer.save(step, trainer.position)
            if interrupted:
                break
    trainer.log.close()
    finished = trainer.step == run.steps
    if finished:
        trainer.policy.save_final(run_dir, world)  # RUN_DIR/model (and merged/ under --merge)
        if run.plot and world.main:
            from gspo.train.plot import plot_run

            plot_run(run_dir)
    return {"run_dir": str(run_dir), "step": trainer.step, "main": world.main,
            "finished": finished, "signal": stop.signal,
            "last_eval": trainer.log.last_eval}  # fmt: skip


@dataclass
class Trainer:
    """A run's state and the stages that act on it, made by ``_build``. What changes as
    the run goes is named here, not captured by closures: ``step`` (steps done),
    ``position`` (prompts taken from the data stream: a resumed run samples on from it) and
    ``log`` (the Report, opened once RUN_DIR exists)."""

    config: TrainConfig
    world: dd.World
    run_dir: Path
    policy: models.Policy  # the model, its tokenizer, its KL reference, save and load
    logprobs: torch.nn.Module  # the trainer's log-probs, wrapped for DDP / FSDP2
    ref_logprobs: torch.nn.Module | None  # the KL reference's (None: no KL term)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    episodes: episodes.SingleTurn | episodes.MultiTurn  # prompts -> rollout -> rewards
    source: overlap.Synchronous | overlap.Overlapped  # when the sampler runs
    pool: list  # the training prompts
    held_out: list  # the evaluation prompts, all ranks'
    eos: list[int]  # what ends a response (--mask-truncated)
    step: int  # steps done
    position: int  # prompts consumed from the data stream
    dropped: int = 0  # prompts over --max-prompt-tokens, removed before training
    warm_losses: list[float] = field(default_factory=list)  # --warm-start, per epoch
    log: Report | None = None

    def first_record(self) -> dict:
        """Step 0's line: the held-out reward before any update (a reward error saves the
        run as it starts, resumable), the prompts dropped, the warm start's last loss."""
        record = {"step": 0, "eval_reward": self.evaluate(self.save_start)}
        if self.config.data.max_prompt_tokens is not None:
            record["prompts_dropped"] = self.dropped
        if self.warm_losses:
            record["warm_start_loss"] = self.warm_losses[-1]  # nats per assistant token
        return record

    def train_step(self, step: int) -> tuple[dict, list]:
        """Step ``step`` (module docstring): its metrics line and its sample groups."""
        world, group_size = self.world, self.config.run.group_size
        t0 = time.perf_counter()
        batch, ahead = self.sample_batch(step)
        rollout, rewards = batch.rollout, batch.rewards
        times = {"time_rollout": time.perf_counter() - t0}  # rewards included
        self.position += batch.consumed  # every prompt sampled, so resume samples the same
        # advantages over whole groups, once per rollout batch (spec step 1)
        reward_t = torch.tensor(rewards, dtype=torch.float32, device=world.device)
        adv = advantages(reward_t, group_size=group_size, norm=self.config.objective.adv_norm)
        # old log-probs once, then the minibatch optimizer steps
        t1 = time.perf_counter()
        history = update(self.logprobs, self.ref_logprobs, self.optimizer, self.scheduler,
                         rollout, adv, config=Concerns.of(self.config), world_size=world.size,
                         keep=batch.keep)  # fmt: skip
        t2 = time.perf_counter()
        # the new policy into the sampler (under LoRA: W + s B A, merged on the fly)
        times.update(self.source.updated(step))
        times["time_update"] = t2 - t1  # old log-probs included; also given apart below
        self.step = step
        record = step_metrics(step, rewards, rollout, history, t0,
                              self.scheduler.get_last_lr()[0], world)  # fmt: skip
        record.update(batch.metrics, policy_lag=ahead.lag)
        record.update(dd.all_mean(self.episodes.metrics(rollout), world))  # {} single-turn
        record.update(times)
        groups = sample_groups(rollout.prompts, rollout.completions, rewards, adv.tolist(),
                               group_size=group_size, count=self.config.run.samples_per_step,
                               episodes=rollout.episodes)  # fmt: skip
        return record, groups

    def sample_batch(self, step: int) -> tuple[sampling.Batch, overlap.Ahead]:
        """Prompts -> rollouts -> rewards: this rank's contiguous share of the step's prompts
        (generated ahead under --async-rollouts; more rounds under --dynamic-sampling), and
        the sequences in the loss. On a reward or environment error, the state this step
        started from is saved (its RNG included)."""
        rng_before = ckpt.rng_state()
        ahead = self.source.next(step)
        on_error = functools.partial(self.save, step - 1, self.position, rng_before)
        sample = overlap.or_now(ahead, self.episodes.rollout)
        batch = sampling.collect(
            functools.partial(_sample, sample, self.world, on_error), self.pool,
            position=self.position, **sampling.concerns(self.config), world=self.world,
            score=functools.partial(_score, self.episodes, self.world, on_error), eos=self.eos,
            pad_id=self.policy.tokenizer.pad_token_id, step=step,
        )  # fmt: skip
        return batch, ahead

    def evaluate(self, on_error) -> float:
        """The held-out reward (greedy, one sample per prompt, over every rank's share).
        ``on_error()`` runs on every rank if a reward or environment fails (``_guarded``)."""
        world = self.world
        mine = self.held_out[world.rank :: world.size]
        ahead_or_now = functools.partial(overlap.evaluation, self.source, self.episodes.rollout)
        rollout = _sample(ahead_or_now, world, on_error, mine, group_size=1, greedy=True)
        rewards = _score(self.episodes, world, on_error, rollout)
        total, count = dd.all_sum([sum(rewards), float(len(rewards))], world)
        return total / count

    def save(self, step: int, position: int, rng: dict | None = None) -> None:
        """A checkpoint after ``step`` at data position ``position`` (``rng``: the RNG
        state to restore, default the current one)."""
        ckpt.save(self.run_dir, step, position, policy=self.policy, logprobs=self.logprobs,
                  optimizer=self.optimizer, scheduler=self.scheduler, config=self.config,
                  world=self.world, rng=rng, pending=self.source.pending(step))  # fmt: skip

    def save_start(self) -> None:
        """A reward error at step 0, before RUN_DIR exists: the run as it starts, made
        resumable."""
        rundir.create(self.run_dir, self.config, self.world)
        self.save(0, 0)

    def save_after_log(self, record: dict, groups: list) -> None:
        """A reward error in the evaluation after a step's update: the step's own line
        first (the resumed run starts after this step, and would never write it), then
        the checkpoint of the step."""
        self.log.step_done(record, groups, show_sample=False)
        self.save(self.step, self.position)


def _build(config: TrainConfig, world: dd.World, run_dir, cleanup) -> Trainer:
    """Everything a run holds before its first step, in the order it is made (models and
    engines draw from the seeded RNG, so the order is part of the run's result)."""
    run, optim = config.run, config.optim
    resume_from = ckpt.latest(run_dir) if run.resume else None
    if resume_from is not None:  # only what may change on resume differs from its settings
        resume.check(config, resume_from)
    cleanup.enter_context(to_log(log_path(run_dir, world.rank)))  # libraries' output, quiet
    if run.threads or config.policy.model == "tiny":  # the tiny model's ops are too small
        torch.set_num_threads(run.threads or 1)
    # Per-rank seeds: ranks must sample different completions for their prompts.
    random.seed(run.seed + 7919 * world.rank)
    torch.manual_seed(run.seed + 7919 * world.rank)

    # ---- the policy (with its KL reference), the task
    policy = models.build(config)
    if resume_from is not None:
        policy.load(resume_from)  # the model's weights, or the adapter
    policy.prepare(world.device)
    pool, held_out, reward_fn, dropped, longest = _task(config, policy, world)

    # ---- log-probs (the chunked path), data parallel wrapper, optimizer
    logprobs = dd.wrap(CausalLMLogprobs(policy.model, compute_dtype=policy.compute_dtype),
                       world, fsdp=run.fsdp)  # fmt: skip
    ref_logprobs = policy.reference(logprobs, world.device)
    optimizer, scheduler = _optimizer(optim, run.steps, logprobs)
    start, position = 0, 0  # steps done; prompts consumed from the data stream
    if resume_from is not None:
        start, position = ckpt.restore(resume_from, logprobs=logprobs, optimizer=optimizer,
                                       scheduler=scheduler, world=world)  # fmt: skip
        resume.retime(optimizer, scheduler, optim.lr)  # this launch's --lr and --steps
    # a new run's supervised warm start (--warm-start), before the sampler copies weights
    warm_losses = [] if resume_from is not None or config.warm.warm_start is None else \
        warmstart.warm_start(config, policy, logprobs, world,
                             limit=models.position_limit(policy.hf_model))  # fmt: skip
    # the sampler (--rollout): built once, from the current (resumed) weights
    # (sized for the longest prompt kept above: data.sequence_len)
    sampler = engines.build(config.sampling, policy, world, logprobs, seed=run.seed,
                            prompt_tokens=data.engine_prompt_tokens(config, longest))  # fmt: skip
    cleanup.callback(sampler.close)
    # prompts -> rollout -> rewards: one prompt and one completion, or --env's episodes, on
    # an engine (under --async-rollouts the sampler thread's is another: its own copy on hf)
    episodes_of = functools.partial(episodes.build, config.data, config.sampling,
                                    tokenizer=policy.tokenizer, model=policy.model,
                                    reward_fn=reward_fn)  # fmt: skip
    now = episodes_of(sampler=sampler)
    eos = eos_ids(policy.hf_model, policy.tokenizer)
    # when the sampler runs: at each step, or ahead of the trainer in a thread (--async-rollouts)
    prompts_of = functools.partial(_prompts_of, pool, run, world, start, position)
    source = overlap.build(run, sampler, policy, world, prompts_of=prompts_of, start=start,
                           episodes_of=episodes_of,
                           resumed=resume_from and ckpt.load_pending(resume_from, world.rank),
                           )  # fmt: skip
    cleanup.callback(source.close)
    return Trainer(config, world, run_dir, policy, logprobs, ref_logprobs, optimizer,
                   scheduler, now, source, pool, held_out, eos, step=start, position=position,
                   dropped=dropped, warm_losses=warm_losses)  # fmt: skip


# ---------------------------------------------------------------- helpers, in call order


def _task(config: TrainConfig, policy, world: dd.World):
    """(pool, held_out, reward_fn, dropped, longest): the task's prompts that fit the
    model (data.fit_prompts), its reward, how many prompts --max-prompt-tokens dropped and
    the longest kept one's tokens."""
    d, run = config.data, config.run
    pool, held_out, reward_fn = build_task(
        task=d.task, prompts_file=d.prompts, reward=d.reward, reward_weights=d.reward_weights,
        eval_size=d.eval_prompts, seed=run.seed, levels=d.task_levels, dataset=d.dataset,
        dataset_split=d.dataset_split, prompt_field=d.prompt_field, answer_field=d.answer_field,
        env=d.env is not None,
    )  # fmt: skip
    pool, held_out, dropped, longest = data.fit_prompts(pool, held_out, policy.tokenizer,
                                                        policy.model, config)  # fmt: skip
    if world.main:
        data.start_warnings(config, len(pool), dropped)
    return pool, held_out, reward_fn, dropped, longest


def _optimizer(optim, steps: int, logprobs):
    """AdamW over the trainable parameters and its schedule (warmup, cosine), both per
    optimizer step: ``minibatches`` of them a training step."""
    # fused: the step in one kernel, whatever other threads do. While vLLM generates in the
    # sampler thread (--async-rollouts), torch.compiler.is_compiling() reads True on this
    # one too (a process-wide flag; measured in 200000 of 200000 polls), and the default
    # (foreach) step then takes its compiled-graph branch: bias corrections as float32
    # tensors, not Python floats, another last bit (measured: 4.5e-8 after 3 steps; fused:
    # 0). A resumed run's first step overlaps the sampler where the straight run's did not,
    # so it drifted from the straight one (1.3e-4 by step 4 under bf16 with 2 minibatches:
    # tests/test_compose_pairs.py).
    optimizer = torch.optim.AdamW(
        [p for p in logprobs.parameters() if p.requires_grad],
        lr=optim.lr, weight_decay=optim.weight_decay, betas=(0.9, 0.99), fused=True,
    )  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lr_lambda(optim.warmup_steps * optim.minibatches, steps * optim.minibatches,
                  optim.min_lr_ratio),
    )  # fmt: skip
    return optimizer, scheduler


def _prompts_of(pool, run, world: dd.World, start: int, at_start: int, step: int) -> list:
    """This rank's contiguous share of ``step``'s prompts, in a run whose data position was
    ``at_start`` after step ``start`` (the sampler thread asks for steps ahead of the
    trainer's position)."""
    at = at_start + (step - start - 1) * run.prompts_per_step
    return dd.shard(prompts_at(pool, run.seed, at, run.prompts_per_step), world)


def _check_world(config: TrainConfig, world: dd.World) -> None:
    run, minibatches = config.run, config.optim.minibatches
    if run.fsdp and not world.distributed:
        again = f"--resume {run.resume} (N = the ranks that saved it)" if run.resume \
            else "--fsdp"  # fmt: skip
        raise ValueError("--fsdp shards the model over several processes: launch with "
                         f"torchrun --nproc-per-node N -m gspo train {again}")  # fmt: skip
    per_rank = run.prompts_per_step * run.group_size // world.size
    if run.prompts_per_step % world.size or per_rank % minibatches:
        raise ValueError(
            f"--prompts-per-step {run.prompts_per_step} with --minibatches "
            f"{minibatches} on {world.size} ranks: prompts_per_step must divide by the "
            "world size and each rank's prompts_per_step*group_size/world by minibatches"
        )
    if config.data.eval_prompts < world.size:
        raise ValueError(f"--eval-prompts {config.data.eval_prompts}: need at least one per "
                         f"rank ({world.size})")  # fmt: skip


def _sample(rollout, world: dd.World, on_error, prompts, *, group_size: int, greedy: bool):
    """This rank's ``rollout(prompts, ...)`` (gspo.train.episodes', or the one generated
    ahead: overlap.or_now), guarded (``_guarded``)."""
    return _guarded(lambda: rollout(prompts, group_size=group_size, greedy=greedy),
                    world, on_error)  # fmt: skip


def _score(episodes, world: dd.World, on_error, rollout) -> list[float]:
    """This rank's rewards of ``rollout`` (``episodes.score``), guarded (``_guarded``)."""
    return _guarded(lambda: episodes.score(rollout), world, on_error)


def _guarded(work, world: dd.World, on_error):
    """``work()`` on this rank; if any rank's reward or environment fails (RewardError,
    EnvError), every rank checkpoints (``on_error``) and the run stops with the failing
    rank's message. Every rank calls this at the same points, so they stay in step."""
    error = result = None
    try:
        result = work()
    except RewardError as err:
        error = err
    if dd.any_rank(error is not None, world):
        on_error()
        if error is None:
            raise RewardError("the reward function or environment failed on another rank (see "
                              "its message)")  # fmt: skip
        raise error
    return result
