"""What a run shows while it trains: metrics.jsonl, samples.jsonl, TensorBoard and W&B.

Everything is written by rank 0 only. On resume, lines past the checkpoint's step are
dropped from both JSONL files, so they read as if the run had never stopped.

* ``metrics.jsonl``: one line per step (reward, clipping, ratio, KL, lengths, timings).
* ``samples.jsonl``: every step, the first ``samples_per_step`` groups: the prompt, every
  completion with its reward and advantage, so a reader sees *what* is being reinforced.
* ``--report-to tensorboard``: the same scalars as TensorBoard events under RUN_DIR/tb.
* ``--report-to wandb``: the same scalars to Weights & Biases; with ``WANDB_MODE=offline``
  (the default here when no API key is set) it writes RUN_DIR/wandb and needs no network.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

SINKS = ("tensorboard", "wandb")


class Report:
    def __init__(
        self,
        run_dir: Path,
        *,
        main: bool,
        truncate_after: int,
        report_to: Sequence[str] = (),
        config: dict | None = None,
        samples_per_step: int = 2,
    ) -> None:
        self.main, self.samples_per_step = main, samples_per_step
        self.metrics_path = run_dir / "metrics.jsonl"
        self.samples_path = run_dir / "samples.jsonl"
        self.last_eval = math.nan
        self._tb = self._wandb = None
        if not main:
            return
        for row in _truncate(self.metrics_path, truncate_after):
            self.last_eval = row.get("eval_reward", self.last_eval)
        _truncate(self.samples_path, truncate_after)
        if "tensorboard" in report_to:
            self._tb = _tensorboard(run_dir / "tb", purge_step=truncate_after + 1)
        if "wandb" in report_to:
            self._wandb = _wandb(run_dir, config or {}, resume=truncate_after > 0)

    def metrics(self, record: dict) -> None:
        """One step's scalars to every sink (non-numbers stay in metrics.jsonl only)."""
        self.last_eval = record.get("eval_reward", self.last_eval)
        if not self.main:
            return
        _append(self.metrics_path, [record])
        step = record["step"]
        scalars = {k: v for k, v in record.items() if k != "step" and _is_scalar(v)}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def samples(self, step: int, groups: list[dict]) -> None:
        """The step's first groups, as built by :func:`sample_groups`."""
        if self.main and groups:
            _append(self.samples_path, [{"step": step, **g} for g in groups])
            if self._tb is not None:
                text = "\n\n".join(_markdown(g) for g in groups)
                self._tb.add_text("samples", text, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def sample_groups(prompts, completions, rewards, adv, *, group_size: int, count: int) -> list:
    """The first ``count`` groups of a step: ``{"prompt", "completions": [{"text",
    "reward", "advantage"}]}``; ``prompts`` and the rest are per sequence [B]."""
    out = []
    for g in range(min(count, len(completions) // group_size)):
        rows = range(g * group_size, (g + 1) * group_size)
        out.append({
            "prompt": prompts[rows[0]]["prompt"],
            "completions": [{"text": completions[i], "reward": float(rewards[i]),
                             "advantage": float(adv[i])} for i in rows],
        })  # fmt: skip
    return out


def format_group(group: dict, width: int = 100) -> str:
    """A group as a few printable lines (for the console every --eval-every steps)."""
    lines = [f"prompt: {_clip(group['prompt'], width)}"]
    for c in group["completions"]:
        lines.append(f"  r={c['reward']:+.2f} A={c['advantage']:+.2f} | {_clip(c['text'], width)}")
    return "\n".join(lines)


def _is_scalar(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _markdown(group: dict) -> str:
    rows = "\n".join(f"| {c['reward']:.2f} | {c['advantage']:+.2f} | {_clip(c['text'], 300)} |"
                     for c in group["completions"])  # fmt: skip
    head = "| reward | A | completion |\n|---|---|---|"
    return f"**{_clip(group['prompt'], 300)}**\n\n{head}\n{rows}"


def _truncate(path: Path, after: int) -> list[dict]:
    """Keep the rows of steps <= ``after`` (all of them dropped for a fresh run)."""
    kept = []
    if after > 0 and path.exists():
        kept = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        kept = [row for row in kept if row["step"] <= after]
    path.write_text("".join(json.dumps(row) + "\n" for row in kept))
    return kept


def _append(path: Path, rows: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(row) + "\n" for row in rows))


def _tensorboard(log_dir: Path, purge_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("--report-to tensorboard needs the 'tensorboard' package: "
                         "pip install tensorboard") from None  # fmt: skip
    # purge_step drops events a killed run wrote past its last checkpoint.
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def _wandb(run_dir: Path, config: dict, *, resume: bool):
    try:
        import wandb
    except ImportError:
        raise ValueError("--report-to wandb needs the 'wandb' package: pip install wandb") from None
    # No key and no mode chosen: log locally rather than fail to log in.
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY")
                                             else "offline")  # fmt: skip
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "gspo"), name=run_dir.name,
                      dir=str(run_dir), config=config, id=_wandb_id(run_dir), mode=mode,
                      resume="allow" if resume else None)  # fmt: skip


def _wandb_id(run_dir: Path) -> str:
    # A stable id per run directory, so a resumed run continues the same W&B run.
    import hashlib

    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:12]
