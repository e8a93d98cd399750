"""The `gspo` command: `gspo objective` (the spec's objective from JSON) and `gspo train`.

Each subcommand loads its own module, so `gspo objective` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence

_COMMANDS = {
    "objective": ("gspo.cli", "objective_main", "compute the spec's GSPO objective from JSON"),
    "train": ("gspo.train.cli", "main", "fine-tune a causal LM with GSPO"),
    "eval": ("gspo.train.evaluate", "main", "accuracy, pass@k and format rate on a task"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from gspo import __version__

        print(f"gspo {__version__}")
        return 0
    command = _COMMANDS.get(argv[0])
    if command is None:
        print(f"gspo: unknown command {argv[0]!r}\n{_usage()}", file=sys.stderr)
        return 2
    module, function, _ = command
    return int(getattr(importlib.import_module(module), function)(argv[1:]) or 0)


def _usage() -> str:
    lines = ["usage: gspo COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, _, help_) in _COMMANDS.items()]
    lines += ["", "`gspo COMMAND --help` describes each command."]
    return "\n".join(lines)


# ---------------------------------------------------------------- gspo objective


def objective_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="gspo objective",
        description="Read {log_probs_new, log_probs_old, rewards, epsilon} as JSON and print "
        "the GSPO objective L of docs/spec.md in the gspo repository (float64, pure Python).",
    )
    parser.epilog = (
        "epsilon must lie in (0, 1): the clip range [1 - eps, 1 + eps] needs a positive lower "
        "bound. Like gspo_loss, each mean log-ratio is clamped to [-20, 20] before exp "
        "(gspo.reference.MAX_LOG_RATIO): exact below, and e^20 instead of an overflow to inf "
        "beyond; --explain names the sequences it clamped."
    )
    parser.add_argument("file", nargs="?", default="-", help="JSON file, or - for stdin (default)")
    parser.add_argument(
        "--explain", action="store_true", help="print the per-sequence table before L"
    )
    args = parser.parse_args(argv)
    from gspo.reference import explain_objective, sequence_objective

    try:
        payload = _read_payload(args.file)
        if args.explain:
            print(explain_objective(**payload))
        else:
            print(repr(sequence_objective(**payload)))
    except (ValueError, TypeError, OSError) as err:
        print(f"gspo objective: error: {err}", file=sys.stderr)
        return 2
    return 0


_FIELDS = ("log_probs_new", "log_probs_old", "rewards", "epsilon")


def _read_payload(path: str) -> dict:
    text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    try:
        payload = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as err:
        raise ValueError(f"input is not valid JSON: {err}") from None
    if not isinstance(payload, dict):
        raise ValueError(f"input must be a JSON object with keys {list(_FIELDS)}")
    missing = [k for k in _FIELDS if k not in payload]
    extra = sorted(set(payload) - set(_FIELDS))
    if missing or extra:
        raise ValueError(f"JSON keys: missing {missing}, unexpected {extra}; need {list(_FIELDS)}")
    return payload


def _reject_constant(name: str) -> float:
    # JSON has no NaN/Infinity; Python's parser accepts them unless told not to.
    raise ValueError(f"input holds {name}, which is not a finite number")


if __name__ == "__main__":
    sys.exit(main())
