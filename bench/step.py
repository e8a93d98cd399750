"""How long does the update of one rollout batch take, and how far is it from the machine's limit?

Shapes: the SmolLM2 recipe (examples/smollm2-arith.toml): SmolLM2-135M-Instruct, 16 arith
prompts rendered with the recipe's system prompt through the chat template (left-padded as
the engines pad them), 8 samples each, responses of 8-32 tokens (random tokens, lengths
uniform: the update's cost depends on the shapes, not the words), 2 minibatches, old
log-probs from the sampler (the recipe's --old-logprobs sampler: the update is the two
minibatches' forward + backward + AdamW steps).

Cases, on the same rollout batch from the same weights in one process (each is
``gspo.train.update.update`` under that configuration):

    today          --no-shared-prefix --no-fused-loss   (the trainer before issue 18)
    shared prefix  --no-fused-loss                      each group's prompt once, packed
    fused loss     --no-shared-prefix                   the loss inside the LM-head pass
    new default    both

The JSON line holds ``update_speedup`` (today / new default), ``max_abs_grad_diff`` (the
first minibatch's float32 gradient at the same weights, today vs new default, with
``max_abs_grad`` for scale), ``model_tflop`` (the arithmetic one update needs: 6 x the
decoder's weights x the real tokens of the packed forward, the attention's products over the
keys each token sees, and 6 H V per response token for the LM head; padding and repeated
prompts excluded), ``achieved_gflops`` per case (model_tflop / its time: today's path does
more arithmetic than this, so its figure is the useful rate) and ``peak_gflops`` (a
[tokens, H] x [H, I] float32 matmul of the model's MLP shapes timed in the same run: what
this machine's cores reach on the model's largest products; ``*_cpu``: per CPU second of
this process, the same figures where the cores are shared). Each case also reports its
CPU seconds (``time.process_time``, this process's threads): on cores shared with other
work, wall time measures the neighbours as much as the update, CPU time much less.
``max_abs_grad_diff_reordered`` is the floor to read the grad difference against: today's
path against itself in two micro-batches (the same sums in another order).

    .venv/bin/python bench/step.py                          # the recipe's shapes
    .venv/bin/python bench/step.py --prompts 4 --warmup 0   # a quick look (4 groups)
    .venv/bin/python bench/step.py --model tiny             # no SmolLM2 needed
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "examples" / "smollm2-arith.toml"
CASES = {
    "today": {"shared_prefix": False, "fused_loss": False},
    "shared prefix": {"shared_prefix": True, "fused_loss": False},
    "fused loss": {"shared_prefix": False, "fused_loss": True},
    "new default": {"shared_prefix": True, "fused_loss": True},
}


def recipe_settings() -> dict:
    import tomllib

    return tomllib.loads(RECIPE.read_text())


def build_rollout(tokenizer, args, recipe: dict):
    """B = prompts x G rows: the recipe's prompts, random responses of 8..response tokens."""
    from gspo.train.rollout import assemble, encode_prompts
    from gspo.train.tasks import build_task

    pool, _, _ = build_task(task="arith", prompts_file=None, reward=None, eval_size=1, seed=0,
                            levels=recipe.get("task_levels", ()))  # fmt: skip
    rows = [p for p in pool[: args.prompts] for _ in range(args.group_size)]
    ids = encode_prompts(tokenizer, rows, recipe.get("system_prompt"))
    gen = torch.Generator().manual_seed(0)
    eos = tokenizer.eos_token_id
    lengths = torch.randint(8, args.response + 1, (len(rows),), generator=gen).tolist()
    vocab = min(len(tokenizer), 10_000)
    responses = []
    for n in lengths:
        body = torch.randint(3, vocab, (n - 1,), generator=gen).tolist()
        responses.append([t if t != eos else eos + 1 for t in body] + [eos])
    return assemble(tokenizer, rows, ids, responses, None, eos=[eos])


def model_flop(model, rollout) -> float:
    """FLOPs one update needs (module docstring): decoder weights, attention, LM head."""
    from gspo.prefix import groups

    config = model.config
    h, v = config.hidden_size, config.vocab_size
    layers = config.num_hidden_layers
    decoder = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n or ".h." in n)
    p = rollout.prompt_len
    tokens = keys = 0
    for g in groups(rollout.input_ids, rollout.attention_mask, p):
        n_p = int(rollout.attention_mask[g.start, :p].sum())
        tokens += n_p
        keys += n_p * (n_p + 1) // 2  # prompt token i sees i + 1 keys
        for r in rollout.response_mask[g].sum(dim=1).tolist():
            tokens += r
            keys += r * n_p + r * (r + 1) // 2
    targets = int(rollout.response_mask.sum())
    # forward 2 flops per weight per token, backward 4; attention: QK^T and PV, 2 x 2 x H per
    # key per layer forward, x3 with the backward
    return 6.0 * decoder * tokens + 12.0 * layers * h * keys + 6.0 * h * v * targets


def peak_gflops(model, tokens: int, repeats: int = 5) -> tuple[float, float]:
    """GFLOP/s of a [tokens, H] x [H, I] float32 matmul (the MLP's up projection): per
    second of wall time, and per CPU second of this process (its threads together)."""
    h = model.config.hidden_size
    i = getattr(model.config, "intermediate_size", None) or 4 * h
    a, b = torch.randn(tokens, h), torch.randn(h, i)
    cpu = time.process_time()
    result = common.timer(lambda: a @ b, warmup=0, repeats=repeats)
    cpu = (time.process_time() - cpu) / repeats
    flop = 2.0 * tokens * h * i
    return flop / result["median_s"] / 1e9, flop / cpu / 1e9


def first_minibatch_grads(engine, model, rollout, adv, config) -> torch.Tensor:
    from gspo.train.update import accumulate_gradients

    size = len(rollout) // config.optim.minibatches
    part = slice(0, size)
    model.zero_grad(set_to_none=True)
    accumulate_gradients(engine, rollout.select(part), logp_old=rollout.logp_sampler[part],
                         adv=adv[part], ref_logp=None, config=config, world_size=1,
                         budget=config.optim.max_tokens_per_microbatch)  # fmt: skip
    grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return torch.cat(grads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="smollm2 (the recipe's) or tiny")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per rollout batch")
    parser.add_argument("--group-size", type=int, default=8, help="G")
    parser.add_argument("--response", type=int, default=32, help="longest response (tokens)")
    parser.add_argument("--minibatches", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1, help="untimed updates per case")
    parser.add_argument("--repeats", type=int, default=1, help="timed updates per case")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from gspo.causal_lm import CausalLMLogprobs
    from gspo.prefix import pack
    from gspo.train.config import TrainConfig
    from gspo.train.models import load
    from gspo.train.update import response_logprobs, update

    recipe = recipe_settings()
    model, tokenizer = load(args.model)
    model.eval()  # the trainer's default (--keep-dropout off)
    rollout = build_rollout(tokenizer, args, recipe)
    start = copy.deepcopy(model.state_dict())
    base = dict(prompts_per_step=args.prompts, group_size=args.group_size,
                minibatches=args.minibatches, lr=recipe.get("lr", 3e-5),
                temperature=recipe.get("temperature", 1.0),
                old_logprobs="sampler")  # fmt: skip
    engine = CausalLMLogprobs(model)
    with torch.no_grad():  # the sampler's log-probs: the policy's own (ratios start at 1)
        rollout.logp_sampler, _ = response_logprobs(
            engine, rollout, temperature=base["temperature"], shared_prefix=True
        )
    rewards = torch.rand(len(rollout), generator=torch.Generator().manual_seed(1))
    from gspo.advantages import advantages

    adv = advantages(rewards, group_size=args.group_size)
    rows = []
    for name in args.cases:
        config = TrainConfig(**base, **CASES[name])

        def step(config=config):
            model.load_state_dict(start)
            optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.99))
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
            update(engine, None, optimizer, scheduler, rollout, adv, config=config)

        cpu = []  # CPU seconds of this process: less swayed than wall time by other processes

        def timed(step=step, cpu=cpu):
            begin = time.process_time()
            step()
            cpu.append(time.process_time() - begin)

        result = common.timer(timed, warmup=args.warmup, repeats=args.repeats)
        cpu_s = statistics.median(cpu[args.warmup :])
        rows.append({"case": name, **result, "cpu_s": cpu_s, "loadavg_1min": os.getloadavg()[0]})
        print(f"{name}: {result['median_s']:.2f} s, {cpu_s:.2f} CPU s", file=sys.stderr,
              flush=True)  # fmt: skip
    model.load_state_dict(start)
    grads = {}
    # "reordered": today's path in micro-batches of about half the minibatch: the same sums in
    # another order, the float32 rounding any exact change of the computation shows
    half = int(rollout.input_ids.numel() / args.minibatches / 2) + 1
    for name, options in (
        ("today", CASES["today"]),
        ("new default", CASES["new default"]),
        ("reordered", {**CASES["today"], "max_tokens_per_microbatch": half}),
    ):
        grads[name] = first_minibatch_grads(engine, model, rollout, adv,
                                            TrainConfig(**base, **options))  # fmt: skip
    flop = model_flop(model, rollout)
    packed_tokens = pack(rollout.input_ids, rollout.attention_mask, rollout.prompt_len).tokens
    peak, peak_cpu = peak_gflops(model, tokens=packed_tokens // args.minibatches)
    by_case = {r["case"]: r for r in rows}
    for row in rows:
        row["achieved_gflops"] = flop / row["median_s"] / 1e9
        row["of_peak"] = row["achieved_gflops"] / peak
        row["achieved_gflops_cpu"] = flop / row["cpu_s"] / 1e9  # per CPU second
        row["of_peak_cpu"] = row["achieved_gflops_cpu"] / peak_cpu
        if "today" in by_case:
            row["speedup"] = by_case["today"]["median_s"] / row["median_s"]
            row["cpu_speedup"] = by_case["today"]["cpu_s"] / row["cpu_s"]
    columns = [("case", "case", ""), ("median_s", "update s", ".2f"),
               ("speedup", "speedup", ".2f"), ("cpu_s", "CPU s", ".2f"),
               ("cpu_speedup", "CPU speedup", ".2f"), ("achieved_gflops", "GFLOP/s", ".1f"),
               ("of_peak", "of peak", ".2f"), ("achieved_gflops_cpu", "GFLOP/CPU s", ".1f"),
               ("of_peak_cpu", "of peak (CPU)", ".2f"),
               ("loadavg_1min", "load", ".1f")]  # fmt: skip
    extra = {
        "model": args.model,
        "batch": f"{args.prompts} prompts x {args.group_size}, P = {rollout.prompt_len}, "
        f"responses <= {args.response}, {args.minibatches} minibatches",
        "response_tokens": int(rollout.response_mask.sum()),
        "padded_tokens": int(rollout.input_ids.numel()),
        "packed_tokens": packed_tokens,
        "model_tflop": flop / 1e12,
        "peak_gflops": peak,
        "peak_gflops_cpu": peak_cpu,
        "threads": args.threads,
        "max_abs_grad_diff": float((grads["today"] - grads["new default"]).abs().max()),
        "max_abs_grad": float(grads["today"].abs().max()),
        "max_abs_grad_diff_reordered": float((grads["today"] - grads["reordered"]).abs().max()),
        "achieved_gflops": by_case.get("new default", rows[-1])["achieved_gflops"],
        "when": time.strftime("%Y-%m-%d %H:%M"),
    }
    if "today" in by_case and "new default" in by_case:
        today, new = by_case["today"], by_case["new default"]
        extra["update_speedup"] = today["median_s"] / new["median_s"]
        extra["update_speedup_cpu"] = today["cpu_s"] / new["cpu_s"]
    common.print_table(rows, name="step", columns=columns, extra=extra)


if __name__ == "__main__":
    main()
