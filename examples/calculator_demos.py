"""Write examples/calculator-demos.jsonl: 64 worked calculator episodes (the call, the
calculator's answer, the Answer: line) on training-split arith questions of levels 2 and 3,
the warm start of examples/smollm2-calculator.toml (gspo.train.warmstart).

    .venv/bin/python examples/calculator_demos.py            # rewrites the file
"""

import json
import sys
from pathlib import Path

from gspo.train.envs.calculator import worked_episode
from gspo.train.tasks.arith import arith_prompts

OUT = Path(__file__).with_name("calculator-demos.jsonl")
COUNT, SEED, LEVELS = 64, 1234, (2, 3)


def lines() -> list[str]:
    rows = arith_prompts(COUNT, SEED, split="train", levels=LEVELS)
    return [json.dumps(worked_episode(row)) for row in rows]


if __name__ == "__main__":
    OUT.write_text("\n".join(lines()) + "\n", encoding="utf-8")
    print(f"wrote {COUNT} episodes to {OUT}", file=sys.stderr)
