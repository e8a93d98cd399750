"""The calculator recipe's warm start alone, saved for `gspo eval` (the "warm start alone"
row of docs/environments.md): the same config, seed and episodes as the recipe's run.

    .venv/bin/python examples/calculator_warm_only.py runs/calculator-warm-only
    .venv/bin/gspo eval --config examples/smollm2-calculator.toml \
        --model runs/calculator-warm-only --task-levels 2 -n 0
"""

import sys

from gspo.causal_lm import CausalLMLogprobs
from gspo.config import load_file
from gspo.train import models, warmstart
from gspo.train.config import TrainConfig
from gspo.train.distributed import World

if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "runs/calculator-warm-only"
    config = TrainConfig(**load_file("examples/smollm2-calculator.toml"))
    policy = models.build(config)
    policy.prepare(World().device)
    logprobs = CausalLMLogprobs(policy.model, compute_dtype=policy.compute_dtype)
    warmstart.warm_start(config, policy, logprobs, World(),
                         limit=models.position_limit(policy.hf_model))
    policy.hf_model.save_pretrained(out)
    policy.tokenizer.save_pretrained(out)
