r"""The arith reward and loader read a number only when the whole answer is that number
(arith's module docstring states the rule).

Measured on main before the fix: a row with "answer": "1e-05" was read as 1, so the right
"Answer: 0.00001" scored 0.1 and "Answer: 1" scored 1.0; "Answer: 5 or 6" (and "5, 6",
"5 and 6") scored 1.0 for an answer of 5; a 10000-digit answer raised ValueError inside the
reward (a run would stop); `gspo eval`'s last number of "x = 1e-05" was -5.
"""

from __future__ import annotations

import time
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gspo.train.tasks.arith import (
    arith_reward,
    final_answer,
    from_row,
    last_number,
    parse_number,
    spell,
)

F = Fraction


def test_scientific_notation_in_a_rows_answer_is_exact():
    row = from_row({"question": "What is 1 divided by 100000?", "answer": "1e-05"}, "line 1")
    assert row["answer"] == "1e-05" and parse_number(row["answer"]) == F(1, 100_000)
    completions = ["Answer: 0.00001", "Answer: 1/100000", "Answer: 1e-5", "Answer: 1"]
    # Right spellings 1.0; "1" is readable but wrong: 0.1 (the bug gave 0.1, 0.1, 1.0, 1.0).
    assert arith_reward(["q"] * 4, completions, answer=[row["answer"]] * 4) == [1, 1, 1, 0.1]
    # A JSON number (json.loads gives the float 1e-05, whose str is '1e-05') reads the same.
    from_json = from_row({"question": "q", "answer": 1e-05}, "x")
    assert parse_number(from_json["answer"]) == F(1, 100_000)


def test_a_row_whose_answer_is_not_one_number_is_refused_naming_the_row(tmp_path):
    from gspo.train.tasks import load_prompts_file

    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "What is 2 plus 3?", "answer": "5"}\n'
                    '{"question": "Pick 5 or 6.", "answer": "5 or 6"}\n')  # fmt: skip
    with pytest.raises(ValueError, match=r"q.jsonl: line 2: answer '5 or 6' .* not a number"):
        load_prompts_file(path, task="arith")
    for answer in ("1 x 10^-5", "3 1/2", "five"):
        with pytest.raises(ValueError, match=r"^row 7: answer .* not a number: give one"):
            from_row({"question": "q", "answer": answer}, "row 7")


# (completion, the value read after the last "Answer:"; None scores 0). The first-number
# reading of the bug gave 5, 5, 5, 12, 7, 1, 5/2, 1, -7/9 for the first nine Nones below.
WHOLE_ANSWERS = [
    ("Answer: 5 or 6", None),  # two different numbers: not an answer of 5
    ("Answer: 5, 6", None),
    ("Answer: 5 and 6", None),
    ("Answer: 12 cm^2", None),  # a unit with a number in it names a second number
    ("Answer: 7 since 3 + 4 = 7", None),
    ("Answer: 1 x 10^-5", None),  # not scientific notation we read: refused, not 1
    ("Answer: 2.5.3", None),
    ("Answer: \\boxed{1} \\boxed{2}", None),
    ("Answer: -7/9 ~ -0.778", None),  # a rounding named next to the value
    ("Answer: 1/2 = 0.5", F(1, 2)),  # the same value twice is one answer
    ("Answer: 0.5 (1/2)", F(1, 2)),
    ("Answer: 1e-05", F(1, 100_000)),
    ("Answer: 2.5E3", F(2500)),
    ("Answer: -1,234.5e-2", F(-12345, 1000)),
    ("Answer: 5 apples", F(5)),  # a trailing word is a decoration (a unit)
    ("Answer: 50%", F(50)),  # '%' too: 50, not 1/2
    ("Answer: 5 or six", F(5)),  # numbers in words are not read (documented limit)
    ("Answer: 7\nCheck: 3 + 4 = 7, and 2 + 2 = 4.", F(7)),  # the answer is its line
    ("Answer:\n$$\n\\frac{1}{2}\n$$", F(1, 2)),  # display math on the next line
    ("Answer: " + "1" * 10_000, None),  # too long to read: refused, not an error
    ("Answer: 1e999999999", None),  # not computed (10**999999999)
    ("Answer: \\frac{" + "1" * 5000 + "}{3}", None),
]


@pytest.mark.parametrize(("completion", "expected"), WHOLE_ANSWERS)
def test_whole_answer_table(completion, expected):
    start = time.perf_counter()
    assert final_answer(completion) == expected
    assert time.perf_counter() - start < 1.0  # a huge exponent is refused, not computed


def test_a_second_number_costs_the_credit():
    completions = ["Answer: 5", "Answer: 5 or 6", "Answer: 5 apples", "Answer: 6"]
    assert arith_reward(["q"] * 4, completions, answer=["5"] * 4) == [1.0, 0.0, 1.0, 0.1]


def test_last_number_reads_scientific_notation_for_gspo_eval():
    assert last_number("so x = 1e-05") == F(1, 100_000)  # the bug: -5 (the "-05")
    assert last_number("2 + 3 = 5, not 6") == F(6)  # format aside, still the last number
    assert last_number("x" + "9" * 10_000) is None  # too long: None, not a ValueError


# ---------------------------------------------------------------- property


@st.composite
def values(draw) -> Fraction:
    """Rationals of every kind the task writes: integers, terminating decimals (denominator
    2^a 5^b) and repeating ones (any denominator), signed, up to 10^7."""
    den = draw(st.one_of(st.integers(1, 1000),
                         st.builds(lambda a, b: 2**a * 5**b, st.integers(0, 6), st.integers(0, 6))))  # fmt: skip
    return F(draw(st.integers(-(10**7), 10**7)), den)


def _grouped(text: str) -> str:
    """'-1234567.25' -> '-1,234,567.25' (thousands separators in the integer part)."""
    sign, digits = ("-", text[1:]) if text.startswith("-") else ("", text)
    whole, dot, frac = digits.partition(".")
    return f"{sign}{int(whole):,}{dot}{frac}"


@st.composite
def spellings(draw, value: Fraction) -> str:
    """One way a person or a model writes ``value``, decorated."""
    n, d = abs(value.numerator), value.denominator
    negative = value < 0
    k = draw(st.integers(1, 5))  # a fraction not in lowest terms
    forms = ["canonical", "fraction", "latex"]
    if "/" not in spell(value):  # terminating: decimal forms as well
        forms += ["grouped", "scientific"]
    form = draw(st.sampled_from(forms))
    minus = draw(st.sampled_from(["-", "\u2212"])) if negative else draw(st.sampled_from(["", "+"]))
    if form == "canonical":
        text = minus + spell(abs(value))
    elif form == "grouped":
        text = minus + _grouped(spell(abs(value)))
    elif form == "fraction":
        on_den = negative and draw(st.booleans())  # "7/-9"
        text = f"{n * k}/-{d * k}" if on_den else f"{minus}{n * k}/{d * k}"
    elif form == "latex":
        frac = draw(st.sampled_from(["\\frac", "\\dfrac"]))
        inside = negative and draw(st.booleans())  # "\frac{-3}{4}"
        text = (
            f"{frac}{{-{n * k}}}{{{d * k}}}" if inside else f"{minus}{frac}{{{n * k}}}{{{d * k}}}"
        )
    else:
        e = draw(st.integers(-6, 6))
        mantissa = spell(abs(value) / F(10) ** e)  # terminates too
        text = f"{minus}{mantissa}{draw(st.sampled_from(['e', 'E']))}{e}"
    wrap = draw(st.sampled_from(["{}", "**{}**", "${}$", "\\boxed{{{}}}", "`{}`", "\\({}\\)"]))
    text = wrap.format(text)
    text = draw(st.sampled_from(["", "= "])) + text
    return text + draw(st.sampled_from(["", ".", " apples", " apples."]))


@given(st.data())
def test_decorated_numbers_round_trip_and_a_second_number_fails(data):
    value = data.draw(values())
    text = data.draw(spellings(value))
    assert parse_number(text) == value, text
    assert final_answer(f"Work: 3 + 4 = 7.\nAnswer: {text}\n") == value, text
    other = data.draw(values().filter(lambda v: v != value))
    joiner = data.draw(st.sampled_from([" or ", ", ", " ", " = ", " and maybe "]))
    second = data.draw(spellings(other))
    assert final_answer(f"Answer: {text}{joiner}{second}") is None, (text, joiner, second)
    assert arith_reward(["q"], [f"Answer: {text}{joiner}{second}"], answer=[spell(value)]) == [0.0]
