"""The built-in ``calculator`` environment: the model may write ``<calc>EXPRESSION</calc>``
and is answered with the exact value; the episode ends at its first reply without a call,
scored by the arith task's reward on that reply's ``Answer:`` line.

For ``--task arith`` and for ``--prompts`` / ``--dataset`` rows of ``{question, answer}``
(which arith turns into prompts). The system prompt (used unless ``--system-prompt`` is
given) says how to call it, with one short example.

Expressions are evaluated by a small recursive-descent parser over ``fractions.Fraction``
(never Python's ``eval``): numbers (``12``, ``-3.5``, ``.25``), ``+ - * /`` (also ``×``,
``÷``, ``−``), parentheses, unary signs and ``^`` / ``**`` with an integer exponent of at
most 64 in absolute value. Anything else, a division by zero, or an expression of over 200
characters is answered with ``error: ...`` (the model's mistake, not the environment's).

    Calculate 85.6 * 4.   ->   <calc>85.6 * 4</calc>   ->   "85.6 * 4 = 342.4"
"""

from __future__ import annotations

import re
from fractions import Fraction

from gspo.train.tasks.arith import INSTRUCTION, arith_reward, expression_of, spell

CALL = re.compile(r"<calc>(.*?)</calc>", re.DOTALL)
MAX_CHARS = 200  # longest expression evaluated
MAX_EXPONENT = 64
MAX_DIGITS = 400  # a result with more digits than this is refused, not computed further

# No placeholder such as <calc>EXPRESSION</calc>: measured, SmolLM2 copied it word for word
# (a fifth of the base model's greedy episodes called the calculator on "EXPRESSION").
SYSTEM_PROMPT = (
    "You have a calculator. To compute something, write it between <calc> and </calc>, "
    "for example <calc>12.5 * 3</calc>, and you will be told the exact result, here "
    "12.5 * 3 = 37.5. " + INSTRUCTION
)


class CalcError(ValueError):
    """The expression cannot be evaluated (the calculator's answer says why)."""


_TOKEN = re.compile(r"\s*(?:(\d+\.?\d*|\.\d+)|(\*\*|[-+*/^()×÷−]))")


def tokenize(text: str) -> list[str]:
    tokens, pos = [], 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            rest = text[pos:].strip()
            if not rest:
                break
            raise CalcError(f"cannot read {rest[:20]!r}")
        tokens.append(m.group(1) or {"×": "*", "÷": "/", "−": "-", "**": "^"}.get(m.group(2),
                                                                                  m.group(2)))
        pos = m.end()
    return tokens


def evaluate(text: str) -> Fraction:
    """The exact value of an arithmetic expression (module docstring: the grammar);
    CalcError says what is wrong."""
    if len(text) > MAX_CHARS:
        raise CalcError(f"expression longer than {MAX_CHARS} characters")
    tokens = tokenize(text)
    if not tokens:
        raise CalcError("empty expression")
    parser = _Parser(tokens)
    value = parser.expr()
    if parser.pos != len(tokens):
        raise CalcError(f"unexpected {tokens[parser.pos]!r}")
    return value


class _Parser:
    """expr := term (('+'|'-') term)*; term := unary (('*'|'/') unary)*;
    unary := ('+'|'-') unary | power; power := atom ('^' unary)?; atom := number | (expr)."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens, self.pos = tokens, 0

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise CalcError("the expression ends too early")
        self.pos += 1
        return token

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            op, right = self.take(), self.term()
            value = value + right if op == "+" else value - right
        return _bounded(value)

    def term(self) -> Fraction:
        value = self.unary()
        while self.peek() in ("*", "/"):
            op, right = self.take(), self.unary()
            if op == "/" and right == 0:
                raise CalcError("division by zero")
            value = _bounded(value * right if op == "*" else value / right)
        return value

    def unary(self) -> Fraction:
        if self.peek() in ("+", "-"):
            sign = self.take()
            value = self.unary()
            return -value if sign == "-" else value
        return self.power()

    def power(self) -> Fraction:
        base = self.atom()
        if self.peek() != "^":
            return base
        self.take()
        exponent = self.unary()
        if exponent.denominator != 1 or abs(exponent) > MAX_EXPONENT:
            raise CalcError(f"exponents must be integers of at most {MAX_EXPONENT}")
        if base == 0 and exponent < 0:
            raise CalcError("division by zero")
        return _bounded(base ** int(exponent))

    def atom(self) -> Fraction:
        token = self.take()
        if token == "(":
            value = self.expr()
            if self.peek() != ")":
                raise CalcError("a parenthesis is not closed")
            self.take()
            return value
        if token[0].isdigit() or token[0] == ".":
            return Fraction(token)
        raise CalcError(f"unexpected {token!r}")


def _bounded(value: Fraction) -> Fraction:
    if len(str(value.numerator)) + len(str(value.denominator)) > MAX_DIGITS:
        raise CalcError("the result is too large")
    return value


def answer_calls(reply: str) -> str | None:
    """The calculator's answer to every ``<calc>`` call of ``reply`` (one line each), or
    None when the reply makes no call."""
    calls = CALL.findall(reply)
    if not calls:
        return None
    lines = []
    for expression in calls:
        expression = " ".join(expression.split())
        try:
            lines.append(f"{expression} = {spell(evaluate(expression))}")
        except CalcError as err:
            lines.append(f"{expression}: error: {err}")
    return "\n".join(lines)


class Calculator:
    """One arithmetic episode with a calculator (module docstring). ``fields``: the arith
    prompt row (``prompt`` or ``question``, and ``answer``)."""

    system_prompt = SYSTEM_PROMPT

    def __init__(self, *, answer, prompt=None, question=None, **_fields) -> None:
        if prompt is None and question is None:
            raise ValueError("calculator: the row has neither 'prompt' nor 'question'")
        self.answer = answer
        self.first = prompt if prompt is not None else f"{question}\n{INSTRUCTION}"
        self.last_reply = ""

    def reset(self) -> str:
        return self.first

    def step(self, reply: str) -> str | None:
        self.last_reply = reply
        return answer_calls(reply)

    def reward(self) -> float:
        # arith's rule on the last reply: 1 right, 0.1 a readable wrong number, else 0
        return arith_reward([self.first], [self.last_reply], [self.answer])[0]


def worked_episode(prompt: dict) -> dict:
    """A worked calculator episode for an arith prompt row, as a ``--warm-start`` line
    (gspo.train.warmstart): the call, the calculator's answer, the ``Answer:`` line.
    ValueError if the question is not one arith generates."""
    expression = expression_of(prompt["question"])
    if expression is None:
        raise ValueError(f"worked_episode: {prompt['question']!r} is not an arith question")
    call = f"<calc>{expression}</calc>"
    value = answer_calls(call)
    return {"messages": [
        {"role": "user", "content": Calculator(**prompt).reset()},
        {"role": "assistant", "content": call},
        {"role": "user", "content": value},
        {"role": "assistant", "content": f"Answer: {value.rpartition(' = ')[2]}"},
    ]}  # fmt: skip
