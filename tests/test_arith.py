"""The arith task: exact answer parsing, canonical spelling, question generation."""

import random
import re
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gspo.train.tasks.arith import (
    CATEGORIES,
    INSTRUCTION,
    arith_prompts,
    arith_reward,
    as_prompt,
    final_answer,
    has_format,
    last_number,
    parse_number,
    question,
    spell,
)

F = Fraction

# (completion, value read after the last "Answer:"); None means "no readable answer", which
# scores 0. A parser that takes the first "Answer:", reads "3 1/2" as 3, or compares floats
# fails one of these.
FINAL_ANSWERS = [
    ("Answer: 7", F(7)),
    ("answer: -7", F(-7)),
    ("ANSWER : 12.", F(12)),  # a full stop ends the sentence, not a decimal
    ("Answer: -7/9", F(-7, 9)),
    ("Answer: -14/18", F(-7, 9)),  # equal rationals, different spelling
    ("Answer: 7/-9", F(-7, 9)),
    ("Answer: 0.1", F(1, 10)),  # exact, not the float 0.1000000000000000055...
    ("Answer: .5", F(1, 2)),
    ("Answer: -.25", F(-1, 4)),
    ("Answer: 1,234", F(1234)),
    ("Answer: 1,234.5", F(2469, 2)),
    ("Answer: \u22125", F(-5)),  # Unicode minus sign
    ("**Answer:** 42", F(42)),
    ("**Answer**: 42", F(42)),
    ("Answer: **-3**", F(-3)),
    ("Answer: $\\frac{3}{4}$", F(3, 4)),
    ("Answer: $-\\frac{3}{4}$", F(-3, 4)),
    ("Answer: \\(\\dfrac{-6}{8}\\)", F(-3, 4)),
    ("Answer: \\boxed{17}", F(17)),
    ("Answer: `8`", F(8)),
    ("Answer: = 9", F(9)),
    ("Answer: 5 apples", F(5)),
    ("Answer: 2.50", F(5, 2)),
    ("First 3 + 4 = 7.\nAnswer: 7", F(7)),
    ("Answer: 6\nWait, I made an error.\nAnswer: 8", F(8)),  # the last one counts
    ("Answer: 3 1/2", None),  # a mixed number is refused rather than read as 3
    ("Answer: 5/0", None),
    ("Answer: five", None),
    ("Answer:", None),
    ("The answer is 7", None),  # no "Answer:" format
    ("3 + 4 = 7", None),
    ("", None),
]


@pytest.mark.parametrize(("completion", "expected"), FINAL_ANSWERS)
def test_final_answer_table(completion, expected):
    assert final_answer(completion) == expected
    assert has_format(completion) == (expected is not None)


@pytest.mark.parametrize(
    ("value", "text"),
    [(F(7), "7"), (F(-7), "-7"), (F(0), "0"), (F(5, 2), "2.5"), (F(-1, 4), "-0.25"),
     (F(1, 8), "0.125"), (F(-1, 50), "-0.02"), (F(1, 3), "1/3"), (F(-7, 9), "-7/9"),
     (F(-14, 18), "-7/9"), (F(1, 6), "1/6")],
)  # fmt: skip
def test_spell_canonical(value, text):
    assert spell(value) == text


@given(st.fractions(max_denominator=10_000))
def test_spell_round_trips_exactly(value):
    assert parse_number(spell(value)) == value
    assert final_answer(f"Work...\nAnswer: {spell(value)}") == value


def test_reward_is_exact_rational_equality():
    completions = ["Answer: -14/18", "Answer: -0.777", "Answer: -7/9.", "-7/9", "Answer: 7/9"]
    # Right (any equal spelling) 1; a readable but wrong answer earns only the format credit
    # (0.1); no "Answer:" earns nothing even when the number is right.
    assert arith_reward(["q"] * 5, completions, answer=["-7/9"] * 5) == [1, 0.1, 1, 0, 0.1]
    # Extra prompt fields (category, level) reach the reward as keywords and are ignored.
    assert arith_reward(["q"], ["Answer: 0.3"], answer=["0.3"], category=["add"]) == [1.0]


def test_levels_pick_the_questions_difficulty():
    from gspo.train.tasks import build_task

    rows = arith_prompts(200, seed=0, levels=(1,))
    assert {r["level"] for r in rows} == {1}
    pool, held, _ = build_task(task="arith", prompts_file=None, reward=None, eval_size=20,
                               seed=0, levels=(1, 2))  # fmt: skip
    assert {r["level"] for r in pool} == {1, 2} and {r["level"] for r in held} <= {1, 2}
    from gspo.train.config import TrainConfig

    with pytest.raises(ValueError, match="only --task arith has levels"):
        TrainConfig(task="digitsum", task_levels=(1,))
    with pytest.raises(ValueError, match="levels are 1, 2 and 3"):
        TrainConfig(task="arith", task_levels=(4,))


def test_expressions_read_as_python_evaluates_them():
    # Every inner node is parenthesised, so Python's own precedence must give our value:
    # a renderer that dropped a parenthesis would disagree on some of these.
    rng = random.Random(0)
    checked = 0
    for level in (1, 2, 3):
        for _ in range(200):
            text, value = question(rng, "expr", level)
            expr = re.sub(r"^(What is |Evaluate |Calculate )", "", text).rstrip("?.")
            assert eval(expr) == value, text  # noqa: S307 - digits and + - * ( ) only
            checked += 1
    assert checked == 600


@pytest.mark.parametrize("category", [c for c in CATEGORIES if c != "expr"])
def test_binary_questions_state_their_value(category):
    # Recompute each value from the numbers in the question text, in the order the phrasing
    # puts them ("Subtract b from a" is a - b): a swapped operand fails this.
    rng = random.Random(1)
    num = r"(-?\d+(?:\.\d+)?(?:/\d+)?)"
    for level in (1, 2, 3):
        for _ in range(100):
            text, value = question(rng, category, level)
            a, b = (F(x) for x in re.findall(num, text))
            if text.startswith(("Subtract", "Take")):
                a, b = b, a
            ops = {"add": F.__add__, "sub": F.__sub__, "mul": F.__mul__, "div": F.__truediv__}
            assert ops[category](a, b) == value, text


def test_prompts_are_reproducible_and_cover_everything():
    rows = arith_prompts(500, seed=3)
    assert rows == arith_prompts(500, seed=3)
    assert rows != arith_prompts(500, seed=4)
    assert {r["category"] for r in rows} == set(CATEGORIES)
    assert {r["level"] for r in rows} == {1, 2, 3}
    for row in rows:
        assert row["prompt"] == f"{row['question']}\n{INSTRUCTION}"
        # The stored answer is the canonical spelling of an exact value.
        assert spell(parse_number(row["answer"])) == row["answer"]
    kinds = {"frac": any("/" in r["answer"] for r in rows),
             "dec": any("." in r["answer"] for r in rows),
             "neg": any(r["answer"].startswith("-") for r in rows)}  # fmt: skip
    assert all(kinds.values()), kinds


def test_train_and_test_splits_are_disjoint():
    train = {r["question"] for r in arith_prompts(3000, seed=0)}
    test = {r["question"] for r in arith_prompts(300, seed=0, split="test")}
    assert train and test and not train & test
    assert len(test) > 200  # mostly distinct questions, not a handful repeated


def test_user_rows_are_checked():
    row = as_prompt("What is 3 plus 0.2?", "3.2")
    assert arith_reward([row["prompt"]], ["Answer: 16/5"], answer=[row["answer"]]) == [1.0]
    with pytest.raises(ValueError, match="not a number"):
        as_prompt("What is 3 plus 0.2?", "three point two")


def test_arith_takes_a_users_question_file_without_a_reward(tmp_path):
    # The task's own reward scores {"question", "answer"} rows; other tasks need --reward.
    from gspo.train.config import TrainConfig
    from gspo.train.tasks import build_task

    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "What is 1 plus 1?", "answer": "2"}\n'
                    '{"question": "Halve 3.", "answer": "3/2", "category": "div"}\n' * 5)  # fmt: skip
    TrainConfig(task="arith", prompts=str(path))  # accepted
    with pytest.raises(ValueError, match="your prompts need your reward"):
        TrainConfig(task="digitsum", prompts=str(path))
    pool, held, reward_fn = build_task(task="arith", prompts_file=str(path), reward=None,
                                       eval_size=4, seed=0)  # fmt: skip
    assert pool[0]["prompt"] == f"What is 1 plus 1?\n{INSTRUCTION}"
    assert held[-1]["category"] == "div"
    assert reward_fn(["p"], ["Answer: 1.5"], answer=[held[-1]["answer"]]) == [1.0]


# (completion, its last number): what `gspo eval`'s last-number accuracy reads, format aside.
LAST_NUMBERS = [
    ("7 - 1 = 6", F(6)),
    ("3 - (5 + 4) = 7 - 11 = -1", F(-1)),  # a spaced minus is an operator, "-1" a number
    ("5 * 5 = 25\nThe answer is 25.", F(25)),
    ("The answer is 7/9.", F(7, 9)),  # the fraction stays whole, not 9
    ("It is 1,234.5 exactly", F(2469, 2)),
    ("Answer: **-3**", F(-3)),
    ("\u22124 apples", F(-4)),
    ("no digits here", None),
]


@pytest.mark.parametrize(("completion", "expected"), LAST_NUMBERS)
def test_last_number_table(completion, expected):
    assert last_number(completion) == expected
