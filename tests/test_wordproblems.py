"""The wordproblems task: reproducible problems, exact answers checked by the calculator's
own parser (not the generator's arithmetic), grounded in the question's numbers, disjoint
splits, arith's reward, and the rows `gspo eval --prompts` and the calculator take."""

from __future__ import annotations

import json
import re
from fractions import Fraction

import pytest

from gspo.train.envs.calculator import Calculator, evaluate
from gspo.train.tasks import build_task, get, held_out_prompts
from gspo.train.tasks.arith import INSTRUCTION, parse_number, split_of
from gspo.train.tasks.wordproblems import STORIES, problem, value_of, wordproblem_prompts

# Numbers an expression may hold without the question stating them: minutes per hour,
# percent, the weekdays and weekend days of a week, a rectangle's two pairs of sides.
CONSTANTS = {"60", "100", "5", "2"}


def test_same_seed_same_problems_other_seed_others():
    a, b = wordproblem_prompts(50, 7), wordproblem_prompts(50, 7)
    assert a == b
    assert [r["question"] for r in wordproblem_prompts(50, 8)] != [r["question"] for r in a]


def test_answers_are_exact_by_an_independent_evaluation():
    """The calculator's recursive-descent parser (not the generator's ast walk) gives each
    row's answer from its expression; a story that computed its answer in floats, or whose
    expression did not match its numbers, would differ here."""
    rows = wordproblem_prompts(600, 0) + wordproblem_prompts(200, 1, split="test")
    for row in rows:
        assert evaluate(row["expression"]) == parse_number(row["answer"]), row
        assert value_of(row["expression"]) == evaluate(row["expression"])


def test_every_story_is_drawn_and_sensible():
    rows = wordproblem_prompts(600, 3)
    assert {r["story"] for r in rows} == set(STORIES)
    for row in rows:
        value = parse_number(row["answer"])
        assert value >= 0, row  # no negative change, cookies or weeks
        if row["story"] in ("sharing", "savings", "parts", "printing", "factory"):
            assert value.denominator == 1, row  # whole cookies, weeks, students, pages
        # money: whole cents; everything else terminates (arith.spell writes no fraction)
        assert "/" not in row["answer"], row
        assert (value * 100).denominator == 1, row


def test_expressions_use_the_questions_numbers():
    """What a worked calculator episode writes is read from the question: every number of
    the expression is in the question text (or a unit constant)."""
    for row in wordproblem_prompts(300, 4):
        numbers = set(re.findall(r"\d+(?:\.\d+)?", row["question"]))
        for number in re.findall(r"\d+(?:\.\d+)?", row["expression"]):
            assert number in numbers or number in CONSTANTS, (number, row)


def test_a_story_needs_several_operations():
    for name in STORIES:
        import random

        row = problem(random.Random(0), name)
        assert len(re.findall(r"[-+*/]", row["expression"])) >= 2, row


def test_held_out_split_is_disjoint_from_training():
    train = {r["question"] for r in wordproblem_prompts(2000, 0)}
    test = {r["question"] for r in held_out_prompts("wordproblems", 200, 0)}
    assert len(test) >= 150  # few repeats: the problem space is large
    assert not train & test
    assert all(split_of(q) == "test" for q in test)
    assert all(split_of(q) == "train" for q in train)


def test_prompt_carries_arith_instruction_and_reward_is_arith():
    task = get("wordproblems")
    row = task.prompts(1, 0)[0]
    assert row["prompt"] == f"{row['question']}\n{INSTRUCTION}"
    right, wrong = f"Working.\nAnswer: {row['answer']}", "Answer: -1"
    fields = {"answer": [row["answer"]] * 3}
    assert task.reward([row["prompt"]] * 3, [right, wrong, "no answer"], **fields) == \
        [1.0, 0.1, 0.0]  # fmt: skip
    # the exact value in another spelling is right: 28.5 == 57/2
    value = parse_number(row["answer"])
    other = f"Answer: {value.numerator}/{value.denominator}"
    assert task.reward([row["prompt"]], [other], answer=[row["answer"]]) == [1.0]


def test_rows_for_eval_prompts_and_the_calculator(tmp_path):
    """`gspo eval --prompts FILE --task wordproblems` rows are {question, answer}; the
    calculator environment takes a generated row as it is."""
    rows = held_out_prompts("wordproblems", 5, 0)
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"]})
                            + "\n" for r in rows))  # fmt: skip
    pool, held, _ = build_task(task="wordproblems", prompts_file=str(path), reward=None,
                               eval_size=64, seed=0)  # fmt: skip
    assert [p["prompt"] for p in pool + held] == [r["prompt"] for r in rows]
    env = Calculator(**rows[0])
    assert env.reset() == rows[0]["prompt"]
    answer = env.step(f"<calc>{rows[0]['expression']}</calc>")
    assert answer.endswith(f"= {rows[0]['answer']}")
    assert env.step(f"Answer: {rows[0]['answer']}") is None
    assert env.reward() == 1.0


def test_a_user_row_with_a_bad_answer_is_refused_naming_it(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question": "How many?", "answer": "many"}) + "\n")
    with pytest.raises(ValueError, match="not a number"):
        build_task(task="wordproblems", prompts_file=str(path), reward=None, eval_size=8,
                   seed=0)  # fmt: skip


def test_value_of_refuses_anything_but_arithmetic():
    assert value_of("(1 + 2) * 3 / 4") == Fraction(9, 4)
    with pytest.raises(ValueError, match="not arithmetic"):
        value_of("__import__('os')")
