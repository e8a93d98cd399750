"""Regenerate docs/training.md's numbers for the default run (`make default-run`).

Runs `gspo train` with its defaults for each seed (in a fresh temporary directory each),
then prints the markdown block docs/training.md quotes between its `default-run` markers: time, the
held-out reward table of seed 0, final and best rewards, and the worst second-half drop
below the running best for every seed. With --write it replaces that block in docs/training.md and
copies seed 0's reward.png to docs/reward.png.

    .venv/bin/python scripts/default_run.py              # print the block
    .venv/bin/python scripts/default_run.py --write      # and update docs/training.md, reward.png
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- default-run:begin -->", "<!-- default-run:end -->"
TABLE_STEPS = (0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 150, 200, 250, 300)


def summarise(rows: list[dict]) -> dict:
    """Held-out rewards by step, the last and best, and the worst drop below the running best
    over the second half of the run (how far the policy fell back once it had learned)."""
    evals = {r["step"]: r["eval_reward"] for r in rows if "eval_reward" in r}
    last_step = max(evals)
    best, drop = float("-inf"), 0.0
    for step in sorted(evals):
        best = max(best, evals[step])
        if step > last_step / 2:
            drop = max(drop, best - evals[step])
    times = [r["step_time"] for r in rows if "step_time" in r]
    return {"evals": evals, "final": evals[last_step], "best": best, "drop": drop,
            "steps": last_step, "train_s": sum(times),
            "median_step_s": statistics.median(times)}  # fmt: skip


def run(seed: int, out: Path) -> tuple[dict, float]:
    cmd = [str(Path(sys.executable).parent / "gspo"), "train", "--seed", str(seed),
           "--no-progress", "--run-dir", str(out)]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=out.parent)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summarise(rows), wall


def block(results: dict[int, tuple[dict, float]], load: str) -> str:
    first, wall = results[min(results)]
    steps = [s for s in TABLE_STEPS if s in first["evals"]]
    lines = [
        BEGIN,
        f"`make default-run` (`scripts/default_run.py`, seed {min(results)}, 2 CPU cores shared, "
        f"load average {load}): {first['steps']} steps in {first['train_s']:.0f} s "
        f"of training ({first['median_step_s']:.2f} s a step, median; {wall:.0f} s for the whole "
        "command). Held-out greedy reward:",
        "",
        "| step | " + " | ".join(map(str, steps)) + " |",
        "|---|" + "---|" * len(steps),
        "| held-out reward | " + " | ".join(f"{first['evals'][s]:.2f}" for s in steps) + " |",
        "",
        "| seed | final | best | worst second-half drop below the running best |",
        "|---|---|---|---|",
    ]
    for seed, (s, _) in sorted(results.items()):
        lines.append(f"| {seed} | {s['final']:.3f} | {s['best']:.3f} | {s['drop']:.3f} |")
    lines.append(END)
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--write", action="store_true", help="update docs/training.md")
    args = parser.parse_args()
    results, load_start = {}, os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            out = Path(tmp) / f"seed{seed}"
            results[seed] = run(seed, out)
            if seed == args.seeds[0] and args.write:
                shutil.copy(out / "reward.png", REPO / "docs" / "reward.png")
    load = f"{load_start:.1f} at start, {os.getloadavg()[0]:.1f} at the end"
    text = block(results, load)
    print(text)
    if args.write:
        readme = REPO / "docs" / "training.md"
        old = readme.read_text()
        start, end = old.index(BEGIN), old.index(END) + len(END)
        readme.write_text(old[:start] + text + old[end:])
        print(f"wrote {readme} and docs/reward.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
