"""Atomic checkpoints: everything a resumed run needs to continue bit-for-bit.

Layout of ``RUN_DIR/checkpoints/step-000050/``:
    model.safetensors, config.json, tokenizer files   (save_pretrained: loadable by HF;
                   resume also reads the sharded form, model-0000N-of-0000M + index)
                   under --lora-r: adapter_model.safetensors, adapter_config.json (PEFT's
                   save_pretrained; resume builds the base model, then loads the adapter)
    optimizer/     AdamW state via torch.distributed.checkpoint, keyed by parameter name:
                   every rank writes its shards; it loads on any number of ranks
    trainer.pt     scheduler, step, data position, the config
    rank0.pt       each rank's RNG states (python / torch / cuda: sampling differs per rank)

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


def write_rank_state(tmp: Path, rank: int, *, rng: dict | None = None) -> None:
    tmp.mkdir(parents=True, exist_ok=True)
    state = {"rng": rng or rng_state()}
    torch.save(state, tmp / f"rank{rank}.pt")


def write_main_state(tmp: Path, *, model_state, model, tokenizer, trainer_state: dict) -> None:
    """Rank 0's part: the model (safetensors via save_pretrained; under LoRA the adapter)
    and the trainer state."""
    from gspo.train.lora import save_pretrained

    tmp.mkdir(parents=True, exist_ok=True)
    save_pretrained(model, tmp, model_state)
    tokenizer.save_pretrained(tmp)
    torch.save(trainer_state, tmp / "trainer.pt")


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


def load_rank_state(path: Path, rank: int) -> dict:
    """This rank's RNG states. A rank the checkpoint did not have (resuming on more ranks
    than saved) gets None: it keeps its fresh per-rank seed."""
    file = path / f"rank{rank}.pt"
    if not file.exists():
        return None
    return torch.load(file, map_location="cpu", weights_only=False)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a save_pretrained directory: ``model.safetensors``, or the shards that
    ``model.safetensors.index.json`` lists (large models, or any ``max_shard_size``)."""
    import json

    from safetensors.torch import load_file

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if not index.exists():
        single = path / "model.safetensors"
        if not single.exists():
            raise ValueError(f"{path}: neither model.safetensors nor its sharded index is there")
        return load_file(single)
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    state = {}
    for name in files:
        state.update(load_file(path / name))
    return state


# The HF config keys that decide the shapes of the weights (names differ by architecture).
_SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "n_embd", "num_hidden_layers",
               "n_layer", "intermediate_size", "n_inner", "num_attention_heads", "n_head",
               "num_key_value_heads")  # fmt: skip


def load_model_weights(model, path: Path) -> None:
    """Copy the checkpoint's weights into ``model`` in place (strict); a checkpoint of
    another model is refused with both models described."""
    import json

    if (path / "adapter_config.json").exists():
        raise ValueError(f"checkpoint {path} holds a LoRA adapter, not a whole model; resume "
                         "it with its run's --lora-r (as its config.json says)")  # fmt: skip
    saved = json.loads((path / "config.json").read_text())
    built = model.config.to_dict()
    differ = [k for k in _SHAPE_KEYS if k in saved and k in built and saved[k] != built[k]]
    if differ:
        raise ValueError(
            f"checkpoint {path} holds another model than this run's config builds: "
            f"checkpoint {_describe(saved, differ)}, config {_describe(built, differ)}; "
            "resume with the run's own --model (and --tiny-* sizes), or start a new --run-dir"
        )
    state = read_safetensors(path)
    if getattr(model.config, "tie_word_embeddings", False):
        state.setdefault("lm_head.weight", state.get("model.embed_tokens.weight"))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"checkpoint {path} does not fit this run's model: {err}") from None
    missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not fit the model: missing {missing}, "
                         f"unexpected {unexpected}")  # fmt: skip


def _describe(config: dict, keys: list[str]) -> str:
    return f"{config.get('model_type', '?')} (" + ", ".join(f"{k} {config[k]}" for k in keys) + ")"


def check_resumable(path: Path) -> None:
    """Refuse a checkpoint whose optimizer state is not in ``optimizer/`` (DCP): one written
    before gspo saved it that way (a whole state in trainer.pt or shards in rank*.pt)."""
    if not (Path(path) / "optimizer").is_dir():
        raise ValueError(
            f"--resume: checkpoint {path} has no optimizer/ directory (torch.distributed."
            "checkpoint); it was written by an older gspo: resume it with that version"
        )
