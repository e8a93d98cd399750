"""`gspo objective`: JSON in, the objective out; bad input -> one line on stderr, exit 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gspo.cli import main
from gspo.reference import sequence_objective

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXPECTED = {
    "spec_example_1.json": -0.7591409142295236,
    "spec_example_2.json": 0.0,
    "spec_example_3.json": -0.0022368898100859624,
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_examples(name, capsys):
    assert main(["objective", str(EXAMPLES / name)]) == 0
    assert float(capsys.readouterr().out) == pytest.approx(EXPECTED[name], abs=1e-12)


def test_stdin_and_explain(monkeypatch, capsys):
    payload = (EXAMPLES / "spec_example_3.json").read_text()
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO(payload))
    assert main(["objective", "--explain", "-"]) == 0
    out = capsys.readouterr().out
    assert "clip(rho_i)" in out and "L = mean_i L_i = -0.00223688981008" in out
    assert len([line for line in out.splitlines() if line.strip()[:1].isdigit()]) == 3


@pytest.mark.parametrize(
    "text, match",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"log_probs_new": [[1.0]], "log_probs_old": [[1.0]], "rewards": [1.0]}', "missing"),
        (
            '{"log_probs_new": [[NaN]], "log_probs_old": [[1.0]], "rewards": [1.0], "epsilon": 0.2}',
            "NaN",
        ),
        (
            '{"log_probs_new": [[1.0]], "log_probs_old": [[1.0]], "rewards": [1.0], "epsilon": 0}',
            "epsilon must be > 0",
        ),
        (
            '{"log_probs_new": [[1.0]], "log_probs_old": [[1.0, 2.0]], "rewards": [1.0], '
            '"epsilon": 0.2}',
            "sequence 0",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, text, match):
    path = tmp_path / "in.json"
    path.write_text(text)
    assert main(["objective", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and match in err


def test_missing_file_exits_2(capsys):
    assert main(["objective", "/nonexistent/x.json"]) == 2
    assert "error" in capsys.readouterr().err


def test_console_script_round_trip(tmp_path):
    payload = {"log_probs_new": [[-1.0, -2.0], [-0.5]], "log_probs_old": [[-1.1, -2.1], [-0.4]],
               "rewards": [1.0, 0.0], "epsilon": 0.2}  # fmt: skip
    path = tmp_path / "in.json"
    path.write_text(json.dumps(payload))
    out = subprocess.run(
        [sys.executable, "-m", "gspo", "objective", str(path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert float(out.stdout) == sequence_objective(**payload)


def test_unknown_command(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_readme_shows_what_the_cli_prints(capsys):
    # docs/objective.md quotes `gspo objective --explain examples/spec_example_3.json`
    # verbatim, and README names that command.
    assert main(["objective", "--explain", str(EXAMPLES / "spec_example_3.json")]) == 0
    page = (EXAMPLES.parent / "docs" / "objective.md").read_text()
    assert capsys.readouterr().out.strip() in page
    readme = (EXAMPLES.parent / "README.md").read_text()
    assert "gspo objective --explain examples/spec_example_3.json" in readme


def test_the_spec_is_in_the_repo_and_everything_points_there(capsys):
    """README linked ../shared/SPEC.md and `gspo objective --help` cited ../SPEC.md; neither
    exists in a clone."""
    import re

    repo = EXAMPLES.parent
    assert (repo / "docs" / "spec.md").read_text().startswith("#")
    with pytest.raises(SystemExit):
        main(["objective", "--help"])
    assert "docs/spec.md" in capsys.readouterr().out
    readme = (repo / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#\s]+)\)", readme):
        if not target.startswith("http"):
            assert (repo / target).exists(), target
    # commands README gives must run from a fresh clone (no bare `python bench/...`)
    assert not re.search(r"(?<![/\w])python bench/", readme)


def test_huge_log_ratio_prints_a_number_not_inf(tmp_path, capsys):
    # A log-ratio of 1000 once printed -inf with exit 0; now the shared clamp applies
    # and --explain says so. epsilon 1.5 is refused, as gspo_loss refuses it.
    payload = {"log_probs_new": [[1000.0], [0.0]], "log_probs_old": [[0.0], [0.0]],
               "rewards": [0.0, 1.0], "epsilon": 0.2}  # fmt: skip
    path = tmp_path / "in.json"
    path.write_text(json.dumps(payload))
    assert main(["objective", str(path)]) == 0
    value = float(capsys.readouterr().out)
    assert value == pytest.approx((1.0 - 4.851651954097903e8) / 2)
    assert main(["objective", "--explain", str(path)]) == 0
    assert "clamped to +20" in capsys.readouterr().out
    path.write_text(json.dumps(payload | {"epsilon": 1.5}))
    assert main(["objective", str(path)]) == 2
    assert "epsilon must be < 1" in capsys.readouterr().err


# docs/spec.md's SAPO / CISPO / GMPO example (one input for the three sections)
TOKEN_EXAMPLE = {"log_probs_new": [[-0.5, -1.0], [-0.7, -0.2]],
                 "log_probs_old": [[-1.0, -1.0], [-0.2, -0.4]], "rewards": [1.0, 0.0]}  # fmt: skip


@pytest.mark.parametrize(
    "loss, params, expected",
    [("sapo", {}, 0.24623018673537467), ("cispo", {"eps_high": 0.2}, -0.23385713455028917),
     ("cispo", {"eps_high": 0.2, "eps_low": 0.2}, -0.2), ("gmpo", {}, 0.15828267006210517),
     ("gspo", {"epsilon": 0.2}, 0.16964601178747102)],
)  # fmt: skip
def test_loss_flag_prints_the_spec_examples(tmp_path, capsys, loss, params, expected):
    path = tmp_path / "in.json"
    path.write_text(json.dumps(TOKEN_EXAMPLE | params))
    assert main(["objective", "--loss", loss, str(path)]) == 0
    assert float(capsys.readouterr().out) == pytest.approx(expected, abs=1e-15)


def test_loss_flag_explain(tmp_path, capsys):
    path = tmp_path / "in.json"
    path.write_text(json.dumps(TOKEN_EXAMPLE))
    assert main(["objective", "--loss", "sapo", "--explain", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "g(r_t)" in out[0] and "4s(1-s)" in out[0]
    assert len([line for line in out if line.strip()[:1].isdigit()]) == 4  # one row per token
    assert out[-1] == "L = mean_i L_i = 0.24623018673537467"


@pytest.mark.parametrize(
    "loss, extra, match",
    [
        ("sapo", {"epsilon": 0.2}, "key 'epsilon' does not apply to --loss sapo (it takes the "
                                   "optional tau_pos, tau_neg); remove it, or pass --loss gspo"),
        ("gspo", {"epsilon": 0.2, "tau_pos": 1.0}, "pass --loss sapo"),
        ("cispo", {"tau_neg": 1.0}, "key 'tau_neg' does not apply to --loss cispo"),
        ("gspo", {"eps_high": 0.2, "epsilon": 0.2}, "pass --loss cispo or gmpo"),
        ("sapo", {"tau_pos": 0}, "tau_pos must be > 0"),
        ("cispo", {"eps_low": 1.5}, "eps_low must be < 1"),
        ("gmpo", {"eps_high": -0.1}, "eps_high must be > 0"),
        ("gmpo", {"temperature": 1.0}, "unexpected ['temperature']"),
    ],
)  # fmt: skip
def test_loss_flag_refuses_keys_that_do_not_apply(tmp_path, capsys, loss, extra, match):
    path = tmp_path / "in.json"
    path.write_text(json.dumps(TOKEN_EXAMPLE | extra))
    assert main(["objective", "--loss", loss, str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and match in err


def test_loss_flag_console_script(tmp_path):
    path = tmp_path / "in.json"
    path.write_text(json.dumps(TOKEN_EXAMPLE))
    out = subprocess.run([sys.executable, "-m", "gspo", "objective", "--loss", "gmpo", str(path)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert float(out.stdout) == 0.15828267006210517
