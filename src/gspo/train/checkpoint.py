"""Atomic checkpoints: everything a resumed run needs to continue bit-for-bit.

``save`` writes, ``restore`` reads back everything: the model (or the LoRA adapter,
through the run's gspo.train.models policy), the optimizer, the scheduler, every rank's
RNG states and the data position.

Layout of ``RUN_DIR/checkpoints/step-000050/``:
    model.safetensors, config.json, tokenizer files   (save_pretrained: loadable by HF;
                   resume also reads the sharded form, model-0000N-of-0000M + index)
                   under --lora-r: adapter_model.safetensors, adapter_config.json (PEFT's
                   save_pretrained; resume builds the base model, then loads the adapter)
    optimizer/     AdamW state via torch.distributed.checkpoint, keyed by parameter name:
                   every rank writes its shards; it loads on any number of ranks
    trainer.pt     scheduler, step, data position, the config
    rank0.pt       each rank's RNG states (python / torch / cuda: sampling differs per rank),
                   and under --async-rollouts its batches generated ahead (gspo.train.overlap)

A checkpoint is written into a temporary directory next to its final place, every file is
fsync'ed, then the directory is renamed into place (atomic on POSIX), so a crash mid-write
leaves the previous checkpoint intact. Only the last ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import torch

from gspo.config import to_dict
from gspo.train import distributed as dd

_NAME = re.compile(r"^step-(\d{6,})$")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def staging_dir(run_dir: Path, step: int) -> Path:
    """The temporary directory every rank writes its part of checkpoint ``step`` into."""
    parent = checkpoint_dir(run_dir)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".tmp-step-{step:06d}"
    return tmp


def write_rank_state(tmp: Path, rank: int, *, rng: dict | None = None,
                     pending: dict | None = None) -> None:  # fmt: skip
    tmp.mkdir(parents=True, exist_ok=True)
    state = {"rng": rng or rng_state(), "pending": pending or {}}
    torch.save(state, tmp / f"rank{rank}.pt")


def save(run_dir: Path, step: int, position: int, *, policy, logprobs, optimizer, scheduler,
         config, world: dd.World, rng: dict | None = None,
         pending: dict | None = None) -> None:  # fmt: skip
    """Checkpoint ``step`` (``position``: prompts consumed) on every rank: the model or
    adapter (``policy``, gspo.train.models), the optimizer state of ``logprobs``' parameters
    (DCP), the scheduler, the config and each rank's RNG states (``rng``: those of an earlier
    moment, e.g. the start of a step that failed) and ``pending``, the rollouts generated
    ahead for the next steps (gspo.train.overlap). Atomic: staged, then renamed."""
    state = policy.state_dict(world)  # collectives first, on every rank
    tmp = staging_dir(run_dir, step)
    if world.main and tmp.exists():
        shutil.rmtree(tmp)  # left over from a crash mid-write
    dd.barrier(world)
    dd.save_optimizer(logprobs, optimizer, tmp / "optimizer", world)
    write_rank_state(tmp, world.rank, rng=rng, pending=pending)
    if world.main:
        tmp.mkdir(parents=True, exist_ok=True)
        policy.save(tmp, state)
        policy.tokenizer.save_pretrained(tmp)
        trainer = {"step": step, "data_position": position,
                   "scheduler": scheduler.state_dict(), "config": to_dict(config)}  # fmt: skip
        torch.save(trainer, tmp / "trainer.pt")
    dd.barrier(world)
    if world.main:
        publish(run_dir, step, config.run.keep_checkpoints)
    dd.barrier(world)


def restore(path: Path, *, logprobs, optimizer, scheduler, world: dd.World) -> tuple[int, int]:
    """(step, data position) of checkpoint ``path``, with the optimizer, scheduler and this
    rank's RNG states restored (the model's weights: ``policy.load(path)``, before the
    policy is wrapped)."""
    state = load_trainer_state(path)
    mine = load_rank_state(path, world.rank)
    dd.load_optimizer(logprobs, optimizer, path / "optimizer", world)
    scheduler.load_state_dict(state["scheduler"])
    if mine is not None:  # None: a rank the saving run did not have
        set_rng_state(mine["rng"])
    return int(state["step"]), int(state["data_position"])


def publish(run_dir: Path, step: int, keep: int) -> Path:
    """fsync the staged directory, rename it into place, and prune old checkpoints."""
    tmp = staging_dir(run_dir, step)
    final = checkpoint_dir(run_dir) / f"step-{step:06d}"
    _fsync_tree(tmp)
    if final.exists():  # a re-run of the same step after resume: replace it whole
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (staging directories are ignored)."""
    parent = checkpoint_dir(run_dir)
    if not parent.is_dir():
        return []
    found = [p for p in parent.iterdir() if _NAME.match(p.name) and (p / "trainer.pt").exists()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest(run_dir: Path) -> Path:
    found = list_checkpoints(run_dir)
    if not found:
        raise ValueError(
            f"--resume {str(run_dir)!r}: no checkpoint under {checkpoint_dir(run_dir)}; "
            "give the run directory of a run that saved at least one checkpoint"
        )
    return found[-1]


def load_trainer_state(path: Path) -> dict:
    return torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)


def load_pending(path: Path, rank: int) -> dict:
    """The rollouts this rank had generated ahead when ``path`` was saved ({} if none)."""
    mine = load_rank_state(path, rank)
    return {} if mine is None else mine.get("pending", {})


def load_rank_state(path: Path, rank: int) -> dict:
    """This rank's RNG states. A rank the checkpoint did not have (resuming on more ranks
    than saved) gets None: it keeps its fresh per-rank seed."""
    file = path / f"rank{rank}.pt"
    if not file.exists():
        return None
    return torch.load(file, map_location="cpu", weights_only=False)
