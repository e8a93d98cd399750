"""`gspo train` and `gspo eval`: GSPO fine-tuning of Hugging Face causal LMs.

loop.py         the step, top to bottom (launch commands in its docstring)
config.py       one frozen dataclass per concern, composed by TrainConfig
cli.py          `gspo train`: flags generated from the config, --config FILE, --compare
compare.py      `gspo train --compare`: several losses and seeds, one plot
evaluate.py     `gspo eval`: accuracy, pass@k and the task's checks, through the engines
models.py       --model -> the policy, tokenizer, KL reference, sampler weights, save/load
tiny.py         the built-in random Qwen2 and character tokenizer (no downloads)
gguf.py         GGUF files and smollm2, dequantized once into a cache
lora.py         PEFT's mechanics: adapters, merged weights, adapter files
tasks/          prompts + reward behind one class: digitsum, copy, arith, files (a registry)
rewards.py      user rewards: import, weighted sums, checks of every batch's values
data.py         start-up checks: prompts fit the model (--max-prompt-tokens), warnings
rollout.py      what every engine's samples become: prompt encoding, EOS masks, the Rollout
sampling.py     a step's batch: rollouts + rewards, dynamic sampling, truncated and overlong
engines/        samplers behind one protocol: hf.py (generate), vllm.py (vLLM in process)
update.py       old log-probs once, then minibatch steps (+ k3 KL), micro-batches
microbatch.py   micro-batches by token budget, and their metrics merged
correction.py   sampler-vs-trainer mismatch metrics and rollout corrections
checkpoint.py   save and restore everything, atomically
report.py       per-step metrics, samples, progress bar, TensorBoard / W&B
distributed.py  DDP / FSDP2 under torchrun, rank sharding, metric reductions
rundir.py       the run directory: claimed and locked at launch, never shared or reused
plot.py         reward.png and compare.png (losses' held-out curves over seeds)
"""

from __future__ import annotations

from typing import Any

__all__ = ["TrainConfig", "train"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `gspo train --help` (which imports gspo.train.cli) does not load torch.
    if name == "TrainConfig":
        from gspo.train.config import TrainConfig

        return TrainConfig
    if name == "train":
        from gspo.train.loop import train

        return train
    raise AttributeError(f"module 'gspo.train' has no attribute {name!r}")
