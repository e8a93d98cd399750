"""`gspo train --compare`: any list of losses (with options of their own) and seeds, every
run where it says, one plot with every loss, and clear errors (exit 2) for bad lists."""

from __future__ import annotations

import json

import pytest

from gspo.objectives import names
from gspo.train.cli import main
from gspo.train.compare import DEFAULT, parse_variants, summary_lines

TINY = ["--tiny-hidden", "32", "--tiny-layers", "1", "--prompts-per-step", "4",
        "--group-size", "4", "--minibatches", "2", "--max-new-tokens", "4",
        "--eval-prompts", "4", "--eval-every", "2", "--no-progress", "--no-plot",
        "--checkpoint-every", "10"]  # fmt: skip


def test_parse_losses_and_their_options():
    got = parse_variants(["gspo", "grpo:eps_low=0.2,eps-high=0.25,adv_norm=loo"])
    assert [v.changes for v in got] == [
        {"loss": "gspo"},
        {"loss": "grpo", "eps_low": 0.2, "eps_high": 0.25, "adv_norm": "loo"},
    ]
    assert got[1].dirname == "grpo-eps_low0.2-eps-high0.25-adv_normloo"
    assert [v.label for v in parse_variants([])] == list(DEFAULT)
    assert {v.changes["loss"] for v in parse_variants(list(names()))} == set(names())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--compare", "ppo"], "unknown loss 'ppo'; use one of"),
        (["--compare", "grpo:eps=0.2"], "'eps=0.2' is not option=value"),
        (["--compare", "grpo:eps_low=high"], "eps_low='high' is not a float"),
        (["--compare", "grpo:eps_low=-1"], "--eps-low / eps_low = -1.0 is invalid"),
        (["--compare", "gspo", "gspo"], "listed twice"),
        (["--compare-seeds", "1", "2"], "add --compare"),
        (["--compare", "gspo", "--compare-seeds", "1", "1"], "a seed is listed twice"),
    ],
)
def test_bad_compare_lists_exit_2_naming_the_fix(tmp_path, capsys, argv, message):
    assert main([*TINY, "--steps", "1", "--run-dir", str(tmp_path / "c"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "c").exists()  # refused before any run started


def test_compare_runs_every_loss_and_seed_into_one_plot(tmp_path, capsys):
    base = tmp_path / "cmp"
    argv = [*TINY, "--steps", "2", "--run-dir", str(base), "--compare", "gspo",
            "grpo:eps_low=0.2,eps_high=0.2", "--compare-seeds", "0", "1"]  # fmt: skip
    assert main(argv) == 0
    for name in ("gspo", "grpo-eps_low0.2-eps_high0.2"):
        for seed in (0, 1):
            run = base / name / f"seed{seed}"
            config = json.loads((run / "config.json").read_text())
            assert config["seed"] == seed and config["loss"] == name[:4]
            assert (run / "model").is_dir()
    assert json.loads((base / "gspo" / "seed0" / "config.json").read_text())["eps_low"] is None
    grpo = json.loads((base / "grpo-eps_low0.2-eps_high0.2" / "seed1" / "config.json").read_text())
    assert (grpo["eps_low"], grpo["eps_high"]) == (0.2, 0.2)
    results = json.loads((base / "compare.json").read_text())
    assert [r["seed"] for r in results["gspo"]] == [0, 1]
    assert [s for s, _ in results["gspo"][0]["eval"]] == [0, 2]
    assert (base / "compare.png").stat().st_size > 5000
    out = capsys.readouterr().out
    assert "over seeds 0, 1" in out and "grpo:eps_low=0.2,eps_high=0.2" in out


def test_summary_lines_give_mean_and_range_over_seeds():
    results = {
        "gspo": [{"seed": 0, "eval": [(0, 0.0), (5, 0.6), (10, 0.5)], "seconds": 10},
                 {"seed": 1, "eval": [(0, 0.1), (5, 0.2), (10, 0.4)], "seconds": 12}],
    }  # fmt: skip
    line = summary_lines(results)[1]
    # first (0.0, 0.1) -> 0.05; best (0.6, 0.4) -> 0.5; last (0.5, 0.4) -> 0.45
    assert "first 0.050 [0.000, 0.100]" in line
    assert "best 0.500 [0.400, 0.600]" in line
    assert "last 0.450 [0.400, 0.500]" in line and "11 s/run" in line


def test_an_objective_s_own_options_go_into_its_loss_spec():
    """--compare "vespo:k_neg=2": k_neg is VESPO's (gspo train --loss vespo:k_neg=2), eps_low
    LossConfig's; an option of neither is refused naming both kinds."""
    (vespo, grpo) = parse_variants(["vespo:k_neg=2", "grpo:eps_low=0.2,seq_mask_delta=0.01"])
    assert vespo.changes == {"loss": "vespo:k_neg=2"}
    assert grpo.changes == {"loss": "grpo:seq_mask_delta=0.01", "eps_low": 0.2}
    with pytest.raises(ValueError, match="k_pos=x.*not a number"):
        parse_variants(["vespo:k_pos=x"])
    with pytest.raises(ValueError, match="'delta_high=1' is not option=value"):
        parse_variants(["gspo:delta_high=1"])
