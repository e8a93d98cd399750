"""`gspo train`: flags generated from ``TrainConfig`` (gspo.train.config), plus ``--config FILE``
and ``--compare``.

Precedence: defaults < the resumed run's config.json < --config FILE < flags.
Exit codes: 0 done, 2 bad input (ValueError: the message names the field and the fix),
3 the reward function or the --env environment failed (a checkpoint was saved first),
130 stopped by a signal (a checkpoint was saved; continue with --resume RUN_DIR).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from gspo.config import add_arguments, coerce, from_args, load_file
from gspo.train.config import TrainConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gspo train",
        description="Fine-tune a causal LM with GSPO. With no arguments: a tiny random Qwen2 "
        "learns the built-in digit-sum task on CPU in a few minutes.",
    )
    parser.add_argument("--config", metavar="FILE", help="JSON or TOML file of field = value")
    parser.add_argument(
        "--compare",
        action="store_true",
        help="run --loss gspo, --loss grpo (same clip range) and grpo with eps 0.2 into "
        "RUN_DIR/{gspo,grpo,grpo-eps0.2} and draw RUN_DIR/compare.png",
    )
    add_arguments(parser, TrainConfig)
    return parser


def parse_config(argv: Sequence[str]) -> tuple[TrainConfig, argparse.Namespace]:
    args = build_parser().parse_args(list(argv))
    values: dict = {}
    resume = getattr(args, "resume", None)
    if resume:
        saved = Path(resume) / "config.json"
        if not saved.exists():
            raise ValueError(f"--resume {resume!r}: {saved} not found; give a run directory")
        values.update(coerce(TrainConfig, json.loads(saved.read_text()), str(saved)))
    if args.config:
        values.update(load_file(args.config))
    values.pop("resume", None)
    return from_args(TrainConfig, args, file_values=values), args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    with warnings.catch_warnings():
        warnings.filterwarnings("always", module=r"gspo\.")  # ours, every run (not once)
        warnings.showwarning = _show_warning
        return _main(argv)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if category.__name__ == "TrainWarning":  # by name: importing it would import torch
        print(f"gspo train: warning: {message}", file=sys.stderr)
    else:  # a library's warning: its usual form, so its origin stays visible
        print(warnings.formatwarning(message, category, filename, lineno, line), file=sys.stderr,
              end="")  # fmt: skip


def _main(argv: list[str]) -> int:
    try:
        config, args = parse_config(argv)
        if args.compare:
            return _compare(config)
        from gspo.train.loop import train

        summary = train(config)
    except ValueError as err:
        print(f"gspo train: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        print("gspo train: interrupted; the last checkpoint (if any) is intact", file=sys.stderr)
        return 130
    except _reward_error() as err:
        what = "environment" if type(err).__name__ == "EnvError" else "reward"
        print(f"gspo train: {what} error: {err}", file=sys.stderr)
        print("gspo train: a checkpoint of the state before this step was saved; fix the "
              f"{what} and continue with {resume_command('RUN_DIR')}", file=sys.stderr)  # fmt: skip
        return 3
    return _report(summary)


def _reward_error():
    from gspo.train.rewards import RewardError

    return RewardError


def _report(summary: dict) -> int:
    if not summary.get("main", True):  # one report per run, not one per rank
        return 0 if summary.get("finished") else 130
    if summary.get("finished"):
        print(f"gspo train: done, step {summary['step']}, held-out reward "
              f"{summary['last_eval']:.3f}; outputs in {summary['run_dir']}")  # fmt: skip
        return 0
    print(f"gspo train: stopped at step {summary['step']} (checkpoint saved); continue with "
          f"{resume_command(summary['run_dir'])}", file=sys.stderr)  # fmt: skip
    return 130


def resume_command(run_dir) -> str:
    """The command that continues the run: under torchrun, torchrun with the same processes
    (FSDP2 checkpoints need them; --fsdp itself comes back from the run's config.json)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return f"gspo train --resume {run_dir}"
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    nodes = "" if per_node == world else f"--nnodes {world // per_node} "
    return f"torchrun {nodes}--nproc-per-node {per_node} -m gspo train --resume {run_dir}"


def _compare(config: TrainConfig) -> int:
    """The same job with sequence-level (GSPO) and token-level (GRPO) ratios: GRPO once with
    the same clip range and once with the 0.2 that token-level methods usually use."""
    import time

    from gspo.train.loop import train
    from gspo.train.plot import plot_compare, read_metrics

    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(config.run.run_dir or Path("runs") / f"compare-{stamp}")
    variants = {
        "gspo": {"loss": "gspo"},
        "grpo": {"loss": "grpo"},
        "grpo-eps0.2": {"loss": "grpo", "eps_low": 0.2, "eps_high": 0.2},
    }
    runs, lines = {}, []
    for name, change in variants.items():
        run = config.replace(**change, run_dir=str(base / name), resume=None)
        t0 = time.perf_counter()
        summary = train(run)
        seconds = time.perf_counter() - t0
        runs[name] = summary["run_dir"]
        evals = [r["eval_reward"] for r in read_metrics(summary["run_dir"]) if "eval_reward" in r]
        eps = f"{run.objective.eps_low:g}/{run.objective.eps_high:g}"
        lines.append(f"{name:<12} eps {eps}  held-out first "
                     f"{evals[0]:.3f} best {max(evals):.3f} last {evals[-1]:.3f}  "
                     f"{seconds:.0f} s")  # fmt: skip
    out = plot_compare(runs, base / "compare.png")
    print("\n".join(lines))
    print(f"gspo train --compare: wrote {out}")
    return 0
