"""Curves from metrics.jsonl: ``reward.png`` (train and held-out reward, clip fraction) and
the comparison of losses (``gspo train --compare``: mean and spread over seeds).
Matplotlib's Agg backend: no display needed."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in rows if key in r]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """reward.png: rewards on the left axis, clip fraction on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    out = Path(out) if out else Path(run_dir) / "reward.png"
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*_series(rows, "reward_mean"), label="train reward (sampled)", alpha=0.6)
    ax.plot(*_series(rows, "eval_reward"), "o-", label="held-out reward (greedy)")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.set_ylim(0, 1.05)
    right = ax.twinx()
    right.plot(*_series(rows, "clip_frac"), color="tab:gray", lw=0.8, label="clip fraction")
    right.set_ylabel("clip fraction")
    lines = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="lower right", fontsize=8)
    ax.set_title(Path(run_dir).name)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_compare(runs: dict[str, Sequence[str | Path] | str | Path], out: str | Path) -> Path:
    """Held-out reward of several losses on one axis: per label (a loss), the mean over its
    runs (seeds) at each evaluation step, and the band from the lowest to the highest run.
    A label with one run is its curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    count = 1
    for label, dirs in runs.items():
        dirs = [dirs] if isinstance(dirs, str | Path) else list(dirs)
        count = max(count, len(dirs))
        curves = [dict(zip(*_series(read_metrics(d), "eval_reward"), strict=True)) for d in dirs]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        values = [[c[s] for c in curves] for s in steps]
        mean = [sum(v) / len(v) for v in values]
        name = f"{label} (mean of {len(dirs)})" if len(dirs) > 1 else label
        line = ax.plot(steps, mean, "o-", ms=3, label=name)
        if len(dirs) > 1:
            ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values],
                            color=line[0].get_color(), alpha=0.2, lw=0)  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("held-out reward (greedy)")
    ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.05)
    ax.legend(loc="lower right", fontsize=8)
    spread = f", band = min-max over {count} seeds" if count > 1 else ""
    ax.set_title(f"held-out greedy reward, same budget{spread}")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)
