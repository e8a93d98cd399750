"""Write examples/wordproblems-demos.jsonl: 96 worked episodes with the calculator as a
function tool (a <tool_call> on the problem's expression, the tool's answer, the Answer:
line) on training-split word problems, the warm start of examples/smollm2-wordproblems.toml
(gspo.train.warmstart).

    .venv/bin/python examples/wordproblems_demos.py          # rewrites the file
"""

import json
import sys
from pathlib import Path

from gspo.train.tasks.wordproblems import wordproblem_prompts
from gspo.train.tools.builtin import worked_episode

OUT = Path(__file__).with_name("wordproblems-demos.jsonl")
COUNT, SEED = 96, 1234


def lines() -> list[str]:
    return [json.dumps(worked_episode(row)) for row in wordproblem_prompts(COUNT, SEED)]


if __name__ == "__main__":
    OUT.write_text("\n".join(lines()) + "\n", encoding="utf-8")
    print(f"wrote {COUNT} episodes to {OUT}", file=sys.stderr)
