"""Curves from metrics.jsonl: ``reward.png`` (train and held-out reward, clip fraction) and
the GSPO-vs-GRPO comparison. Matplotlib's Agg backend: no display needed."""

from __future__ import annotations

import json
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


def plot_compare(runs: dict[str, str | Path], out: str | Path) -> Path:
    """Held-out reward of several runs (e.g. gspo and grpo) on one axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, run_dir in runs.items():
        rows = read_metrics(run_dir)
        line = ax.plot(*_series(rows, "eval_reward"), "o-", label=f"{label} held-out (greedy)")
        ax.plot(*_series(rows, "reward_mean"), color=line[0].get_color(), alpha=0.3,
                label=f"{label} train (sampled)")  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.set_ylim(0, 1.05)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("held-out greedy reward, same seed and budget")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)
