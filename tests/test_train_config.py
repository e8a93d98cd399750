"""gspo.config: flags generated from the dataclass, config files, precedence, and errors
that name the field, the value and the fix."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Literal

import pytest

from gspo.config import TrainConfig, add_arguments, from_args, load_file, option
from gspo.train.cli import build_parser, main, parse_config


def test_every_field_has_a_flag_with_its_help():
    help_text = build_parser().format_help()
    for f in dataclasses.fields(TrainConfig):
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
