"""The environment contract as written (docs/environments.md): a row may hold only the
environment's fields, its ``reset()`` writing the first message; that message, after the
environment's system prompt, is checked at start against the model's positions with
--max-new-tokens for every row (exit 2 naming the row and the environment, before any
engine is built), --max-prompt-tokens drops such rows as it drops prompts, and an episode
that grows past the positions is cut, never an engine error (HF and vLLM)."""

from __future__ import annotations

import json

import pytest

from gspo.train import episodes
from gspo.train.cli import main
from gspo.train.config import TrainConfig
from gspo.train.engines.hf import HFEngine
from gspo.train.envs.base import EnvError
from gspo.train.tasks.digitsum import digitsum_reward
from gspo.train.tasks.files import load_prompts_file
from gspo.train.tiny import tiny_model, tiny_tokenizer
from test_train_e2e import REPO, TINY, rows

TEMPLATE = str(REPO / "tests" / "data" / "tiny-tools.jinja")  # "role: content" lines
# the template around a first message M after a system prompt S: "system: S\nuser: M\n
# assistant: " is 8 + len(S) + 1 + 6 + len(M) + 1 + 11 characters, one token each
FRAME = 27


class FieldsOnly:
    """A row holds only ``target``; reset() writes the question from it."""

    def __init__(self, target, **fields):
        self.target, self.reply = int(target), ""

    def reset(self):
        return f"sum {self.target:02d}:"

    def step(self, reply):
        self.reply = reply

    def reward(self):
        return digitsum_reward([""], [self.reply], [self.target])[0]


class Long(FieldsOnly):
    """Row 13's first message is 70 characters: 127 tokens after this 30-character system
    prompt in TEMPLATE (97 without it), so with --max-new-tokens 4 it passes the tiny
    model's 128 positions only if the system prompt is left out of the count."""

    system_prompt = "s" * 30

    def reset(self):
        return "sum " + "9" * 66 if self.target == 13 else super().reset()


class Picky(FieldsOnly):
    def __init__(self, target, **fields):
        if int(target) == 13:
            raise KeyError("no such level")
        super().__init__(target)


class Chatty(FieldsOnly):
    """Answers every reply with 20 characters: an episode runs into the positions."""

    def step(self, reply):
        self.reply = reply
        return "go on " * 3 + "ok"


class Growing(FieldsOnly):
    """reset() writes longer messages each time it is called: what start measured is not
    what a later episode gets."""

    calls = 0

    def reset(self):
        Growing.calls += 1
        return "sum " + "9" * (5 * Growing.calls)


def _rows_file(tmp_path, n=20):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"target": t}) + "\n" for t in range(n)))
    return str(path)


def test_rows_without_a_prompt_are_taken_only_with_an_environment(tmp_path):
    path = _rows_file(tmp_path)
    with pytest.raises(ValueError, match='line 1 must be an object with a "prompt"'):
        load_prompts_file(path)
    assert load_prompts_file(path, env=True)[13] == {"target": 13}
    (tmp_path / "empty.jsonl").write_text("{}\n{}\n")
    with pytest.raises(ValueError, match="line 1 is an empty object"):
        load_prompts_file(tmp_path / "empty.jsonl", env=True)


def test_rows_of_environment_fields_train_and_samples_show_the_first_message(tmp_path):
    run = tmp_path / "run"
    assert main([*TINY, "--steps", "2", "--no-plot", "--prompts", _rows_file(tmp_path),
                 "--env", "test_env_rows:FieldsOnly", "--max-turns", "1",
                 "--run-dir", str(run)]) == 0  # fmt: skip
    assert all(r["turns_per_episode"] == 1 for r in rows(run)[1:])
    group = json.loads((run / "samples.jsonl").read_text().splitlines()[0])
    assert group["prompt"].startswith("sum ") and group["prompt"].endswith(":")
    assert group["completions"][0]["turns"][0] == {"role": "user", "content": group["prompt"]}


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_a_first_message_past_the_positions_is_exit_2_naming_row_and_environment(
        tmp_path, capsys, engine):  # fmt: skip
    """Exit 2 before any engine is built (vLLM's is never started), the environment's
    system prompt counted: without it, row 13 would fit (97 + 4 <= 128)."""
    if engine == "vllm":
        pytest.importorskip("vllm")
    code = main([*TINY, "--steps", "1", "--no-plot", "--prompts", _rows_file(tmp_path),
                 "--env", "test_env_rows:Long", "--chat-template", TEMPLATE, "--rollout",
                 engine, "--run-dir", str(tmp_path / "run")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    assert (f"the first message of {FRAME + 30 + 70} tokens (environment Long's reset() for "
            "training row 13, after the system prompt; the row's fields {'target': 13}) "
            "plus --max-new-tokens 4 exceeds the model's 128 positions") in err, err  # fmt: skip
    assert "--max-prompt-tokens 124 drops longer prompts" in err
    assert not (tmp_path / "run").exists()  # nothing made: the check comes first


def test_max_prompt_tokens_drops_rows_whose_first_message_is_too_long(tmp_path):
    run = tmp_path / "run"
    assert main([*TINY, "--steps", "1", "--no-plot", "--prompts", _rows_file(tmp_path),
                 "--env", "test_env_rows:Long", "--chat-template", TEMPLATE,
                 "--max-prompt-tokens", "100", "--max-turns", "1",
                 "--run-dir", str(run)]) == 0  # fmt: skip
    assert rows(run)[0]["prompts_dropped"] == 1  # row 13 (127 tokens), the others 64


def test_an_environment_failing_on_a_row_at_start_is_exit_2_naming_it(tmp_path, capsys):
    code = main([*TINY, "--steps", "1", "--no-plot", "--prompts", _rows_file(tmp_path),
                 "--env", "test_env_rows:Picky", "--run-dir", str(tmp_path / "run")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    assert "environment Picky() raised KeyError: 'no such level' in training row 13 (fields " \
        "{'target': 13})" in err  # fmt: skip


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_episodes_that_run_into_the_positions_are_cut_not_an_engine_error(tmp_path, engine):
    """Each turn adds 4 model tokens and 20 of the environment's: by turn 6 the tiny model's
    128 positions are full, and every episode ends "positions" on both engines."""
    args = [*TINY]
    if engine == "vllm":
        pytest.importorskip("vllm")
        from test_train_vllm import TINY as VLLM

        args = [*VLLM]
    run = tmp_path / "run"
    assert main([*args, "--steps", "1", "--no-plot", "--prompts", _rows_file(tmp_path),
                 "--env", "test_env_rows:Chatty", "--max-turns", "20",
                 "--run-dir", str(run)]) == 0  # fmt: skip
    r = rows(run)[1]
    assert r["cut_frac"] == 1.0 and r["truncated_frac"] == 1.0, r
    assert 4 < r["turns_per_episode"] < 20, r


def test_a_first_message_that_grew_since_start_is_an_environment_error():
    """data.fit measured each row once; an environment whose reset() now writes more than
    fits is stopped as a failing environment (checkpoint, exit 3), not by the engine."""
    model, tok = tiny_model(layers=1, hidden=32), tiny_tokenizer()
    config = TrainConfig(max_new_tokens=4, env="test_env_rows:Growing", max_turns=1)
    collect = episodes.build(config.data, config.sampling, HFEngine(model, tok, config.sampling),
                             tok, model, None)  # fmt: skip
    Growing.calls = 0
    collect.rollout([{"target": 1}], group_size=2, greedy=True)  # 9 and 14 tokens: they fit
    Growing.calls = 30
    with pytest.raises(EnvError, match=r"Growing.reset\(\) wrote a first message of 159 "
                                       r"tokens in episode 0 \(fields \{'target': 1\}\)"):  # fmt: skip
        collect.rollout([{"target": 1}], group_size=1, greedy=True)
