"""scripts/default_run.py: the numbers docs/training.md quotes for the default run, from metrics.jsonl."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("default_run", REPO / "scripts/default_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_summary_of_a_hand_made_run():
    script = load_script()
    evals = {0: 0.0, 10: 0.5, 20: 0.9, 30: 0.7, 40: 0.95, 50: 0.93}
    rows = [{"step": s, "eval_reward": r} for s, r in evals.items()]
    rows += [{"step": s, "step_time": t} for s, t in ((1, 0.2), (2, 0.4), (3, 0.3))]
    out = script.summarise(rows)
    # second half = steps 30..50: running best 0.9 at 30 (drop 0.2), 0.95 at 50 (drop 0.02)
    assert out["drop"] == pytest.approx(0.2) and out["best"] == 0.95 and out["final"] == 0.93
    assert out["train_s"] == pytest.approx(0.9) and out["median_step_s"] == 0.3
    text = script.block({0: (out, 12.0)}, "1.0")
    assert text.startswith(script.BEGIN) and text.endswith(script.END)
    assert "| 0 | 0.930 | 0.950 | 0.200 |" in text


def test_the_docs_have_the_block_the_script_writes():
    script = load_script()
    readme = (REPO / "docs" / "training.md").read_text()
    start, end = readme.index(script.BEGIN), readme.index(script.END)
    assert "make default-run" in readme[start:end]  # filled in by the script, not by hand
