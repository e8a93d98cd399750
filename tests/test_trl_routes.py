"""Several TRL-shaped classes in one run, routed by each row's ``environment`` field (as a
dataset mixing environments names them): each episode is its class's, sees its class's
tools only, is scored by the reward functions that return a number for it (None: not
theirs, TRL's rule); a row naming no class is refused at start (exit 2); metrics per class.

The classes and reward functions are written as TRL documents them (``reset(**kwargs)``,
tools as methods with docstrings, ``reward_func(environments, **kwargs)``)."""

from __future__ import annotations

import json
import re

import pytest

from gspo.train import episodes
from gspo.train.cli import main
from gspo.train.config import TrainConfig
from gspo.train.envs.select import resolve
from gspo.train.envs.trl import env_paths
from gspo.train.tiny import tiny_model, tiny_tokenizer
from gspo.train.tools.parsers import ToolCall, register
from test_episode_facts import Scripted
from test_train_e2e import TINY
from test_train_tools import TINY_TEMPLATE, CounterEnv, samples

TOK = tiny_tokenizer()
MODEL = tiny_model(layers=1, hidden=32, seed=0)


class Counter(CounterEnv):
    """test_train_tools' counter, routed by this name."""


class Doubler:
    def reset(self, **kwargs) -> str | None:
        self.value = kwargs["start"]
        return None

    def double(self) -> int:
        """
        Double the value.

        Returns:
            The doubled value.
        """
        self.value *= 2
        return self.value


def counter_reward(environments, **kwargs) -> list[float | None]:
    return [float(-abs(env.counter - env.target)) if isinstance(env, Counter) else None
            for env in environments]  # fmt: skip


def doubler_reward(environments, **kwargs) -> list[float | None]:
    return [float(env.value) if isinstance(env, Doubler) else None for env in environments]


def calls(reply: str) -> list[ToolCall]:
    """Each digit d is ``increment(step=d)``, each letter d is ``double()``."""
    return [ToolCall("increment", {"step": int(c)}, c) if c.isdigit() else
            ToolCall("double", {}, c) for c in re.findall(r"[0-9d]", reply)]  # fmt: skip


register("counter-or-double", calls)

ENV = "test_trl_routes:Counter,Doubler"
REWARDS = ["test_trl_routes:counter_reward", "test_trl_routes:doubler_reward"]
ROWS = [{"prompt": "count to 3", "target": 3, "environment": "Counter"},
        {"prompt": "double 5", "start": 5, "environment": "Doubler"}]  # fmt: skip


def test_env_paths_take_one_module_or_one_per_class():
    assert env_paths("m:A,B") == ["m:A", "m:B"]
    assert env_paths("a:A, b.c:B,C") == ["a:A", "b.c:B", "b.c:C"]
    with pytest.raises(ValueError, match="'module:A,B'"):
        env_paths("m:")


def test_each_row_gets_its_class_its_tools_and_the_rewards_that_are_its():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = open(TINY_TEMPLATE).read()
    eos = tokenizer.eos_token_id
    config = TrainConfig(env=ENV, reward=REWARDS, tool_parser="counter-or-double",
                         max_turns=3, max_new_tokens=4, prompts="rows.jsonl")  # fmt: skip
    one, dee = tokenizer.convert_tokens_to_ids("1"), tokenizer.convert_tokens_to_ids("d")
    # both episodes reply "1" then "d" then stop: Counter's "d" and Doubler's "1" are
    # calls of a tool their class does not have (an error each)
    script = [[[one, eos], [dee, eos], [eos]]] * 2
    run = episodes.build(config.data, config.sampling, Scripted(script, 4), tokenizer, MODEL,
                         None)  # fmt: skip
    rollout = run.rollout(ROWS, group_size=1, greedy=False)
    prompts = [tokenizer.decode(rollout.input_ids[i, : rollout.prompt_len]) for i in range(2)]
    assert "tools: incrementuser" in prompts[0] and "double" not in prompts[0]
    assert "tools: doubleuser" in prompts[1] and "increment" not in prompts[1]
    counter, doubler = rollout.episodes
    assert counter["environment"] == "Counter" and doubler["environment"] == "Doubler"
    assert (counter["tool_calls"], counter["tool_errors"]) == (2, 1)
    assert (doubler["tool_calls"], doubler["tool_errors"]) == (2, 1)
    answers = [t["content"] for t in counter["turns"] if t["role"] == "tool"]
    assert answers[0] == "1" and "unknown tool 'double'; the tools are increment" in answers[1]
    # counter_reward: -|1 - 3|; doubler_reward: 5 doubled once; each None for the other
    assert list(run.score(rollout)) == [-2.0, 10.0]
    metrics = run.metrics(rollout)
    assert {k: metrics[k] for k in metrics if k.endswith(("Counter", "Doubler"))} == {
        "episodes_Counter": 0.5, "reward_Counter": -2.0,
        "episodes_Doubler": 0.5, "reward_Doubler": 10.0}  # fmt: skip


def test_an_episode_no_reward_function_scores_stops_the_run():
    config = TrainConfig(
        env=ENV, reward=REWARDS[:1], tool_parser="counter-or-double", prompts="rows.jsonl"
    )
    doubler = resolve(config.data, None)(**ROWS[1])
    doubler.reset()
    doubler.step("no call")
    with pytest.raises(ValueError, match="returned None for this episode and Doubler has no "
                       "get_reward"):  # fmt: skip
        doubler.reward()


def _prompts(tmp_path, rows) -> str:
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_a_run_mixing_two_classes_trains_with_metrics_per_class(tmp_path):
    rows = [{"prompt": f"count to {t}", "target": t, "environment": "Counter"} for t in range(4)]
    rows += [{"prompt": f"double {s}", "start": s, "environment": "Doubler"} for s in range(4)]
    run = tmp_path / "run"
    assert main([*TINY, "--prompts", _prompts(tmp_path, rows), "--env", ENV, "--reward",
                 *REWARDS, "--tool-parser", "counter-or-double", "--chat-template",
                 TINY_TEMPLATE, "--max-new-tokens", "4", "--no-plot", "--samples-per-step",
                 "4", "--steps", "2", "--run-dir", str(run)]) == 0  # fmt: skip
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "episodes_Counter" in m]
    assert len(steps) == 2
    for m in steps:
        assert m["episodes_Counter"] + m["episodes_Doubler"] == pytest.approx(1.0)
    for c in samples(run):  # each sample's reward is its own class's function's
        prompt = c["turns"][0]["content"]
        assert c["environment"] == ("Counter" if prompt.startswith("count") else "Doubler")


@pytest.mark.parametrize(("row", "message"), [
    ({"prompt": "p", "environment": "Wordle"}, "names 'Wordle'; set its 'environment' to one "
     "of Counter, Doubler"),
    ({"prompt": "p"}, "has no 'environment' field"),
])  # fmt: skip
def test_a_row_naming_no_class_is_refused_at_start(tmp_path, capsys, row, message):
    rows = [*ROWS, {**row, "prompt": "the odd one"}, *ROWS]
    assert main([*TINY, "--prompts", _prompts(tmp_path, rows), "--env", ENV, "--reward",
                 *REWARDS, "--tool-parser", "counter-or-double", "--steps", "1", "--run-dir",
                 str(tmp_path / "r")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "the prompt row 'the odd one'" in err and message in err


def test_a_contract_class_among_several_is_refused(tmp_path, capsys):
    assert main([*TINY, "--prompts", _prompts(tmp_path, ROWS * 2), "--env",
                 "test_trl_routes:Counter,test_train_envs:Digits", "--reward", *REWARDS,
                 "--steps", "1", "--run-dir", str(tmp_path / "r")]) == 2  # fmt: skip
    assert "test_train_envs:Digits is not a TRL-shaped class" in capsys.readouterr().err


def test_a_warm_start_with_several_classes_is_refused():
    with pytest.raises(ValueError, match="each episode has its own class's tools"):
        TrainConfig(env=ENV, reward=REWARDS, prompts="rows.jsonl", warm_start="demos.jsonl")


@pytest.mark.parametrize(("change", "message"), [
    ({"tools": "calculator", "fsdp": True}, "not --fsdp: drop --fsdp"),
    ({"tools": "calculator", "async_rollouts": True}, "function tools do not run with "
     "--async-rollouts yet"),
])  # fmt: skip
def test_function_tools_refuse_fsdp_and_async_rollouts(change, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(task="wordproblems", **change)
