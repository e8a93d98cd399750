"""Environments without training: the calculator's exact evaluator (never Python's eval), the
--env loader and options, and how a turn becomes token ids (gspo.train.episodes)."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gspo.train.config import TrainConfig
from gspo.train.envs import EnvError, load_env
from gspo.train.envs.calculator import CalcError, Calculator, answer_calls, evaluate
from gspo.train.episodes import PLAIN_SEPARATOR, Turns, lay_out


@pytest.mark.parametrize(("text", "value"), [
    ("85.6 * 4", Fraction("342.4")),      # the example
    ("0.1 + 0.2", Fraction(3, 10)),        # exact: a float sum would be 0.30000000000000004
    ("1/3 + 1/6", Fraction(1, 2)),
    ("-3^2", Fraction(-9)),                # the power binds tighter than the sign
    ("2 ** -2", Fraction(1, 4)),
    ("(2 - 1 - (5 + -1)) + 1", Fraction(-2)),  # arith level 3's shape
    ("6 ÷ 4 × 2", Fraction(3)),            # left to right: (6/4)*2, not 6/8
    (".5*2", Fraction(1)),
])  # fmt: skip
def test_calculator_values(text, value):
    assert evaluate(text) == value


@pytest.mark.parametrize(("text", "why"), [
    ("1/0", "division by zero"), ("2^100", "exponents"), ("3 +", "ends too early"),
    ("__import__('os')", "cannot read"), ("(1 + 2", "not closed"), ("1" * 201, "longer"),
])  # fmt: skip
def test_calculator_refuses(text, why):
    with pytest.raises(CalcError, match=why):
        evaluate(text)


@given(st.lists(st.fractions(min_value=-1000, max_value=1000, max_denominator=50),
                min_size=1, max_size=5), st.lists(st.sampled_from("+-*"), min_size=4,
                                                  max_size=4))  # fmt: skip
def test_calculator_matches_fraction_arithmetic(numbers, ops):
    # A parenthesised left fold: the evaluator must equal Fraction's own result.
    text, want = f"({numbers[0].numerator}/{numbers[0].denominator})", numbers[0]
    for op, x in zip(ops, numbers[1:], strict=False):
        text = f"({text}) {op} ({x.numerator}/{x.denominator})"
        want = {"+": want + x, "-": want - x, "*": want * x}[op]
    assert evaluate(text) == want


def test_calculator_episode_and_reward():
    env = Calculator(prompt="Calculate 85.6 * 4.\nEnd ...", question="Calculate 85.6 * 4.",
                     answer="342.4")  # fmt: skip
    assert env.reset().startswith("Calculate 85.6 * 4.")
    assert env.step("Let me see. <calc>85.6*4</calc>") == "85.6*4 = 342.4"
    assert env.step("So\nAnswer: 342.4") is None  # no call: the episode ends
    assert env.reward() == 1.0
    wrong = Calculator(question="q", answer="2")
    wrong.step("Answer: 3")
    assert wrong.reward() == 0.1  # arith's credit for a readable wrong number
    assert answer_calls("<calc>1/(2-2)</calc> <calc>1+1</calc>") == \
        "1/(2-2): error: division by zero\n1+1 = 2"  # fmt: skip
    assert answer_calls("no call here") is None


def test_env_loader_and_options(tmp_path, monkeypatch):
    assert load_env("calculator") is Calculator
    (tmp_path / "halfenv.py").write_text("class Half:\n    def reset(self):\n        return ''\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="lacks step, reward"):
        load_env("halfenv:Half")
    with pytest.raises(ValueError, match="cannot import module 'nope'"):
        load_env("nope:Env")
    with pytest.raises(ValueError, match="--env / env = 'calculater'"):
        TrainConfig(env="calculater")
    with pytest.raises(ValueError, match="add --env NAME"):
        TrainConfig(max_turns=3)
    with pytest.raises(ValueError, match="drop --reward"):
        TrainConfig(env="calculator", prompts="p.jsonl", reward="m:f")
    assert TrainConfig(env="calculator").max_turns == 4


def test_plain_text_turns_and_layout():
    from gspo.train.tiny import tiny_tokenizer

    tok = tiny_tokenizer()  # no chat template: messages are plain text
    turns = Turns(tok, None, [tok.eos_token_id])
    text = turns.env_text("sum 07:", [{"role": "assistant", "content": "43"}], [5, 6], "more")
    assert text == f"{PLAIN_SEPARATOR}more{PLAIN_SEPARATOR}"
    # two episodes: [model 2, env 3, model 1] and [model 1]; first messages of 2 and 1 tokens
    segments = [[([7, 8], True, [-1.0, -2.0]), ([9, 9, 9], False, None), ([10], True, [-3.0])],
                [([11], True, [-4.0])]]  # fmt: skip
    r = lay_out([{"prompt": "a"}, {"prompt": "b"}], [[4, 5], [6]], segments, ["x", "y"],
                [{}, {}], pad=0, greedy=False)  # fmt: skip
    assert r.prompt_len == 2 and r.input_ids.tolist() == [[4, 5, 7, 8, 9, 9, 9, 10],
                                                          [0, 6, 11, 0, 0, 0, 0, 0]]
    assert r.attention_mask.tolist() == [[1] * 8, [0, 1, 1, 0, 0, 0, 0, 0]]
    assert r.response_mask.tolist() == [[True, True, False, False, False, True],
                                        [True, False, False, False, False, False]]
    assert r.logp_sampler.tolist() == [[-1, -2, 0, 0, 0, -3], [-4, 0, 0, 0, 0, 0]]


def test_chat_template_turns_append_only_new_tokens(smollm2_chat):
    """SmolLM2's template: the episode's ids (first message + the model's tokens + the new
    text) decode to exactly the template's rendering of the whole conversation."""
    from gspo.train.envs.calculator import SYSTEM_PROMPT

    _, tok, eos = smollm2_chat
    turns = Turns(tok, SYSTEM_PROMPT, eos)
    first = turns.first_ids(["What is 2+3?"])[0]
    reply = tok("<calc>2+3</calc>", add_special_tokens=False)["input_ids"] + [eos[0]]
    later = [{"role": "assistant", "content": "<calc>2+3</calc>"}]
    extra = turns.env_ids("What is 2+3?", later, reply, "2+3 = 5")
    assert tok.decode(extra) == "\n<|im_start|>user\n2+3 = 5<|im_end|>\n<|im_start|>assistant\n"
    whole = tok.apply_chat_template(
        [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "What is 2+3?"},
         *later, {"role": "user", "content": "2+3 = 5"}], tokenize=False,
        add_generation_prompt=True)  # fmt: skip
    assert tok.decode(first + reply + extra) == whole
    # a reply cut by --max-new-tokens (no EOS): the template's <|im_end|> is the env's
    cut = turns.env_text("What is 2+3?", later, reply[:-1], "2+3 = 5")
    assert cut.startswith("<|im_end|>\n<|im_start|>user")


def test_env_errors_name_class_episode_and_turn():
    from gspo.train.envs.base import call, check_reward

    class Broken:
        def step(self, reply):
            raise KeyError("x")

    with pytest.raises(EnvError, match=r"Broken.step\(\) raised KeyError.*episode 3 .*turn 2"):
        call(Broken(), "step", "r", episode=3, turn=2, prompt="p")
    with pytest.raises(EnvError, match="reward.. returned nan"):
        check_reward(Broken(), float("nan"), episode=0, turn=1)
    assert torch.tensor(check_reward(Broken(), 2, episode=0, turn=1)) == 2
