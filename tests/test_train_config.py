"""gspo.config: flags generated from the dataclass, config files, precedence, and errors
that name the field, the value and the fix."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Literal

import pytest

from gspo.config import add_arguments, from_args, load_file, option
from gspo.train.cli import build_parser, main, parse_config
from gspo.train.config import TrainConfig


def test_every_field_has_a_flag_with_its_help():
    help_text = build_parser().format_help()
    fields = [f for concern in dataclasses.fields(TrainConfig) for f in dataclasses.fields(
        concern.default_factory())]  # every concern's fields: the flat options
    for f in fields:
        flag = "--" + f.name.replace("_", "-")
        assert flag in help_text, flag
        assert f.metadata["help"].split()[0] in help_text  # the help is the field's own


def test_defaults_when_no_flags():
    config, _ = parse_config([])
    assert config == TrainConfig()


def test_flags_parse_to_typed_values():
    config, _ = parse_config(
        ["--lr", "0.01", "--group-size", "4", "--loss", "grpo", "--no-progress", "--run-dir", "x"]
    )
    assert config.lr == 0.01 and isinstance(config.lr, float)
    assert config.group_size == 4 and isinstance(config.group_size, int)
    assert config.loss == "grpo" and config.progress is False and config.run_dir == "x"


def test_optional_fields_accept_none():
    config, _ = parse_config(["--run-dir", "none"])
    assert config.run_dir is None


def test_file_then_flags_precedence(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"lr": 0.005, "group-size": 4, "steps": 7}))
    config, _ = parse_config(["--config", str(path), "--steps", "9"])
    # lr and group_size come from the file, steps from the flag (flags win), rest defaults
    assert (config.lr, config.group_size, config.steps) == (0.005, 4, 9)
    assert config.max_new_tokens == TrainConfig().max_new_tokens


def test_toml_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('lr = 0.004\nloss = "gspo-token"\nkl_coef = 0.1\n')
    config, _ = parse_config(["--config", str(path)])
    assert (config.lr, config.loss, config.kl_coef) == (0.004, "gspo-token", 0.1)


def test_file_int_is_accepted_for_float_but_not_the_reverse(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"lr": 1}))
    assert parse_config(["--config", str(path)])[0].lr == 1.0
    path.write_text(json.dumps({"steps": 2.5}))
    with pytest.raises(ValueError, match=r"'steps' = 2\.5 .*must be an int"):
        parse_config(["--config", str(path)])


def test_file_unknown_field_lists_valid_ones(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"learning_rate": 0.1}))
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['learning_rate'\].*'lr'"):
        parse_config(["--config", str(path)])


def test_file_bad_choice(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"loss": "ppo"}))
    with pytest.raises(ValueError, match=r"'loss' = 'ppo' must be one of"):
        parse_config(["--config", str(path)])


def test_bad_file_syntax_names_the_file(tmp_path):
    path = tmp_path / "a.toml"
    path.write_text("lr = = 3")
    with pytest.raises(ValueError, match=r"a.toml.*not valid TOML"):
        load_file(path)


@pytest.mark.parametrize(
    "kwargs, field, fix",
    [
        ({"group_size": 1}, "group_size", "at least 2"),
        ({"steps": 0}, "steps", "positive integer"),
        ({"minibatches": 3}, "minibatches", "must divide"),
        ({"eps_low": 0.0}, "eps_low", "> 0"),
        ({"top_p": 1.5}, "top_p", r"\(0, 1\]"),
        ({"reward": "mod:fn"}, "reward", "--prompts"),
        ({"prompts": "p.jsonl", "reward": "modfn"}, "reward", "module:function"),
        ({"max_tokens_per_microbatch": -1}, "max_tokens_per_microbatch", ">= 0"),
        ({"dtype": "fp16"}, "dtype", r"one of \['fp32', 'bf16'\]"),
        ({"prompts": "p.jsonl"}, "prompts", "add --reward module:function"),
        (
            {"prompts": "p", "reward": ("a:f", "b:g"), "reward_weights": (1.0,)},
            "reward_weights",
            r"one weight per --reward \(2\)",
        ),
        ({"max_prompt_tokens": 0}, "max_prompt_tokens", "positive integer"),
    ],
)
def test_validation_names_field_value_and_fix(kwargs, field, fix):
    with pytest.raises(ValueError, match=rf"--{field.replace('_', '-')} / {field} = .*{fix}"):
        TrainConfig(**kwargs)


def test_config_is_frozen_and_keyword_only():
    config = TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        TrainConfig("tiny")  # type: ignore[misc]


def test_bad_flag_value_exits_2_with_the_flag_named(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--steps", "many"])
    assert exc.value.code == 2
    assert "--steps 'many' is not an int" in capsys.readouterr().err


def test_invalid_combination_exits_2(capsys):
    assert main(["--group-size", "1"]) == 2
    assert "group_size = 1" in capsys.readouterr().err


def test_generic_helper_on_another_dataclass():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Opts:
        size: int = option(3, "a size")
        mode: Literal["a", "b"] = option("a", "a mode")
        name: str | None = option(None, "a name")

    parser = argparse.ArgumentParser()
    add_arguments(parser, Opts)
    opts = from_args(Opts, parser.parse_args(["--mode", "b"]), file_values={"size": 5})
    assert opts == Opts(size=5, mode="b", name=None)
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "c"])


def test_prompts_without_reward_exits_2_at_start(tmp_path, capsys):
    """The bug: the built-in digit-sum reward silently scored the user's prompts and the run
    died at the first evaluation with exit 3."""
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    assert main(["--prompts", str(path), "--run-dir", str(tmp_path / "run")]) == 2
    assert "--prompts / prompts" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_list_fields_from_flags_file_and_python(tmp_path):
    flags = ["--prompts", "p.jsonl", "--reward", "a:f", "--reward", "b:g", "--reward-weights",
             "1", "0.2"]  # fmt: skip
    config, _ = parse_config(flags)
    assert config.reward == ("a:f", "b:g") and config.reward_weights == (1.0, 0.2)
    assert parse_config([*flags[:4], "b:g", *flags[6:]])[0] == config  # one flag, two values
    toml = tmp_path / "run.toml"
    toml.write_text('prompts = "p.jsonl"\nreward = ["a:f", "b:g"]\nreward_weights = [1, 0.2]\n')
    assert parse_config(["--config", str(toml)])[0] == config
    assert parse_config(["--config", str(toml), "--reward-weights", "3", "4"])[
        0
    ].reward_weights == (3.0, 4.0)  # a flag replaces the file's list
    # a config.json of an older run wrote one string (or null): a list of one (or none)
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"prompts": "p.jsonl", "reward": "a:f", "reward_weights": None}))
    assert parse_config(["--config", str(old)])[0].reward == ("a:f",)
    assert TrainConfig(prompts="p.jsonl", reward="a:f").reward == ("a:f",)  # Python API
    toml.write_text('prompts = "p"\nreward = ["a:f", 3]\n')
    with pytest.raises(ValueError, match=r"field 'reward' = 3 is an int; it must be a string"):
        parse_config(["--config", str(toml)])
    with pytest.raises(SystemExit):
        parse_config(["--reward-weights", "1", "x"])


def test_async_rollouts_refuse_dynamic_sampling_with_the_reason():
    with pytest.raises(ValueError, match="dynamic_sampling.*refill is unknown"):
        TrainConfig(async_rollouts=True, dynamic_sampling=True, rollout="vllm")
    TrainConfig(async_rollouts=True, env="calculator", rollout="vllm")  # accepted now
