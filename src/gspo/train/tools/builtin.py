"""Built-in function tools (``--tools NAME``)."""

from __future__ import annotations

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
