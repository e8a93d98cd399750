"""One update() of the trainer: what micro-batches, gradient checkpointing and bf16 cost.

Question: on a model whose activations dominate memory, how much added peak memory does
each option of issue 10 save, and at what time, against the plain fp32 step measured in
the same run? A step is ``gspo.train.update.update``: old log-probs (no grad), then one
minibatch forward + backward + AdamW step on B sequences of P prompt + T response tokens.

Model: a random Qwen2 from gspo.train.tiny (the character vocabulary, so the LM head is
small and the decoder's activations are what the options act on). Each case runs in its
own subprocess (bench/common.py: added peak RSS over the RSS after building model and
batch). Warm-up: one full step, then ``--repeats`` timed steps.

Measured 2026-11-25 (torch 2.13 CPU, 2 cores shared: 1-min load 6-10, so times are noisy;
added peak memory is what to read):

    case                budget  step s  added peak MiB  time / fp32  memory / fp32
    fp32 (baseline)          -   43.08            2562         1.00           1.00
    micro-batches         4096   53.31            1391         1.24           0.54
    micro-batches         1024   78.43             527         1.82           0.21
    grad checkpointing       -   77.08            1504         1.79           0.59
    bf16                     -   40.79            1756         0.95           0.69
    all three             1024   40.65             464         0.94           0.18

    .venv/bin/python bench/step.py                      # the table above (about 20 min)
    .venv/bin/python bench/step.py --layers 2 --hidden 128 --batch 8    # a quick look
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402

CASES = [
    {"case": "fp32 (baseline)"},
    {"case": "micro-batches", "max_tokens_per_microbatch": 4096},
    {"case": "micro-batches", "max_tokens_per_microbatch": 1024},
    {"case": "grad checkpointing", "grad_checkpointing": True},
    {"case": "bf16", "dtype": "bf16"},
    {"case": "all three", "dtype": "bf16", "grad_checkpointing": True,
     "max_tokens_per_microbatch": 1024},
]  # fmt: skip


def child(case: dict) -> dict:
    from gspo.causal_lm import CausalLMLogprobs
    from gspo.train.config import TrainConfig
    from gspo.train.rollout import Rollout
    from gspo.train.tiny import tiny_model
    from gspo.train.update import COMPUTE_DTYPES, enable_grad_checkpointing, update

    torch.set_num_threads(case["threads"])
    b, p, t = case["batch"], case["prompt"], case["response"]
    model = tiny_model(layers=case["layers"], hidden=case["hidden"], seed=0).train()
    options = {k: case[k] for k in ("max_tokens_per_microbatch", "grad_checkpointing", "dtype")
               if k in case}  # fmt: skip
    config = TrainConfig(minibatches=1, prompts_per_step=b // 2, group_size=2, **options)
    if config.grad_checkpointing:
        enable_grad_checkpointing(model)
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(t // 4, t + 1, (b,), generator=gen)  # ragged responses
    response_mask = torch.arange(t)[None, :] < lengths[:, None]
    rollout = Rollout(
        prompts=[{"prompt": ""}] * b, input_ids=torch.randint(4, 50, (b, p + t), generator=gen),
        attention_mask=torch.cat([torch.ones(b, p, dtype=torch.long), response_mask.long()], 1),
        response_mask=response_mask, prompt_len=p, completions=[""] * b,
    )  # fmt: skip
    adv = torch.randn(b, generator=gen)
    engine = CausalLMLogprobs(model, compute_dtype=COMPUTE_DTYPES[config.dtype])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    def step():
        update(engine, None, optimizer, scheduler, rollout, adv, config=config)

    result = common.measure(step, warmup=1, repeats=case["repeats"])
    result["tokens"] = b * (p + t)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16, help="sequences per step (B)")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens (P)")
    parser.add_argument("--response", type=int, default=448, help="longest response (T)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    shared = vars(args)
    rows = []
    for case in CASES:
        result = common.isolated(__file__, {**shared, **case})
        rows.append({**case, **result})
    base = rows[0]
    for row in rows:
        if "median_s" in row and "median_s" in base:
            row["time_ratio"] = row["median_s"] / base["median_s"]
            row["memory_ratio"] = row["peak_added_mib"] / base["peak_added_mib"]
    columns = [("case", "case", ""), ("max_tokens_per_microbatch", "budget", ""),
               ("median_s", "step s", ".2f"), ("peak_added_mib", "added peak MiB", ".0f"),
               ("time_ratio", "time / fp32", ".2f"), ("memory_ratio", "memory / fp32", ".2f"),
               ("loadavg_1min", "load", ".1f")]  # fmt: skip
    common.print_table(rows, name="step", columns=columns, extra=shared)


if __name__ == "__main__":
    case = common.case_from_argv()
    if case is not None:
        common.report(child(case))
    else:
        main()
