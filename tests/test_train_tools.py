"""`gspo train --tools` and TRL-shaped `--env` at tiny sizes: the tools reach the chat
template, each call's result goes back as a tool message, the calls and errors are counted
per episode in samples and metrics (checked against the replies themselves), failures
become messages to the model, and a class and a reward function written as TRL documents
them train unchanged.

The tiny model's tokenizer has only digits, letters and a few signs, so it cannot write
``<tool_call>``: these runs use a parser registered here (``digits``: each run of digits in a
reply is a call). The library's real parsers are tested on text in test_tools.py."""

from __future__ import annotations

import json
import re

import pytest

from gspo.train import episodes
from gspo.train.cli import main
from gspo.train.envs.trl import trl_env
from gspo.train.tools.parsers import ToolCall, register
from test_train_e2e import REPO, TINY, rows

TEMPLATE = str(REPO / "examples" / "chatml-tools.jinja")
TINY_TEMPLATE = str(REPO / "tests" / "data" / "tiny-tools.jinja")  # the tiny model's 128 positions


def digits(reply: str) -> list[ToolCall]:
    """Each run of digits is a call: ``double(x)`` for up to 2 digits, ``triple`` (no such
    tool: an error) for longer runs."""
    return [ToolCall("double" if len(d) <= 2 else "triple", {"x": int(d)}, d)
            for d in re.findall(r"\d+", reply)]  # fmt: skip


register("digits", digits)


def double(x: int) -> int:
    """Double a number.

    Args:
        x: The number.
    """
    if x == 7:
        raise ValueError("seven is not doubled")
    return 2 * x


def expected_counts(reply: str) -> tuple[int, int]:
    calls = digits(reply)
    errors = sum(c.name != "double" or c.arguments["x"] == 7 for c in calls)
    return len(calls), errors


def samples(run_dir) -> list[dict]:
    lines = (run_dir / "samples.jsonl").read_text().splitlines()
    return [c for line in lines for c in json.loads(line)["completions"]]


TOOLS = [*TINY, "--task", "digitsum", "--tools", "test_train_tools:double", "--tool-parser",
         "digits", "--chat-template", TINY_TEMPLATE, "--max-new-tokens", "6", "--no-plot",
         "--samples-per-step", "4"]  # fmt: skip


def test_a_function_tool_trains_and_its_calls_and_errors_are_counted(tmp_path):
    run = tmp_path / "run"
    assert main([*TOOLS, "--steps", "3", "--run-dir", str(run)]) == 0
    metrics = [r for r in rows(run) if "loss" in r]
    assert len(metrics) == 3
    seen_calls = seen_errors = 0
    for c in samples(run):
        replies = [t["content"] for t in c["turns"] if t["role"] == "assistant"]
        answers = [t for t in c["turns"] if t["role"] == "tool"]
        want = [expected_counts(r) for r in replies[: len(replies) - (not c["truncated"])]]
        # every reply but a closing one (no call) was answered; counts match the replies
        assert (c["tool_calls"], c["tool_errors"]) == \
            (sum(w[0] for w in want), sum(w[1] for w in want)), c  # fmt: skip
        if not c["truncated"]:
            assert expected_counts(replies[-1])[0] == 0  # ended: its last reply made no call
        assert len(answers) == c["tool_calls"] - (expected_counts(replies[-1])[0]
                                                  if c["truncated"] else 0)  # fmt: skip
        for t in answers:
            assert t["content"].startswith("error: ") or t["content"].isdigit(), t
        seen_calls, seen_errors = seen_calls + c["tool_calls"], seen_errors + c["tool_errors"]
    assert seen_calls > 0 and seen_errors > 0  # the random model calls, and fails, now and then
    for r in metrics:
        assert {"tool_calls", "tool_errors", "tool_call_rate", "turns_per_episode"} <= set(r)
        assert 0 <= r["tool_errors"] <= r["tool_calls"]


def test_tool_messages_go_through_the_template_with_the_tools_shown(tmp_path):
    """The episode's tokens: the system turn lists the tool's schema, each answer is a
    <tool_response> of the template (not a user message), then the assistant turn opens."""
    from gspo.train.models import load, use_chat_template
    from gspo.train.tools.schema import tool_schema

    _, tokenizer = load("smollm2")
    use_chat_template(tokenizer, TEMPLATE)
    turns = episodes.Turns(tokenizer, None, [tokenizer.eos_token_id], tools=[tool_schema(double)])
    turns.check()
    first = tokenizer.decode(turns.first_ids(["Double 4."])[0])
    assert '"name": "double"' in first and first.endswith("<|im_start|>assistant\n")
    reply = tokenizer("<tool_call>x</tool_call><|im_end|>")["input_ids"]
    text = turns.env_text("Double 4.", [{"role": "assistant", "content": "x"}], reply,
                          [{"role": "tool", "name": "double", "content": "8"}])  # fmt: skip
    assert text == "\n<|im_start|>user\n<tool_response>\n8\n</tool_response><|im_end|>\n" \
        "<|im_start|>assistant\n"  # fmt: skip


def test_a_template_without_tools_is_refused_at_start(tmp_path, capsys):
    args = [a for a in TOOLS if a not in ("--chat-template", TINY_TEMPLATE)]
    assert main([*args, "--steps", "1", "--run-dir", str(tmp_path / "r")]) == 2
    assert "no chat template" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--tool-parser", "gemma"], "use one of hermes"),
    (["--tools", "test_train_tools:nope"], "no function 'nope'"),
    (["--env", "calculator"], "--env brings its own tools"),
])  # fmt: skip
def test_bad_tool_flags_are_refused_naming_them(tmp_path, capsys, flags, message):
    args = list(TOOLS)
    for flag, value in zip(flags[::2], flags[1::2], strict=True):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    assert main([*args, "--steps", "1", "--run-dir", str(tmp_path / "r")]) == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------- TRL-shaped environments
# Written as TRL's GRPOTrainer documentation writes them (environment_factory): constructed
# without arguments, reset(**kwargs) per rollout, public methods are the tools, and a reward
# function that receives the instances as `environments`.


class CounterEnv:
    def __init__(self):
        self.counter = 0

    def reset(self, **kwargs) -> str | None:
        self.counter = 0
        self.target = kwargs["target"]
        return None

    def increment(self, step: int) -> int:
        """
        Increment the internal counter.

        Args:
            step: Value to add to the counter.

        Returns:
            The updated counter value.
        """
        self.counter += step
        return self.counter


def reward_func(environments, **kwargs) -> list[float]:
    return [float(-abs(env.counter - env.target)) for env in environments]


class SelfScored(CounterEnv):
    def get_reward(self) -> float:
        return float(self.counter > 0)


class OwnsItsReward:
    """TRL's other documented form: the row's column as a named argument of reset, and the
    environment scoring itself with get_reward (no reward function)."""

    def reset(self, target, **kwargs) -> None:
        self.counter, self.target = 0, target

    def get_reward(self) -> float:
        return float(-abs(self.counter - self.target))

    def increment(self, step: int) -> int:
        """
        Increment the internal counter.

        Args:
            step: Value to add to the counter.

        Returns:
            The updated counter value.
        """
        self.counter += step
        return self.counter


def increments(reply: str) -> list[ToolCall]:
    return [ToolCall("increment", {"step": int(d)}, d) for d in re.findall(r"\d", reply)]


register("increments", increments)


def test_a_trl_shaped_class_is_adapted_its_methods_are_tools_and_rewards_see_it():
    cls = trl_env(CounterEnv, parser="increments", reward_fns=[reward_func])
    assert [s["function"]["name"] for s in cls.tool_schemas] == ["increment"]
    env = cls(prompt="count to 5", target=5)
    assert env.reset() == "count to 5"  # reset returned None: the row's prompt
    assert env.step("1 and 3") == [{"role": "tool", "name": "increment", "content": "1"},
                                   {"role": "tool", "name": "increment", "content": "4"}]
    assert env.step("done") is None
    assert env.counts == {"tool_calls": 2, "tool_errors": 0}
    assert env.reward() == -1.0  # |4 - 5| through reward_func(environments=[instance])
    scored = trl_env(SelfScored, parser="increments", reward_fns=[reward_func])(
        prompt="p", target=2)  # fmt: skip
    scored.reset()
    scored.step("2")
    scored.step("ok")
    assert scored.reward() == 0.0 + 1.0  # reward_func's 0 plus get_reward's 1


def test_reset_string_is_appended_to_the_prompt_as_trl_does():
    class Instructs(CounterEnv):
        def reset(self, **kwargs):
            super().reset(**kwargs)
            return " Use the tool."

    cls = trl_env(Instructs, parser="increments", reward_fns=[reward_func])
    assert cls(prompt="Count to 3.", target=3).reset() == "Count to 3. Use the tool."
    chat = [{"role": "user", "content": "Count to 3."}]
    assert cls(prompt=chat, target=3).reset() == \
        [{"role": "user", "content": "Count to 3. Use the tool."}]  # fmt: skip


def test_a_trl_shaped_class_without_a_reward_is_refused():
    with pytest.raises(ValueError, match="--reward module:function .* or by its get_reward"):
        trl_env(CounterEnv, parser="hermes")


@pytest.mark.parametrize("flags", [
    ["--env", "test_train_tools:CounterEnv", "--reward", "test_train_tools:reward_func"],
    ["--env", "test_train_tools:OwnsItsReward"],
])  # fmt: skip
def test_a_trl_shaped_class_trains_through_env_and_reward(tmp_path, flags):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"count to {t}", "target": t}) + "\n"
                               for t in range(2, 10)))  # fmt: skip
    run = tmp_path / "run"
    args = [a for a in TOOLS if a not in ("--tools", "test_train_tools:double", "--task",
                                          "digitsum", "--tool-parser", "digits")]
    assert main([*args, "--prompts", str(prompts), *flags, "--tool-parser", "increments",
                 "--steps", "2", "--run-dir", str(run)]) == 0  # fmt: skip
    got = samples(run)
    assert got and all("tool_errors" in c for c in got)
    for c in got:  # reward_func's or get_reward's: minus the distance of the counter
        steps = [int(d) for t in c["turns"] if t["role"] == "assistant"
                 for d in re.findall(r"\d", t["content"])][: c["tool_calls"]]
        target = int(re.search(r"count to (\d)", c["turns"][0]["content"])[1])
        assert c["reward"] == -abs(sum(steps) - target), c


def test_reward_with_a_contract_environment_is_refused_at_start(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"count to {t}", "target": t}) + "\n"
                               for t in range(4)))  # fmt: skip
    assert main([*TINY, "--prompts", str(prompts), "--env", "test_train_envs:Digits",
                 "--reward", "test_train_tools:reward_func", "--steps", "1",
                 "--run-dir", str(tmp_path / "r")]) == 2  # fmt: skip
    assert "drop --reward" in capsys.readouterr().err


def test_eval_with_tools_reports_calls_and_errors(tmp_path, capsys):
    from gspo.train.evaluate import main as eval_main

    out = tmp_path / "c.jsonl"
    assert eval_main(["--model", "tiny", "--tiny-hidden", "32", "--tiny-layers", "1", "--task",
                      "digitsum", "--tools", "test_train_tools:double", "--tool-parser",
                      "digits", "--chat-template", TINY_TEMPLATE, "--rollout", "hf", "-n", "0",
                      "--questions", "8", "--max-new-tokens", "6", "--no-progress",
                      "--out", str(out)]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["tool_calls"] == sum(r["greedy_tool_calls"] for r in records) / 8
    assert summary["tool_errors"] == sum(r["greedy_tool_errors"] for r in records) / 8
    for r in records:
        replies = [t["content"] for t in r["greedy_turns"] if t["role"] == "assistant"]
        assert r["greedy_tool_calls"] == sum(expected_counts(x)[0] for x in replies)


# ---------------------------------------------------------------- warm start on tool episodes


def test_warm_start_validates_runs_of_tool_messages(tmp_path):
    from gspo.train import warmstart

    u, a, t = ({"role": r, "content": "x"} for r in ("user", "assistant", "tool"))
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text(json.dumps({"messages": [u, a, t, t, a]}) + "\n")
    assert len(warmstart.load(str(good))) == 1
    for messages in ([u, t, a], [u, a, t, u, a], [t, a], [u, a, t]):
        bad.write_text(json.dumps({"messages": messages}) + "\n")
        with pytest.raises(ValueError, match="line 1: an episode is"):
            warmstart.load(str(bad))


def test_a_worked_tool_episode_encodes_as_the_template_renders_it():
    """The warm start's ids of a worked calculator episode are the chat template's own
    rendering of the conversation (tools included), and only the assistant's tokens are
    targets: an independent check of the turn-by-turn rendering with tool messages."""
    from gspo.train import warmstart
    from gspo.train.models import load, use_chat_template
    from gspo.train.tasks.wordproblems import wordproblem_prompts
    from gspo.train.tools.builtin import worked_episode
    from gspo.train.tools.schema import load_tools, tool_schema

    model, tokenizer = load("smollm2")
    use_chat_template(tokenizer, TEMPLATE)
    tools = [tool_schema(fn) for fn in load_tools("calculator").values()]
    eos = episodes.eos_ids(model, tokenizer)
    turns = episodes.Turns(tokenizer, None, eos, tools=tools)
    end = warmstart.end_of_turn_id(turns, eos)
    messages = worked_episode(wordproblem_prompts(1, 5)[0])["messages"]
    messages = [*messages[:2], messages[2], {"role": "tool", "content": "again"}, messages[3]]
    ids, mask = warmstart.encode(messages, turns, end)
    whole = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    assert tokenizer.decode(ids) == whole.removesuffix("\n")
    targets = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert targets == f"{messages[1]['content']}<|im_end|>{messages[4]['content']}<|im_end|>"


def test_wordproblems_demos_file_is_what_its_script_writes():
    import sys

    from gspo.train import warmstart

    sys.path.insert(0, str(REPO / "examples"))
    try:
        import wordproblems_demos
    finally:
        sys.path.remove(str(REPO / "examples"))
    path = REPO / "examples" / "wordproblems-demos.jsonl"
    assert path.read_text().splitlines() == wordproblems_demos.lines()
    assert len(warmstart.load(str(path))) == 96


def test_prompt_lengths_count_the_tools_the_template_renders():
    """--max-prompt-tokens and the engines' sizes see the prompt the model sees: with the
    tools' schemas (a count without them is short by the schema's tokens)."""
    from gspo.train import data
    from gspo.train.config import TrainConfig
    from gspo.train.models import load, use_chat_template
    from gspo.train.tasks import get

    config = TrainConfig(model="tiny", task="digitsum", tools="test_train_tools:double",
                         tool_parser="digits", chat_template=TINY_TEMPLATE)  # fmt: skip
    model, tokenizer = load("tiny")
    use_chat_template(tokenizer, TINY_TEMPLATE)
    prompts = get("digitsum").prompts(4, 0)
    _, _, longest = data.fit([prompts], tokenizer, model, config)
    rendered = [tokenizer.apply_chat_template([{"role": "user", "content": p["prompt"]}],
                                              tools=[{"function": {"name": "double"}}],
                                              tokenize=False, add_generation_prompt=True)
                for p in prompts]  # fmt: skip
    assert rendered[0].startswith("tools: doubleuser: ")
    assert longest == max(len(tokenizer(t)["input_ids"]) for t in rendered)


def test_a_tools_run_sizes_the_engine_for_later_turns():
    """vLLM's max_model_len was the longest prompt plus one reply under --tools (only --env
    was multi-turn there), so every episode was cut after its first call: the word-problem
    recipe's held-out reward read 0.0 on vLLM where hf gave 0.17 accuracy."""
    from gspo.train.config import TrainConfig
    from gspo.train.data import engine_prompt_tokens

    assert engine_prompt_tokens(TrainConfig(task="wordproblems", tools="calculator"), 300) is None
    assert engine_prompt_tokens(TrainConfig(task="wordproblems"), 300) == 300
