"""Built-in function tools (``--tools NAME``), and worked episodes that use them."""

from __future__ import annotations

import json

from gspo.train.envs.calculator import evaluate
from gspo.train.tasks.arith import spell


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly.

    Args:
        expression: Numbers with + - * / and parentheses, for example "12.5 * (3 + 4)".
    """
    # The calculator environment's evaluator: exact fractions, never Python's eval; a bad
    # expression raises CalcError, which the call answers as an error message.
    return spell(evaluate(expression))


def worked_episode(row: dict) -> dict:
    """A worked episode with the ``calculator`` tool in the Hermes / Qwen format, as a
    ``--warm-start`` line (gspo.train.warmstart): the call on the row's ``expression`` (a
    wordproblems row), the tool's answer, the ``Answer:`` line. ValueError if the row has no
    expression or its value is not the row's answer."""
    if "expression" not in row:
        raise ValueError(f"worked_episode: the row has no 'expression' (keys {sorted(row)})")
    value = calculator(row["expression"])
    if value != row["answer"]:
        raise ValueError(f"worked_episode: {row['expression']} = {value}, not {row['answer']}")
    call = {"name": "calculator", "arguments": {"expression": row["expression"]}}
    return {"messages": [
        {"role": "user", "content": row["prompt"]},
        {"role": "assistant", "content": f"<tool_call>\n{json.dumps(call)}\n</tool_call>"},
        {"role": "tool", "content": value},
        {"role": "assistant", "content": f"Answer: {value}"},
    ]}  # fmt: skip
