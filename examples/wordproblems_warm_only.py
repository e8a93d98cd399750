"""The word-problem recipe's warm start alone, saved for `gspo eval`: the same config, seed
and episodes as the recipe's run (examples/smollm2-wordproblems.toml).

    .venv/bin/python examples/wordproblems_warm_only.py runs/wordproblems-warm-only
    .venv/bin/gspo eval --config examples/smollm2-wordproblems.toml \\
        --model runs/wordproblems-warm-only -n 0
"""

import sys

from gspo.causal_lm import CausalLMLogprobs
from gspo.config import load_file
from gspo.train import models, warmstart
from gspo.train.config import TrainConfig
from gspo.train.distributed import World

if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "runs/wordproblems-warm-only"
    config = TrainConfig(**load_file("examples/smollm2-wordproblems.toml"))
    policy = models.build(config)
    policy.prepare(World().device)
    logprobs = CausalLMLogprobs(policy.model, compute_dtype=policy.compute_dtype)
    warmstart.warm_start(config, policy, logprobs, World(),
                         limit=models.position_limit(policy.hf_model))
    policy.hf_model.save_pretrained(out)
    policy.tokenizer.save_pretrained(out)  # with the recipe's chat template
