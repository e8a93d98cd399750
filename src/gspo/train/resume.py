"""What ``--resume`` may change, and what it refuses.

A checkpoint's ``trainer.pt`` holds the flat config of the run that wrote it. ``gspo train
--resume RUN`` starts from the run's config.json, then ``--config``, then flags
(gspo.train.cli.parse_config); ``check`` compares the result with the checkpoint's config
before anything is built or written:

* the settings in ``CHANGEABLE`` may change and take effect from the resumed step on: how
  long the run is and its learning rate, its evaluation and checkpoint cadence, what it
  logs, and how the same computation is laid out in memory and over processes;
* any other change is refused (ValueError, exit 2), naming each flag with its saved value
  and the new one: a new ``--seed``, ``--group-size``, ``--prompts-per-step`` or
  ``--minibatches`` (say) would silently shift the data stream or change what the saved
  position means, a new model or objective would continue another run than the one saved.

A setting the checkpoint's config does not hold (an option added since) counts as its
default, which is how that run behaved. config.json is rewritten with the resumed run's
settings: what it actually uses.

The schedule (``retime``): the learning rate at optimizer step k is ``lr x factor(k)``
(gspo.train.update.lr_lambda: warmup, then cosine decay to min_lr_ratio x lr over
``steps x minibatches`` optimizer steps). A resumed run recomputes it from the new ``--lr``
and ``--steps`` at the saved step k, so a new peak lr scales the rest of the schedule and
a new ``--steps`` re-times the decay: longer stretches it (the lr at the resumed step goes
back up to where the longer schedule is at k), shorter compresses it. Both are printed as a
warning at start.
"""

from __future__ import annotations

from pathlib import Path

from gspo.config import flag_name, to_dict
from gspo.train.config import TrainConfig, warn

# option -> what changing it on resume does (docs/settings.md has the long form).
CHANGEABLE = {
    "steps": "the run's length; the cosine decay is re-timed to it (see retime)",
    "lr": "the peak learning rate; the schedule continues from the saved step at the new peak",
    "eval_every": "held-out evaluation cadence",
    "checkpoint_every": "checkpoint cadence",
    "keep_checkpoints": "how many checkpoints are kept",
    "samples_per_step": "groups written to samples.jsonl",
    "progress": "the progress bar",
    "plot": "reward.png at the end",
    "report_to": "TensorBoard / W&B sinks",
    "merge": "RUN_DIR/merged at the end (LoRA)",
    "threads": "CPU threads",
    "fsdp": "DDP or FSDP2 sharding (the optimizer state is resharded on load)",
    "max_tokens_per_microbatch": "micro-batches: the same gradient, accumulated",
    "generation_batch_size": "sequences per generate() call",
    "grad_checkpointing": "recompute activations in the backward: the same gradient",
    "vllm_memory": "vLLM's memory",
    "vllm_device": "where vLLM's engine runs: the same samples (tests/test_scaleout_vllm.py)",
    "vllm_servers": "which servers sample: the same samples (tests/test_vllm_server.py)",
    "weight_push": "how weights reach the servers: the same weights (tests/test_vllm_server.py)",
    "shared_prefix": "each group's prompt run once: the same log-probs and gradients",
    "fused_loss": "the loss inside the LM-head pass: the same gradients",
}
# Not settings of the computation: where the run is (--resume gives it) and its own flag.
_IGNORED = {"resume"}


def saved_config(checkpoint: Path) -> tuple[dict, int]:
    """The flat config in ``checkpoint``'s trainer.pt and the step it was saved at."""
    from gspo.train.checkpoint import load_trainer_state

    state = load_trainer_state(Path(checkpoint))
    return dict(state.get("config") or {}), int(state["step"])


def check(config: TrainConfig, checkpoint: Path) -> None:
    """Refuse every change to a setting outside CHANGEABLE since ``checkpoint`` was saved
    (ValueError naming flag, saved and new value), and a ``--steps`` below its step; warn
    once about a changed --lr or --steps (the schedule they re-time)."""
    saved, step = saved_config(checkpoint)
    new = to_dict(config)
    defaults = to_dict(TrainConfig())
    refused, changed = [], []
    for name, value in new.items():
        before = _plain(saved.get(name, defaults[name]))
        if name in _IGNORED or before == _plain(value):
            continue
        if name == "run_dir" and value is None:  # the Python API's unset: --resume's dir
            continue
        (changed if name in CHANGEABLE else refused).append((name, before, value))
    where = f"--resume {config.run.resume}: checkpoint {Path(checkpoint).name}"
    if refused:
        listed = "; ".join(f"{flag_name(n)} {b!r} -> {v!r}" for n, b, v in refused)
        raise ValueError(
            f"{where} was made with other settings than this launch gives: {listed}. They "
            "would change what the resumed run computes (its data stream, model, objective or "
            "batch) while its checkpoint and metrics describe the old ones. Drop those flags "
            "(the run's config.json already holds its settings) or start a new --run-dir. "
            f"On resume only these may change: {', '.join(map(flag_name, CHANGEABLE))}"
        )
    if config.run.steps < step:
        raise ValueError(f"{where} is at step {step}: --steps {config.run.steps} is behind it; "
                         f"give --steps {step} or more")  # fmt: skip
    schedule = [(n, b, v) for n, b, v in changed if n in ("lr", "steps")]
    if schedule:
        listed = ", ".join(f"{flag_name(n)} {b!r} -> {v!r}" for n, b, v in schedule)
        warn(f"resuming at step {step} with {listed}: the learning rate schedule continues "
             "from this step as the new settings define it (docs/settings.md)")  # fmt: skip


def retime(optimizer, scheduler, lr: float) -> None:
    """After restoring a checkpoint: every param group's lr is ``lr x factor(k)`` at the
    scheduler's saved step k, with ``factor`` this run's (its --steps) and ``lr`` its peak.
    LambdaLR restores the saved run's peak (``base_lrs``) and the optimizer its last lr;
    with nothing changed this recomputes those same numbers (LambdaLR's own formula)."""
    scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
    k = scheduler.last_epoch
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs,
                                   scheduler.lr_lambdas, strict=True):  # fmt: skip
        group["lr"] = base * factor(k)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _plain(value):
    """Lists and tuples alike (trainer.pt of older runs holds tuples, config.json lists)."""
    return list(value) if isinstance(value, list | tuple) else value

