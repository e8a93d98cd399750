"""Failures before the work (issue 25): each mistake a user makes with the CLI's own files
or names is one line on stderr, naming the flag or path, and exit 2; no traceback."""

from __future__ import annotations

import json

import pytest

from gspo.cli import main

CASES = {
    "run-dir under a file": (["train", "--run-dir", "afile/run"], "afile/run"),
    "config missing": (["train", "--config", "no.toml"], "no.toml"),
    "prompts missing": (["train", "--prompts", "no.jsonl", "--reward", "m:f"], "no.jsonl"),
    "prompts a directory": (["train", "--prompts", ".", "--reward", "m:f"], "--prompts"),
    "resume missing": (["train", "--resume", "nodir"], "nodir"),
    "dataset missing": (["train", "--dataset", "no.parquet", "--reward", "m:f"], "no.parquet"),
    "model missing": (["train", "--model", "./nomodel"], "./nomodel"),
    "reward module missing": (["train", "--prompts", "p.jsonl", "--reward", "nomod:f"], "nomod"),
    "env module missing": (["train", "--env", "nomod:Env"], "nomod"),
    "warm-start file missing": (["train", "--warm-start", "no.jsonl"], "no.jsonl"),
    "eval --out under a file": (["eval", "--out", "afile/x.jsonl"], "afile/x.jsonl"),
    "eval --run missing": (["eval", "--run", "nodir"], "nodir"),
    "eval --prompts missing": (["eval", "--prompts", "no.jsonl", "--reward", "m:f"], "no.jsonl"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_path_or_name_is_one_line_and_exit_2(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    (tmp_path / "m.py").write_text("def f(prompts, completions, **kw):\n    return [0.0]\n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "x"}) + "\n")
    argv, named = CASES[case]
    assert main([*argv, "--no-progress"] if argv[0] == "train" else argv) == 2
    err = capsys.readouterr().err
    errors = [x for x in err.splitlines() if ": error: " in x]
    assert len(errors) == 1 and named in errors[0], err
    assert "Traceback" not in err
