"""`gspo train`: flags generated from ``TrainConfig`` (gspo.train.config), plus ``--config FILE``
and ``--compare`` (gspo.train.compare).

Precedence: defaults < the resumed run's config.json < --config FILE < flags.
Exit codes: 0 done, 2 bad input (ValueError: the message names the field and the fix),
3 the reward function, the --env environment or a --vllm-servers server failed (a
checkpoint was saved first), or another torchrun rank failed and this one stopped with it
(its last checkpoint is intact),
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
from gspo.train import console
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
        nargs="*",
        metavar="LOSS[:OPTION=VALUE,...]",
        help="train once per loss (and per --compare-seeds) into RUN_DIR/<loss>/seed<k> and "
        "draw their held-out curves in RUN_DIR/compare.png; e.g. --compare gspo grpo "
        "'grpo:eps_low=0.2,eps_high=0.2'; alone: those three (gspo.train.compare)",
    )
    parser.add_argument(
        "--compare-seeds",
        nargs="+",
        type=int,
        metavar="SEED",
        help="with --compare: run every loss with each of these seeds (the plot shows the "
        "mean and the min-max band); default: --seed",
    )
    parser.add_argument(
        "--verbose", action="store_true",
        help="show every library's and engine's output on the console; by default it goes "
        "to RUN_DIR/library.log and the console shows gspo's own lines (gspo.train.console)")
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
        if args.compare_seeds and args.compare is None:
            raise ValueError("--compare-seeds seeds the runs of --compare: add --compare "
                             "LOSS ..., or use --seed for one run")  # fmt: skip
        with console.session(quiet=not args.verbose):
            if args.compare is not None:
                from gspo.train.compare import run_compare

                return run_compare(config, args.compare, args.compare_seeds or ())
            from gspo.train.loop import train

            summary = train(config)
    except ValueError as err:
        print(f"gspo train: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a file of the run's (a checkpoint, metrics): one line naming it
        if err.filename is None:  # not a file: the traceback says where
            raise
        print(f"gspo train: error: {err.filename}: {err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        print("gspo train: interrupted; the last checkpoint (if any) is intact", file=sys.stderr)
        return 130
    except _peer_failure() as err:  # one line for the job, from the lowest surviving rank
        if err.failed_rank is None or _rank() == (1 if err.failed_rank == 0 else 0):
            print(f"gspo train: error: {err}; {_after_peer(err.run_dir)}", file=sys.stderr)
        return 3
    except _reward_error() as err:
        what = {"EnvError": "environment", "ServerError": "rollout server"}.get(
            type(err).__name__, "reward")  # fmt: skip
        print(f"gspo train: {what} error: {err}", file=sys.stderr)
        print("gspo train: a checkpoint of the state before this step was saved; fix the "
              f"{what} and continue with {resume_command('RUN_DIR')}", file=sys.stderr)  # fmt: skip
        return 3
    return _report(summary)


def _reward_error():
    from gspo.train.rewards import RewardError

    return RewardError


def _peer_failure():
    from gspo.train.distributed import PeerFailure

    return PeerFailure


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _after_peer(run_dir) -> str:
    from gspo.train.checkpoint import list_checkpoints

    saved = list_checkpoints(run_dir) if run_dir is not None else []
    if not saved:
        return "every rank stopped before a checkpoint was saved; fix it and start again"
    return (f"every rank stopped; the last checkpoint ({saved[-1].name}) is intact: fix it "
            f"and continue with {resume_command(run_dir)}")  # fmt: skip


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
