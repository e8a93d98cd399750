"""One training step's time with HF ``generate`` rollouts vs vLLM rollouts.

Question: how much faster does a GSPO step run when vLLM samples (issue 8's goal: vLLM
>= 2x HF tokens/s on a real model on this machine), and where does a step's time go?
The same model, prompts, batch and sampling settings for both engines; each engine runs
in its own subprocess (vLLM in process takes over torch's thread settings), float32.

A step: generate (prompts x G samples) -> old log-probs (the trainer's forward, eval
mode) -> update (``minibatches`` optimizer steps; its own old-log-prob forward skipped,
as it was timed apart) -> weight sync (vLLM: the policy's weights into the engine in
place; HF: nothing, it samples from the policy itself). One warm-up step, then
``--steps`` timed ones (medians). tokens/s = generated response tokens / generate time.

    python bench/rollout.py                       # the built-in tiny model
    python bench/rollout.py --model smollm2       # SmolLM2-135M-Instruct (or --model DIR)

Measured 2026-11-25 (2 shared cores; load in the last column, so times are provisional):

    model    engine  threads  tokens/s  vs hf  generate  old logp  update  sync   step
    tiny     hf      1          5556    1.00     0.135     0.048   0.155  0.000  0.338  (4.8)
    tiny     vllm    1          6238    1.12     0.125     0.027   0.098  0.012  0.262  (4.7)
    smollm2  hf      2          34.7    1.00     24.6      12.1    58.0   0      94.7   (4.1)
    smollm2  vllm    2          94.6    2.73     9.6       14.5    73.1   3.8    101.0  (8.4)

vLLM meets the 2x generation goal on the real model; there the update dominates a step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import common

STAGES = ("generate", "old_logprobs", "update", "sync")


def child(case: dict) -> dict:

    import torch

    from gspo.advantages import advantages
    from gspo.causal_lm import CausalLMLogprobs
    from gspo.train import distributed as dd
    from gspo.train import engines, models
    from gspo.train.config import TrainConfig
    from gspo.train.models import load as load_model_and_tokenizer
    from gspo.train.tasks.digitsum import digitsum_prompts
    from gspo.train.update import lr_lambda, old_logprobs, update

    torch.set_num_threads(case["threads"])
    torch.manual_seed(0)
    config = TrainConfig(model=case["model"], rollout=case["engine"], tiny_hidden=128,
                         prompts_per_step=case["prompts"], group_size=case["group_size"],
                         max_new_tokens=case["max_new_tokens"], minibatches=case["minibatches"],
                         temperature=1.0, lr=1e-6, warmup_steps=0)  # fmt: skip
    model, tok = load_model_and_tokenizer(config.model, layers=config.tiny_layers,
                                          hidden=config.tiny_hidden, seed=0)  # fmt: skip
    policy = CausalLMLogprobs(model.train())
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(0, 10**6, 1.0))
    t0 = time.perf_counter()
    trained = models.Policy(model, tok, config.optim, None)
    engine = engines.build(config.sampling, trained, dd.World(), policy, seed=config.seed)
    startup = time.perf_counter() - t0
    prompts = digitsum_prompts(config.prompts_per_step, seed=1)
    no_forward = config.replace(old_logprobs="sampler")
    times = {s: [] for s in STAGES}
    tokens = []
    for step in range(case["steps"] + 1):  # step 0 warms up
        t = [time.perf_counter()]
        rollout = engine.sample(prompts, group_size=config.group_size, greedy=False)
        t.append(time.perf_counter())
        with torch.no_grad():
            old_logprobs(policy, rollout, torch.zeros(len(rollout)), config)
        t.append(time.perf_counter())
        adv = advantages(torch.randn(len(rollout)), group_size=config.group_size)
        update(policy, None, optimizer, scheduler, rollout, adv, config=no_forward)
        t.append(time.perf_counter())
        engine.load_weights(dd.full_params(model))
        t.append(time.perf_counter())
        if step > 0:
            for i, stage in enumerate(STAGES):
                times[stage].append(t[i + 1] - t[i])
            tokens.append(int(rollout.response_mask.sum()))
    engine.close()
    out = {s: statistics.median(v) for s, v in times.items()}
    out["step"] = sum(out[s] for s in STAGES)
    out["tokens"] = statistics.median(tokens)
    out["tokens_per_s"] = sum(tokens) / sum(times["generate"])
    out["startup_s"] = startup
    out["loadavg_1min"] = common.os.getloadavg()[0]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="'tiny' or a local HF model directory")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--minibatches", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads; 0 = as gspo train: 1 for the tiny model (measured: its "
                   "ops run 4x slower on 2 threads of a busy 2-core machine), else 2")  # fmt: skip
    args = p.parse_args()
    args.threads = args.threads or (1 if args.model == "tiny" else 2)
    base = {"model": args.model, "prompts": args.prompts, "group_size": args.group_size,
            "max_new_tokens": args.max_new_tokens, "minibatches": args.minibatches,
            "steps": args.steps, "threads": args.threads}  # fmt: skip
    rows = []
    for engine in ("hf", "vllm"):
        result = common.isolated(__file__, {**base, "engine": engine}, timeout=1800)
        rows.append({"engine": engine, **result})
        if "error" in result:
            print(f"{engine}: {result['error']}", file=sys.stderr)
    hf, vl = rows
    speedup = vl.get("tokens_per_s", 0) / hf["tokens_per_s"] if "tokens_per_s" in hf else None
    for row in rows:
        row["gen_speedup"] = row.get("tokens_per_s", 0) / hf["tokens_per_s"] if speedup else None
        row["step_speedup"] = hf["step"] / row["step"] if "step" in row and "step" in hf else None
    print(f"model {args.model}, {args.prompts} prompts x {args.group_size} samples x <= "
          f"{args.max_new_tokens} tokens, float32, {args.threads} threads; medians of "
          f"{args.steps} steps (seconds)")  # fmt: skip
    columns = [("engine", "engine", ""), ("tokens", "tokens", ".0f"),
               ("tokens_per_s", "tokens/s", ".1f"), ("gen_speedup", "vs hf", ".2f"),
               *[(s, s, ".3f") for s in STAGES], ("step", "step", ".3f"),
               ("step_speedup", "step vs hf", ".2f"), ("startup_s", "startup", ".1f"),
               ("loadavg_1min", "load", ".1f")]  # fmt: skip
    common.print_table(rows, name="rollout", columns=columns, extra={
        "vllm_tokens_per_s": vl.get("tokens_per_s"), "hf_tokens_per_s": hf.get("tokens_per_s"),
        "speedup": speedup, "model": args.model})  # fmt: skip


if __name__ == "__main__":
    common.run(child, main)
