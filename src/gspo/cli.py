"""The `gspo` command: `gspo objective` (the spec's objective from JSON), `gspo train`, `gspo eval`
and `gspo serve`.

Each subcommand loads its own module, so `gspo objective` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence

_COMMANDS = {
    "objective": ("gspo.cli", "objective_main", "compute a docs/spec.md objective from JSON"),
    "train": ("gspo.train.cli", "main", "fine-tune a causal LM with GSPO"),
    "eval": ("gspo.train.evaluate", "main", "accuracy, pass@k and format rate on a task"),
    "serve": ("gspo.train.serve", "main", "a vLLM server that gspo train samples from"),
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


def build_parser() -> argparse.ArgumentParser:
    """`gspo objective`'s parser (the documentation's CLI reference prints its help)."""
    parser = argparse.ArgumentParser(
        prog="gspo objective",
        description="Read {log_probs_new, log_probs_old, rewards, epsilon} as JSON and print "
        "the GSPO objective L of docs/spec.md in the gspo repository (float64, pure Python); "
        "with --loss, the SAPO, CISPO or GMPO objective of the same file's sections.",
    )
    parser.epilog = (
        "epsilon must lie in (0, 1): the clip range [1 - eps, 1 + eps] needs a positive lower "
        "bound. Like gspo_loss, each mean log-ratio (each token's, for sapo, cispo and gmpo) is "
        "clamped to [-20, 20] before exp (gspo.reference.MAX_LOG_RATIO): exact below, and e^20 "
        "instead of an overflow to inf beyond; --explain names what it clamped. "
        "Keys besides log_probs_new, log_probs_old and rewards, per --loss: "
        + "; ".join(f"{loss}: {_describe(loss)}" for loss in _keys())
        + ". A key of another loss is refused (exit 2)."
    )
    parser.add_argument("file", nargs="?", default="-", help="JSON file, or - for stdin (default)")
    parser.add_argument(
        "--explain", action="store_true",
        help="print the per-sequence (per-token for sapo, cispo, gmpo) table before L",
    )  # fmt: skip
    parser.add_argument(
        "--loss", choices=tuple(_keys()), default="gspo",
        help="the objective (docs/spec.md): gspo (default) or another with a pure-Python "
        "reference in gspo.objectives",
    )  # fmt: skip
    return parser


def objective_main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    from gspo.reference import (
        explain_objective,
        explain_token_objective,
        objective,
        sequence_objective,
    )

    try:
        payload = _read_payload(args.file, args.loss)
        if args.loss == "gspo":
            explain, value = explain_objective, sequence_objective
            text = explain(**payload) if args.explain else repr(value(**payload))
        elif args.explain:
            text = explain_token_objective(**payload, loss=args.loss)
        else:
            text = repr(objective(**payload, loss=args.loss))
        print(text)
    except (ValueError, TypeError, OSError) as err:
        print(f"gspo objective: error: {err}", file=sys.stderr)
        return 2
    return 0


_BASE = ("log_probs_new", "log_probs_old", "rewards")


def _keys() -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """--loss -> (required keys, optional keys) besides _BASE: gspo's epsilon, and each
    registered objective's options where it has a reference (gspo.objectives)."""
    from gspo.objectives import registry

    keys = {"gspo": (("epsilon",), ())}
    for name in registry.names():
        record = registry.get(name)
        if record.reference is not None:
            keys[name] = ((), tuple(record.options))
    return keys


_FIELDS = (*_BASE, "epsilon")  # the default's keys


def _describe(loss: str) -> str:
    required, optional = _keys()[loss]
    if not optional:
        return ", ".join(required)
    return "the optional " + ", ".join(optional)  # no loss has both kinds


def _read_payload(path: str, loss: str = "gspo") -> dict:
    text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    try:
        payload = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as err:
        raise ValueError(f"input is not valid JSON: {err}") from None
    keys = _keys()
    required, optional = keys[loss]
    need = [*_BASE, *required]
    if not isinstance(payload, dict):
        raise ValueError(f"input must be a JSON object with keys {need}")
    for key in payload:
        users = [name for name, kinds in keys.items() if key in sum(kinds, ())]
        if users and key not in required + optional:
            raise ValueError(f"key {key!r} does not apply to --loss {loss} (it takes "
                             f"{_describe(loss)}); remove it, or pass --loss "
                             f"{' or '.join(users)}")  # fmt: skip
    missing = [k for k in need if k not in payload]
    extra = sorted(set(payload) - set(need) - set(optional))
    if missing or extra:
        raise ValueError(f"JSON keys: missing {missing}, unexpected {extra}; need {need}"
                         + (f", optionally {list(optional)}" if optional else ""))  # fmt: skip
    return payload


def _reject_constant(name: str) -> float:
    # JSON has no NaN/Infinity; Python's parser accepts them unless told not to.
    raise ValueError(f"input holds {name}, which is not a finite number")


if __name__ == "__main__":
    sys.exit(main())
