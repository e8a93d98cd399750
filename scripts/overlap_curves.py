"""The default task, synchronous vs --async-rollouts (one step off-policy): held-out reward
curves of every seed in one plot (docs/async.png), and a markdown table of the final and
best held-out rewards and the policy_lag of every step.

Each (mode, seed) is a default `gspo train` run (300 steps) in its own subprocess; ``--jobs``
run at once (each uses one torch thread, plus the sampler thread when asynchronous).
Existing run directories under ``--out`` are read, not run again, so an interrupted sweep
continues and ``--plot-only`` redraws from what is there.

    .venv/bin/python scripts/overlap_curves.py                     # 3 seeds x 2 modes
    .venv/bin/python scripts/overlap_curves.py --seeds 0 --steps 100 --out /tmp/curves
    .venv/bin/python scripts/overlap_curves.py --extra async-sampler="--async-rollouts \
        --old-logprobs sampler"                                     # another mode beside them
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = {"sync": [], "async": ["--async-rollouts"]}


def run(out: Path, mode: str, flags: list[str], seed: int, steps: int) -> Path:
    run_dir = out / f"{mode}-s{seed}"
    if (run_dir / "metrics.jsonl").exists() and (run_dir / "model").exists():
        return run_dir  # finished before
    cmd = [str(Path(sys.executable).parent / "gspo"), "train", "--seed", str(seed),
           "--steps", str(steps), "--no-progress", "--no-plot", "--run-dir", str(run_dir),
           *flags]  # fmt: skip
    if run_dir.exists():
        cmd = [*cmd[:2], "--resume", str(run_dir)]  # interrupted: continue it
    subprocess.run(cmd, check=True, cwd=out)
    return run_dir


def read(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def summary(runs: dict[tuple[str, int], Path]) -> str:
    lines = ["| mode | seed | final held-out | best | policy_lag (steps 1 / 2..) | median step s |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for (mode, seed), run_dir in sorted(runs.items()):
        rows = read(run_dir)
        evals = [r["eval_reward"] for r in rows if "eval_reward" in r]
        lags = [r.get("policy_lag", 0) for r in rows if "step_time" in r]
        times = sorted(r["step_time"] for r in rows if "step_time" in r)
        later = f"{min(lags[1:])}-{max(lags[1:])}" if len(lags) > 1 else "-"
        lines.append(f"| {mode} | {seed} | {evals[-1]:.3f} | {max(evals):.3f} | "
                     f"{lags[0]} / {later} | {times[len(times) // 2]:.2f} |")  # fmt: skip
    return "\n".join(lines)


def plot(runs: dict[tuple[str, int], Path], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    colours = {}
    for (mode, seed), run_dir in sorted(runs.items()):
        rows = [r for r in read(run_dir) if "eval_reward" in r]
        colour = colours.setdefault(mode, f"C{len(colours)}")
        ax.plot([r["step"] for r in rows], [r["eval_reward"] for r in rows], color=colour,
                alpha=0.8, lw=1.2, label=mode if seed == min(s for m, s in runs if m == mode)
                else None)  # fmt: skip
    ax.axhline(0.85, color="gray", lw=0.6, ls="--")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out reward (greedy)")
    ax.set_ylim(0, 1.05)
    ax.set_title("digitsum, tiny model: synchronous vs one step off-policy (each seed a line)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "overlap-curves")
    parser.add_argument("--png", type=Path, default=REPO / "docs" / "async.png")
    parser.add_argument("--extra", action="append", default=[], metavar="NAME=FLAGS")
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()
    modes = dict(MODES)
    for item in args.extra:
        name, _, flags = item.partition("=")
        modes[name] = shlex.split(flags)
    args.out.mkdir(parents=True, exist_ok=True)
    todo = [(mode, seed) for mode in modes for seed in args.seeds]
    if args.plot_only:
        runs = {key: args.out / f"{key[0]}-s{key[1]}" for key in todo
                if (args.out / f"{key[0]}-s{key[1]}" / "metrics.jsonl").exists()}  # fmt: skip
    else:
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = {key: pool.submit(run, args.out, key[0], modes[key[0]], key[1], args.steps)
                       for key in todo}  # fmt: skip
            runs = {key: f.result() for key, f in futures.items()}
    plot(runs, args.png)
    print(summary(runs))


if __name__ == "__main__":
    main()
