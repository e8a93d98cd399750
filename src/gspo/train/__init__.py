"""`gspo train`: GSPO fine-tuning of Hugging Face causal LMs.

cli.py          the command: flags generated from gspo.config.TrainConfig
loop.py         the training loop, top to bottom (launch commands in its docstring)
data.py         start-up checks: prompts fit the model (--max-prompt-tokens), warnings
rundir.py       the run directory: never reused without --resume, created when training starts
tiny.py         the built-in random Qwen2 and character tokenizer (no downloads)
rewards.py      tasks, reward functions and their checks, the data order
rollout.py      what every engine's samples become: prompt encoding, EOS masks, the Rollout
engines/        samplers behind one protocol: hf.py (generate), vllm.py (vLLM in process)
correction.py   sampler-vs-trainer mismatch metrics and rollout corrections
update.py       old log-probs once, then minibatch GSPO steps (+ k3 KL)
checkpoint.py   atomic checkpoints and resume
distributed.py  DDP / FSDP2 under torchrun, rank sharding, metric reductions
plot.py         reward.png and the GSPO-vs-GRPO comparison
"""

from __future__ import annotations

from typing import Any

__all__ = ["TrainConfig", "train"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `gspo train --help` (which imports gspo.train.cli) does not load torch.
    if name == "TrainConfig":
        from gspo.config import TrainConfig

        return TrainConfig
    if name == "train":
        from gspo.train.loop import train

        return train
    raise AttributeError(f"module 'gspo.train' has no attribute {name!r}")
