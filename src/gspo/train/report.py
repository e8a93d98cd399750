"""What a run shows while it trains: the step's metrics reduced over minibatches and ranks,
metrics.jsonl, samples.jsonl, the progress bar and printed samples, TensorBoard and W&B.

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
import time
from collections.abc import Sequence
from pathlib import Path

from gspo.train import distributed as dd


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
        total_steps: int = 0,
        progress: bool = False,
    ) -> None:
        self.main, self.samples_per_step = main, samples_per_step
        self.progress = progress and main
        self.bar = _progress(total_steps, truncate_after, show=self.progress)
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

    def step_done(self, record: dict, groups: list[dict], *, show_sample: bool) -> None:
        """One finished step: its metrics, its sample groups, the progress bar; at a held-out
        evaluation (``show_sample``) the step's first group printed above the bar."""
        self.samples(record["step"], groups)
        if show_sample and self.progress:
            for group in groups[:1]:
                self.bar.write(f"step {record['step']}:\n{format_group(group)}")
        self.metrics(record)
        self.bar.update(1)
        shown = {"reward": record["reward_mean"], "clip": record.get("clip_frac"),
                 "eval": self.last_eval}  # fmt: skip
        self.bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items() if v is not None})

    def samples(self, step: int, groups: list[dict]) -> None:
        """The step's first groups, as built by :func:`sample_groups`."""
        if self.main and groups:
            _append(self.samples_path, [{"step": step, **g} for g in groups])
            if self._tb is not None:
                text = "\n\n".join(_markdown(g) for g in groups)
                self._tb.add_text("samples", text, step)

    def close(self) -> None:
        self.bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


# Metrics whose extremes (not means) describe a step: min or max over minibatches and ranks.
EXTREMES = {"ratio_min": False, "ratio_max": True}
EXTREME_SUFFIXES = {"_max_abs": True, "_ratio_min": False, "_ratio_max": True}


def largest(key: str) -> bool | None:
    """True: the step's value is the max of ``key`` over minibatches and ranks; False: the
    min; None: the mean."""
    if key in EXTREMES:
        return EXTREMES[key]
    return next((big for suffix, big in EXTREME_SUFFIXES.items() if key.endswith(suffix)), None)


def step_metrics(step: int, rewards, rollout, history: list[dict], t0: float, lr: float,
                 world: dd.World) -> dict:  # fmt: skip
    """One step's record: rewards over all ranks, the minibatches' metrics (means, or the
    extremes of ``largest``), each reward function's mean, lengths, lr and timing."""
    n = float(len(rewards))
    lengths = rollout.response_mask.sum(dim=1).float()
    s, s2, tokens, count = dd.all_sum(
        [sum(rewards), sum(r * r for r in rewards), float(lengths.sum()), n], world
    )
    mean = s / count
    # A minibatch with no sequence in the loss (gspo.train.sampling: tied or truncated) has
    # NaN loss metrics: means and extremes are over the minibatches and ranks that had some.
    seen = {k: [h[k] for h in history if not math.isnan(h[k])] for k in history[0]}
    local = {k: sum(v) / len(v) if v else math.nan for k, v in seen.items()}
    extremes = {k: big for k in local if (big := largest(k)) is not None}
    for key, big in extremes.items():
        local[key] = (max if big else min)(seen[key]) if seen[key] else math.nan
    # several reward functions: each one's mean on its own (rewards.Scores.parts)
    local.update({f"reward/{name}": sum(v) / n for name, v in rewards.parts.items()})
    merged = _mean_over_ranks(local, world)
    for key, big in extremes.items():
        bound = -math.inf if big else math.inf  # a rank with nothing to offer
        value = local[key] if not math.isnan(local[key]) else bound
        value = dd.all_extreme(value, world, largest=big)
        merged[key] = value if math.isfinite(value) else math.nan
    if "clip_frac_low" in merged:  # the losses that clip (not sapo's gate, cispo's weight)
        merged["clip_frac"] = merged["clip_frac_low"] + merged["clip_frac_high"]
    # Each rank has its own sampler (vLLM on every rank): say per rank that it agrees.
    per_rank = [k for k in ("mismatch_k3", "mismatch_max_abs") if k in local]
    if world.distributed and per_rank:
        for r, values in enumerate(dd.all_gather_floats([local[k] for k in per_rank], world)):
            merged.update({f"{k}/rank{r}": v for k, v in zip(per_rank, values, strict=True)})
    elapsed = time.perf_counter() - t0
    return {
        "step": step,
        "reward_mean": mean,
        "reward_std": max(0.0, s2 / count - mean * mean) ** 0.5,
        **merged,
        "response_len": tokens / count,
        "lr": lr,
        "step_time": elapsed,
        "tokens_per_s": tokens / elapsed,
    }


def _mean_over_ranks(local: dict[str, float], world: dd.World) -> dict[str, float]:
    """The mean of each value over the ranks where it is not NaN (NaN where it is nowhere)."""
    if not world.distributed:
        return dict(local)
    keys = sorted(local)
    present = [0.0 if math.isnan(local[k]) else 1.0 for k in keys]
    sums = dd.all_sum([0.0 if math.isnan(local[k]) else local[k] for k in keys] + present, world)
    return {k: sums[i] / sums[i + len(keys)] if sums[i + len(keys)] else math.nan
            for i, k in enumerate(keys)}  # fmt: skip


def _progress(total: int, initial: int, *, show: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="gspo train", unit="step", disable=not show,
                dynamic_ncols=True)  # fmt: skip


def sample_groups(prompts, completions, rewards, adv, *, group_size: int, count: int,
                  episodes=None) -> list:  # fmt: skip
    """The first ``count`` groups of a step: ``{"prompt", "completions": [{"text",
    "reward", "advantage"}]}``; ``prompts`` and the rest are per sequence [B]. With
    multi-turn ``episodes`` (Rollout.episodes) each completion also has ``"turns"``, the
    episode's messages in order, and ``"truncated"``; its ``"text"`` is the last reply."""
    out = []
    for g in range(min(count, len(completions) // group_size)):
        rows = range(g * group_size, (g + 1) * group_size)
        items = []
        for i in rows:
            item = {"text": completions[i], "reward": float(rewards[i]),
                    "advantage": float(adv[i])}  # fmt: skip
            if episodes is not None:
                item.update(turns=episodes[i]["turns"], truncated=episodes[i]["truncated"])
                # function tools (--tools, a TRL-shaped --env): calls made and failed
                item.update({k: episodes[i][k] for k in ("tool_calls", "tool_errors")
                             if "tool_errors" in episodes[i]})  # fmt: skip
                if "environment" in episodes[i]:  # several --env classes: the row's
                    item["environment"] = episodes[i]["environment"]
            items.append(item)
        out.append({"prompt": _prompt_of(prompts[rows[0]], episodes and episodes[rows[0]]),
                    "completions": items})  # fmt: skip
    return out


def _prompt_of(row: dict, episode: dict | None):
    """The row's prompt; for an environment's row without one (docs/environments.md: its
    reset() writes the first message), that first message as the episode recorded it."""
    if "prompt" in row or not episode:
        return row.get("prompt")
    return episode["turns"][0]["content"]


def format_group(group: dict, width: int = 100) -> str:
    """A group as a few printable lines (for the console every --eval-every steps)."""
    lines = [f"prompt: {_clip(group['prompt'], width)}"]
    for c in group["completions"]:
        head = f"  r={c['reward']:+.2f} A={c['advantage']:+.2f} | "
        if "turns" not in c:
            lines.append(head + _clip(c["text"], width))
            continue
        # an episode, turn by turn (the first message is the prompt, printed above)
        turns = c["turns"][1:]
        cut = " (truncated)" if c.get("truncated") else ""
        lines.append(head + f"{sum(t['role'] == 'assistant' for t in turns)} turns{cut}")
        lines += [f"      {t['role']}: {_clip(t['content'], width)}" for t in turns]
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
