"""Peak resident memory of a `gspo` command with a chosen shared-prefix attention.

Runs ``gspo ARGS`` in this process with ``CausalLMLogprobs``'s ``prefix_attention`` default
set to ``--attention`` (auto, dense or rows: the trainer has no flag for it), then prints
this process's own peak resident set (VmHWM: the trainer, whose step is what the attention
changes) and its children's largest (a vLLM engine's process, say), in MiB, and how many
log-prob forwards ran each attention, as one JSON line.

    .venv/bin/python bench/step_peak.py --attention dense -- \\
        train --config examples/smollm2-calculator.toml --steps 1 --warm-start none
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(1, str(ROOT / "src"))

import common  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attention", required=True, choices=("auto", "dense", "rows"))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then the gspo arguments")
    args = parser.parse_args()
    gspo_args = args.args[1:] if args.args[:1] == ["--"] else args.args
    from gspo.causal_lm import CausalLMLogprobs
    from gspo.cli import main as gspo

    CausalLMLogprobs.__init__.__kwdefaults__["prefix_attention"] = args.attention
    picks: dict[str, int] = {}  # what each forward ran: "rows", "dense" or None (plain)
    forward = CausalLMLogprobs.forward

    def counted(self, *a, **k):
        out = forward(self, *a, **k)
        picks[str(self.attention_used)] = picks.get(str(self.attention_used), 0) + 1
        return out

    CausalLMLogprobs.forward = counted
    start = time.perf_counter()
    code = gspo(gspo_args)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"bench": "step_peak", "attention": args.attention, "exit": code,
                      "wall_s": time.perf_counter() - start,
                      "peak_rss_mib": common.peak_rss_mib(), "children_peak_rss_mib": children,
                      "loadavg_1min": os.getloadavg()[0], "attention_used": picks,
                      "args": gspo_args}))  # fmt: skip
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
