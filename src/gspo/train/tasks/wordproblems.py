"""The ``wordproblems`` task: multi-step school word problems of the GSM8K kind, answered
exactly, scored as arith is.

Each problem comes from one of a dozen stories (shopping and change, rates over time,
sharing equally, speed and distance, discounts, parts of a whole, ages, fences, weekly
production, savings, fuel, recipes), with its names, items and numbers drawn at random,
and needs two to four operations: quantities, rates, totals. The numbers are chosen so that
every answer is exact and the story stays sensible (a whole number of cookies per friend,
change that is not negative, a terminating decimal for money).

A prompt is ``{"prompt", "question", "answer", "expression", "story"}``: ``prompt`` is the
question and arith's instruction (a final line ``Answer: <number>``); ``answer`` the
canonical spelling of the exact value (arith.spell); ``expression`` one arithmetic
expression over the question's own numbers whose value is the answer (what a worked
calculator episode writes; the tests evaluate it with the calculator's own parser, not the
generator's code); ``story`` the template's name. The reward is arith's (1 right, 0.1 a
readable wrong number, else 0); the calculator environment (``--env calculator``) and
``gspo eval --prompts`` take the rows, or a user's ``{question, answer}`` rows, unchanged.

Held-out questions are the ones whose text hashes into the test split (arith.split_of,
about 1 in 10), so no held-out question is ever trained on, whatever the seeds.
"""

from __future__ import annotations

import ast
import operator
import random
from collections.abc import Callable, Sequence
from fractions import Fraction

from gspo.train.tasks.arith import (
    arith_reward,
    as_prompt,
    from_row,
    has_format,
    last_number,
    parse_number,
    split_of,
)
from gspo.train.tasks.base import HELD_OUT_SEED_OFFSET, Prompt, Task

NAMES = ("Mia", "Leo", "Ava", "Noah", "Zoe", "Omar", "Lena", "Ravi", "Sara", "Tom", "Ines",
         "Kofi", "Yuki", "Ben", "Nora", "Ali")  # fmt: skip
ITEMS = (("notebooks", "pens"), ("apples", "pears"), ("stickers", "markers"),
         ("mugs", "plates"), ("shirts", "socks"), ("tickets", "snacks"))  # fmt: skip
GOODS = ("toys", "chairs", "bottles", "boxes", "bicycles")
Story = Callable[[random.Random], tuple[str, str]]  # rng -> (question, expression)


def _money(cents: int) -> str:
    """``1250`` -> ``"12.50"``, ``1200`` -> ``"12"``: prices as a shop writes them."""
    return str(cents // 100) if cents % 100 == 0 else f"{cents // 100}.{cents % 100:02d}"


def shopping(rng: random.Random) -> tuple[str, str]:
    name, (x, y) = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    p, q = _money(rng.randrange(50, 1000, 25)), _money(rng.randrange(25, 500, 25))
    total = a * Fraction(p) + b * Fraction(q)
    bill = next(v for v in (10, 20, 50, 100, 200) if v >= total)
    return (f"{name} buys {a} {x} at ${p} each and {b} {y} at ${q} each. {name} pays with a "
            f"${bill} bill. How much change does {name} get, in dollars?",
            f"{bill} - ({a} * {p} + {b} * {q})")  # fmt: skip


def printing(rng: random.Random) -> tuple[str, str]:
    rate, hours, minutes = rng.randint(6, 40), rng.randint(2, 5), rng.randrange(5, 60, 5)
    return (f"A printer prints {rate} pages per minute. How many pages does it print in "
            f"{hours} hours and {minutes} minutes?",
            f"{rate} * ({hours} * 60 + {minutes})")  # fmt: skip


def sharing(rng: random.Random) -> tuple[str, str]:
    name, friends = rng.choice(NAMES), rng.randint(3, 9)
    trays, per_tray = rng.randint(2, 6), rng.randint(6, 24)
    # keep the remainder of the total over the friends (and one extra share now and then)
    keep = (trays * per_tray) % friends + friends * rng.randint(0, 1)
    if keep >= trays * per_tray:
        keep = (trays * per_tray) % friends
    return (f"{name} bakes {trays} trays of {per_tray} cookies. {name} keeps {keep} cookies "
            f"and shares the rest equally among {friends} friends. How many cookies does "
            "each friend get?", f"({trays} * {per_tray} - {keep}) / {friends}")  # fmt: skip


def journey(rng: random.Random) -> tuple[str, str]:
    v, h = rng.randrange(40, 130, 5), rng.randint(2, 5)
    w, g = rng.randrange(30, 100, 5), rng.randint(2, 4)
    return (f"A train travels at {v} km per hour for {h} hours, then at {w} km per hour for "
            f"{g} hours. How many kilometres does it travel in total?",
            f"{v} * {h} + {w} * {g}")  # fmt: skip


def discount(rng: random.Random) -> tuple[str, str]:
    name, price = rng.choice(NAMES), rng.randrange(20, 200, 4)
    off, n = rng.choice((10, 20, 25, 30, 40, 50)), rng.randint(2, 4)
    return (f"A jacket costs ${price}. It is on sale for {off}% off. How much does {name} pay "
            f"for {n} jackets at the sale price, in dollars?",
            f"{n} * {price} * (100 - {off}) / 100")  # fmt: skip


def parts(rng: random.Random) -> tuple[str, str]:
    den = rng.choice((3, 4, 5, 6, 8))
    num = rng.randint(1, den - 1)
    students = den * rng.randint(3, 10)
    absent = rng.randint(1, max(1, min(4, students - students * num // den - 1)))
    return (f"A class has {students} students. {num}/{den} of them walk to school and the "
            f"rest come by bus. One day {absent} of the bus riders are ill and stay home. "
            "How many students come by bus that day?",
            f"{students} - {students} * {num} / {den} - {absent}")  # fmt: skip


def ages(rng: random.Random) -> tuple[str, str]:
    name, age, times, years = rng.choice(NAMES), rng.randint(4, 14), rng.randint(2, 4), \
        rng.randint(2, 15)  # fmt: skip
    return (f"{name} is {age} years old. {name}'s grandmother is {times} times as old as "
            f"{name}. How old will the grandmother be in {years} years?",
            f"{age} * {times} + {years}")  # fmt: skip


def fence(rng: random.Random) -> tuple[str, str]:
    length, width, cost = rng.randint(5, 40), rng.randint(3, 30), rng.randint(2, 15)
    return (f"A rectangular garden is {length} m long and {width} m wide. Fencing costs "
            f"${cost} per metre. How much does it cost to fence the whole garden, in dollars?",
            f"2 * ({length} + {width}) * {cost}")  # fmt: skip


def factory(rng: random.Random) -> tuple[str, str]:
    goods, a, b, weeks = rng.choice(GOODS), rng.randint(20, 150), rng.randint(5, 60), \
        rng.randint(2, 6)  # fmt: skip
    return (f"A factory makes {a} {goods} each weekday (Monday to Friday) and {b} {goods} "
            f"each day on Saturday and Sunday. How many {goods} does it make in {weeks} "
            "weeks?", f"{weeks} * (5 * {a} + 2 * {b})")  # fmt: skip


def savings(rng: random.Random) -> tuple[str, str]:
    name, weekly, weeks = rng.choice(NAMES), rng.randrange(5, 40, 5), rng.randint(3, 20)
    has = rng.randrange(10, 200, 5)
    return (f"{name} has ${has} and saves ${weekly} every week. {name} wants a bike that "
            f"costs ${has + weekly * weeks}. How many weeks does {name} have to save?",
            f"({has + weekly * weeks} - {has}) / {weekly}")  # fmt: skip


def fuel(rng: random.Random) -> tuple[str, str]:
    per_100 = rng.choice((4, 5, 6, 7, 8, 9, 10, 12))
    km, price = rng.randrange(100, 1000, 100), _money(rng.randrange(120, 220, 5))
    return (f"A car uses {per_100} litres of fuel per 100 km. Fuel costs ${price} per litre. "
            f"How much does the fuel for a {km} km trip cost, in dollars?",
            f"{km} / 100 * {per_100} * {price}")  # fmt: skip


def recipe(rng: random.Random) -> tuple[str, str]:
    name, serves, flour = rng.choice(NAMES), rng.choice((2, 4, 6)), rng.randrange(100, 600, 50)
    guests = rng.randint(2, 8) * (serves // 2)  # the recipe scales in halves at worst
    bag = rng.choice((1000, 1500, 2000, 2500))
    if bag < flour * Fraction(guests, serves):
        bag = 5000
    return (f"A recipe for {serves} people needs {flour} g of flour. {name} cooks it for "
            f"{guests} people, starting with a {bag} g bag of flour. How many grams of flour "
            "are left in the bag?", f"{bag} - {flour} * {guests} / {serves}")  # fmt: skip


STORIES: dict[str, Story] = {f.__name__: f for f in (
    shopping, printing, sharing, journey, discount, parts, ages, fence, factory, savings,
    fuel, recipe)}  # fmt: skip


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv}


def value_of(expression: str) -> Fraction:
    """The exact value of a story's expression (numbers, ``+ - * /``, parentheses), over
    ``fractions.Fraction`` from Python's parse tree, never ``eval``. (The tests check it
    with the calculator's own parser, gspo.train.envs.calculator.evaluate.)"""

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return Fraction(str(node.value))
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError(f"value_of: {ast.dump(node)} is not arithmetic")

    return walk(ast.parse(expression, mode="eval").body)


def problem(rng: random.Random, story: str | None = None) -> dict:
    """One word problem (module docstring: the row's fields), from ``story`` or a random one."""
    name = story or rng.choice(tuple(STORIES))
    text, expression = STORIES[name](rng)
    return as_prompt(text, value_of(expression), expression=expression, story=name)


def wordproblem_prompts(n: int, seed: int, *, split: str = "train") -> list[dict]:
    """``n`` problems of one split (``"train"`` or ``"test"``), stories drawn uniformly,
    reproducible from ``seed``."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng, out = random.Random(seed), []
    while len(out) < n:
        row = problem(rng)
        if split_of(row["question"]) == split:
            out.append(row)
    return out


class WordProblems(Task):
    """Multi-step word problems (module docstring); reads a user's ``{"question", "answer"}``
    rows as arith does, and `gspo eval` reports the format rate and last-number accuracy."""

    name = "wordproblems"
    question_field = "question"
    max_new_tokens = 96  # a sentence of working and the Answer: line

    def prompts(self, n: int, seed: int, levels: Sequence[int] = ()) -> list[Prompt]:
        return wordproblem_prompts(n, seed, split="train")

    def held_out(self, n: int, seed: int, levels: Sequence[int] = ()) -> list[Prompt]:
        return wordproblem_prompts(n, seed + HELD_OUT_SEED_OFFSET, split="test")

    def reward(self, prompts, completions, **fields) -> list[float]:
        return arith_reward(prompts, completions, **fields)

    def from_row(self, row: dict, where: str) -> Prompt:
        return from_row(row, where)

    def eval_metrics(self, prompt: Prompt, completion: str) -> dict[str, bool]:
        right = parse_number(str(prompt["answer"]))
        return {"format": has_format(completion), "last_number_correct":
                last_number(completion) == right}  # fmt: skip
