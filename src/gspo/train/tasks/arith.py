r"""The ``arith`` task: school arithmetic as people phrase it, scored by its exact final answer.

Questions mix integers, decimals and fractions, negative numbers included, in five
categories (``add``, ``sub``, ``mul``, ``div``, ``expr``) and three levels:

* level 1: small non-negative integers ("What is 3 plus 4?");
* level 2: signed two-digit integers or one-place decimals ("Subtract 39 from -6.",
  "Calculate 28 divided by -36.");
* level 3: signed integers, two-place decimals or fractions, and deeper expressions
  ("(2 - 1 - (5 + -1)) + 1").

One kind of number per question; expressions use signed one-digit integers.

Every prompt ends with one fixed instruction asking for a last line ``Answer: <number>``.
The reward reads the answer after the *last* ``Answer:`` and compares it with the true
value as an exact rational (``fractions.Fraction``): ``-7/9``, ``-14/18`` and ``-0.7777...``
rounded are different claims, and only the first two are right. Nothing is compared as a
float, so ``0.1 + 0.2`` is ``0.3`` exactly.

What reads as a number (:func:`parse_number`; the same rule for a completion's answer, a
user's ``answer`` field and `gspo eval`):

* the answer is the rest of the ``Answer:`` line (the next line if that one is empty), and
  it must *start* with the number: ``Answer: x = 5`` reads nothing;
* the number: a sign (``-``, ``+``, or the Unicode minus), digits with optional ``,``
  thousands groups, decimals, ``/ denominator``, scientific notation read exactly
  (``1e-05`` is 1/100000; an exponent beyond +-1000 or a number of over 4000 digits
  reads nothing rather than being computed), or LaTeX ``\frac{a}{b}``;
* decorations: markup (``**``, ``$``, backticks, ``\(``, ``\[``, ``\boxed{}``,
  ``\text{...}``) is removed, a leading ``=`` is allowed, and so is any text after the
  number that names no other number: a full stop, a unit word (``5 apples``, ``12 cm``),
  ``%`` (``50%`` reads 50);
* the answer names *one* value: any other number in it that differs makes it unreadable
  (``5 or 6``, ``5, 6``, ``3 1/2``, ``12 cm^2``, ``7 since 3 + 4 = 7`` read nothing, scoring
  0 rather than full credit for the first number), while the same value again is allowed
  (``1/2 = 0.5``). Numbers spelled in words are not read (``5 or six`` reads 5).

A prompt is ``{"prompt": str, "question": str, "answer": str, "category": str,
"level": int}``; ``answer`` is the canonical spelling of the value (integer, terminating
decimal, or lowest-terms fraction). Rows of ``{"question", "answer"}`` from a user's file go
through :func:`as_prompt` and are scored by the same reward.
"""

from __future__ import annotations

import random
import re
import zlib
from collections.abc import Sequence
from fractions import Fraction

from gspo.train.tasks.base import HELD_OUT_SEED_OFFSET, Prompt, Task

# Short, because every token of the prompt is paid for again in each forward and backward
# (14 SmolLM2 tokens; a first version of 41 was half the prompt), and without a sample number:
# SmolLM2 copied its example "-7/9" into answers, and after "as a fraction like 2/3" GSPO
# taught it to answer every question with a fraction at once ("Answer: 4/5" for 3 + 3).
INSTRUCTION = "End your reply with a final line 'Answer: <number>'."
CATEGORIES = ("add", "sub", "mul", "div", "expr")
LEVELS = (1, 2, 3)

_PHRASES = {
    "add": ("What is {a} plus {b}?", "Add {a} and {b}.", "Calculate {a} + {b}.",
            "What is the sum of {a} and {b}?"),
    "sub": ("What is {a} minus {b}?", "Subtract {b} from {a}.", "Calculate {a} - {b}.",
            "Take {b} away from {a}."),
    "mul": ("What is {a} times {b}?", "Multiply {a} by {b}.", "Calculate {a} * {b}.",
            "What is the product of {a} and {b}?"),
    "div": ("What is {a} divided by {b}?", "Divide {a} by {b}.",
            "Calculate {a} divided by {b}.", "Calculate {a} / {b}."),
    "expr": ("What is {e}?", "Evaluate {e}.", "Calculate {e}.", "{e}"),
}  # fmt: skip
_OPS = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b}
_SYMBOL = {"add": "+", "sub": "-", "mul": "*"}


# ---------------------------------------------------------------- numbers as text


def spell(value: Fraction) -> str:
    """Canonical text of an exact value: ``7``, ``-0.25``, ``-7/9`` (lowest terms).

    A decimal is used exactly when it terminates (the denominator has no prime factor but
    2 and 5); otherwise a fraction, since any rounding would make the answer inexact.
    """
    value = Fraction(value)
    if value.denominator == 1:
        return str(value.numerator)
    den, twos, fives = value.denominator, 0, 0
    while den % 2 == 0:
        den, twos = den // 2, twos + 1
    while den % 5 == 0:
        den, fives = den // 5, fives + 1
    if den != 1:
        return f"{value.numerator}/{value.denominator}"
    places = max(twos, fives)
    scaled = abs(value) * 10**places  # an integer by construction
    digits = str(int(scaled)).rjust(places + 1, "0")
    sign = "-" if value < 0 else ""
    return f"{sign}{digits[:-places]}.{digits[-places:]}"


# A number as a person or a model writes it: sign (ASCII or Unicode minus), digits with
# optional thousands groups, optional decimals, optional exponent ("1e-05": a data set's
# answer written by Python or pandas), optional "/ denominator"; or LaTeX \frac.
_NUM = r"(?:[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[+-]?\.\d+)(?:[eE][+-]?\d+)?"
_NUMBER = re.compile(rf"\s*=?\s*(?P<num>{_NUM})(?:\s*/\s*(?P<den>{_NUM}))?")
_FRAC = re.compile(
    r"\s*=?\s*(?P<sign>[+-]?)\s*\\d?frac\{\s*(?P<num>[+-]?\d+)\s*\}\{\s*(?P<den>[+-]?\d+)\s*\}"
)
_ANSWER = re.compile(r"answer\s*\**\s*[:：]", re.IGNORECASE)
# Markup that models wrap answers in; removed before the number is read.
_MARKUP = re.compile(r"\*\*|__|`|\$|\\\(|\\\)|\\\[|\\\]|\\boxed\{|\\text\{[^}]*\}")
# Any number in the rest of an answer (a \frac, or digits with their "/ den" attached).
_ANY_VALUE = re.compile(
    rf"[+-]?\s*\\d?frac\{{[^}}]*\}}\{{[^}}]*\}}|(?:{_NUM})(?:\s*/\s*(?:{_NUM}))?"
)


def parse_number(text: str) -> Fraction | None:
    """The exact value of ``text`` read as one number (module docstring: the rule), else None.

    ``"5."`` and ``"5 apples"`` read as 5 and ``"1/2 = 0.5"`` as 1/2, but ``"5 or 6"``,
    ``"3 1/2"`` (a mixed number) and ``"5/0"`` read as None rather than as a wrong value.
    """
    text = text.replace("\u2212", "-")  # Unicode minus
    text = _MARKUP.sub("", text)
    match = _FRAC.match(text)
    if match:
        if len(match["num"]) > 4000 or len(match["den"]) > 4000:
            return None  # Python refuses to read longer integers: refused, not an error
        num, den = int(match["num"]), int(match["den"])
        if den == 0:
            return None
        value = Fraction(num, den)
        value = -value if match["sign"] == "-" else value
    else:
        match = _NUMBER.match(text)
        if not match:
            return None
        try:
            parts = [_exact(match["num"]), _exact(match["den"] or "1")]
        except ValueError:  # too long to read: refused, not computed
            return None
        if parts[1] == 0:
            return None
        value = parts[0] / parts[1]
    rest = text[match.end() :]
    if rest.lstrip()[:1] == "/":  # "5/x": a fraction whose denominator is not a number
        return None
    # Every other number in the answer must be this one again ("1/2 = 0.5"): "5 or 6" names
    # two values and is not an answer of 5 (nor is "3 1/2" one of 3).
    for other in _ANY_VALUE.finditer(rest):
        if parse_number(other.group()) != value:
            return None
    return value


def _exact(number: str) -> Fraction:
    """The exact value of one ``_NUM`` match; ValueError for an exponent beyond +-1000 or
    over 4000 digits (``10**exponent`` would be computed; Python refuses longer digits)."""
    digits, _, exponent = number.replace(",", "").lower().partition("e")
    if (exponent and abs(int(exponent)) > 1000) or len(digits) > 4000:
        raise ValueError(f"{number[:20]!r} is too long to read")
    return Fraction(digits) * Fraction(10) ** int(exponent or 0)


def final_answer(completion: str) -> Fraction | None:
    """The number after the last ``Answer:`` (any case, markdown bold allowed), read from the
    rest of that line (the next line if it is empty) by :func:`parse_number`, else None."""
    ends = [match.end() for match in _ANSWER.finditer(completion)]
    if not ends:
        return None
    # Markup first: a display "$$\n\\frac{1}{2}\n$$" puts the number on the next line.
    rest = _MARKUP.sub("", completion[ends[-1] :].replace("\u2212", "-")).lstrip()
    return parse_number(rest.partition("\n")[0])


# ---------------------------------------------------------------- questions


# The kinds of number each level draws from; one kind per question, as in a school
# exercise ("8.64 plus -5/6" mixes two and is not one).
_KINDS = {1: ("small",), 2: ("int", "dec1"), 3: ("int", "dec2", "frac")}


def _operand(rng: random.Random, kind: str) -> Fraction:
    if kind == "small":
        return Fraction(rng.randint(0, 9))
    if kind == "int":
        return Fraction(rng.randint(-99, 99))
    if kind == "dec1":
        return Fraction(rng.randint(-99, 99), 10)
    if kind == "dec2":
        return Fraction(rng.randint(-999, 999), 100)
    return Fraction(rng.randint(-9, 9), rng.randint(2, 9))


def _binary(rng: random.Random, category: str, level: int) -> tuple[str, Fraction]:
    kind = rng.choice(_KINDS[level])
    a, b = _operand(rng, kind), _operand(rng, kind)
    if category == "div":
        while b == 0:
            b = _operand(rng, kind)
        if level == 1:
            a = a * b  # exact whole quotients while the numbers are small
        value = a / b
    else:
        value = _OPS[category](a, b)
    phrase = rng.choice(_PHRASES[category])
    return phrase.format(a=spell(a), b=spell(b)), value


def _expression(rng: random.Random, depth: int, level: int) -> tuple[str, Fraction]:
    """A random +,-,* tree of small integers; every inner node is parenthesised, so the
    text reads unambiguously whatever precedence the reader assumes."""
    if depth == 0 or rng.random() < 0.3:
        n = rng.randint(-9 if level > 1 else 0, 9)
        return str(n), Fraction(n)
    op = rng.choice(("add", "sub", "mul") if level > 1 else ("add", "sub"))
    left, lv = _expression(rng, depth - 1, level)
    right, rv = _expression(rng, depth - 1, level)
    left = left if _is_atom(left) else f"({left})"
    right = right if _is_atom(right) else f"({right})"
    return f"{left} {_SYMBOL[op]} {right}", _OPS[op](lv, rv)


def _is_atom(text: str) -> bool:
    return re.fullmatch(r"-?\d+", text) is not None


def question(rng: random.Random, category: str, level: int) -> tuple[str, Fraction]:
    """One question of a category and level, and its exact value."""
    if category != "expr":
        return _binary(rng, category, level)
    text, value = _expression(rng, depth=level + 1, level=level)
    while _is_atom(text):  # a bare number is not a question
        text, value = _expression(rng, depth=level + 1, level=level)
    return rng.choice(_PHRASES["expr"]).format(e=text), value


_SYMBOLS = {**_SYMBOL, "div": "/"}
_READ = [
    (category, re.compile("^" + re.escape(phrase).replace(r"\{a\}", r"(?P<a>\S+)")
                          .replace(r"\{b\}", r"(?P<b>\S+)").replace(r"\{e\}", r"(?P<e>.+)") + "$"))
    for category, phrases in _PHRASES.items() for phrase in phrases
]  # fmt: skip


def expression_of(question_text: str) -> str | None:
    """The arithmetic a generated question asks for, as an expression (``"Subtract 3 from
    -7."`` -> ``"-7 - 3"``), or None for text these phrasings did not make. What a worked
    calculator episode writes (gspo.train.envs.calculator.worked_episode)."""
    for category, pattern in _READ:
        match = pattern.match(question_text)
        if match is None:
            continue
        if category == "expr":
            return match["e"]
        a, b = (f"({x})" if "/" in x else x for x in (match["a"], match["b"]))
        return f"{a} {_SYMBOLS[category]} {b}"  # "(2/3) / (7/6)": fractions bracketed
    return None


def as_prompt(question_text: str, answer: str | Fraction, **fields) -> dict:
    """A task prompt for a question: the instruction appended, the answer kept as text."""
    if isinstance(answer, Fraction):
        answer = spell(answer)
    elif parse_number(str(answer)) is None:
        raise ValueError(f"answer {answer!r} of question {question_text!r} is not a number: "
                         "give one number, e.g. 7, -0.25, 3/4 or 1e-05")  # fmt: skip
    return {"prompt": f"{question_text}\n{INSTRUCTION}", "question": question_text,
            "answer": str(answer), **fields}  # fmt: skip


def split_of(question_text: str) -> str:
    """``"test"`` for about 1 question in 10, by a stable hash of its text, else ``"train"``.

    Level 1 has only a few hundred distinct questions, so a training pool and a held-out set
    drawn with different seeds would share many; splitting by the text keeps them disjoint
    whatever the seeds and sizes.
    """
    return "test" if zlib.crc32(question_text.encode()) % 10 == 0 else "train"


def from_row(row: dict, where: str) -> dict:
    """A user's ``{"question", "answer", ...}`` row as a task prompt (other keys kept, e.g.
    ``category``); a row that already has ``prompt`` is taken as it is."""
    if "prompt" in row and "question" not in row:
        return row
    if "question" not in row or "answer" not in row:
        raise ValueError(f"{where} needs 'question' and 'answer' (or 'prompt') for task arith")
    fields = {k: v for k, v in row.items() if k not in ("question", "answer", "prompt")}
    try:
        return as_prompt(str(row["question"]), str(row["answer"]), **fields)
    except ValueError as err:  # name the row: a file of thousands has one bad answer
        raise ValueError(f"{where}: {err}") from None


def arith_prompts(
    n: int, seed: int, *, split: str = "train", levels: Sequence[int] = LEVELS
) -> list[dict]:
    """``n`` questions of one split, categories and levels drawn uniformly, reproducible from
    ``seed``; a question may repeat within a split (level 1 is small)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        category, level = rng.choice(CATEGORIES), rng.choice(tuple(levels))
        text, value = question(rng, category, level)
        if split_of(text) == split:
            out.append(as_prompt(text, value, category=category, level=level))
    return out


# ---------------------------------------------------------------- reward


# Credit for a readable "Answer: <number>" that is wrong. Measured on SmolLM2-135M-Instruct:
# with the strict 0/1 reward every one of the first 96 sampled completions scored 0 (every
# group tied, every advantage 0: no gradient at all), because the base model almost never
# writes the format; the credit gives the first steps a signal toward it.
FORMAT_CREDIT = 0.1


def arith_reward(prompts, completions, answer, **_fields) -> list[float]:
    """1.0 when the number after the last ``Answer:`` equals ``answer`` exactly,
    ``FORMAT_CREDIT`` when there is such a number but it is wrong, else 0.0."""
    out = []
    for text, goal in zip(completions, answer, strict=True):
        got = final_answer(text)
        if got is None:
            out.append(0.0)
        else:
            out.append(1.0 if got == parse_number(str(goal)) else FORMAT_CREDIT)
    return out


# Any number in running text, for last_number: a fraction's "/ den" stays attached.
_ANY_NUMBER = re.compile(rf"(?:{_NUM})(?:\s*/\s*(?:{_NUM}))?")


def last_number(completion: str) -> Fraction | None:
    """The value of the last number written anywhere in the completion, format aside (``"5 +
    4 = 9"`` reads as 9). `gspo eval` reports how often it is right next to the strict
    accuracy, so that a model that computes well but ignores the ``Answer:`` line is seen."""
    text = _MARKUP.sub("", completion.replace("\u2212", "-"))
    matches = list(_ANY_NUMBER.finditer(text))
    return parse_number(matches[-1].group()) if matches else None


def has_format(completion: str) -> bool:
    """Whether the completion ends its reasoning with a readable ``Answer: <number>``."""
    return final_answer(completion) is not None


class Arith(Task):
    """School arithmetic for pretrained chat models (module docstring); reads a user's
    ``{"question", "answer"}`` rows itself, and `gspo eval` reports the format rate and the
    last-number accuracy beside the strict one."""

    name = "arith"
    levels = LEVELS
    question_field = "question"
    max_new_tokens = 32  # "a op b = c" and the Answer: line (examples/smollm2-arith.toml)

    def prompts(self, n: int, seed: int, levels: Sequence[int] = ()) -> list[Prompt]:
        return arith_prompts(n, seed, split="train", levels=tuple(levels) or LEVELS)

    def held_out(self, n: int, seed: int, levels: Sequence[int] = ()) -> list[Prompt]:
        # Split by the question's text (split_of), so no held-out question is trained on.
        return arith_prompts(n, seed + HELD_OUT_SEED_OFFSET, split="test",
                             levels=tuple(levels) or LEVELS)  # fmt: skip

    def reward(self, prompts, completions, **fields) -> list[float]:
        return arith_reward(prompts, completions, **fields)

    def from_row(self, row: dict, where: str) -> Prompt:
        return from_row(row, where)

    def eval_metrics(self, prompt: Prompt, completion: str) -> dict[str, bool]:
        right = parse_number(str(prompt["answer"]))
        return {"format": has_format(completion), "last_number_correct":
                last_number(completion) == right}  # fmt: skip
