"""`gspo train --rollout vllm` end to end at tiny sizes: a resumed run (engine rebuilt from the
checkpoint's weights) equals a straight one, SIGTERM checkpoints and resumes, a failing
reward stops with a checkpoint, and the mismatch metrics are logged every step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from gspo.train.checkpoint import list_checkpoints
from gspo.train.cli import main, parse_config
from gspo.train.loop import train
from test_train_e2e import rows, weights

# tiny-hidden 128: vLLM's CPU attention needs a head size of 32 or more (4 heads).
TINY = ["--rollout", "vllm", "--vllm-memory", "0.05", "--tiny-hidden", "128",
        "--tiny-layers", "1", "--prompts-per-step", "4", "--group-size", "4",
        "--minibatches", "2", "--max-new-tokens", "4", "--eval-prompts", "4",
        "--eval-every", "2", "--no-progress", "--no-plot"]  # fmt: skip
REPO = Path(__file__).resolve().parents[1]
MISMATCH = ("mismatch_k3", "mismatch_max_abs", "mismatch_seq_ratio_min", "mismatch_seq_ratio_max")


def test_resume_equals_straight_run_and_mismatch_is_logged(tmp_path):
    common = [*TINY, "--steps", "4", "--checkpoint-every", "10", "--seed", "3"]
    straight = tmp_path / "straight"
    train(parse_config([*common, "--run-dir", str(straight)])[0])
    stopped = tmp_path / "stopped"
    summary = train(parse_config([*common, "--run-dir", str(stopped)])[0], stop_after=2)
    assert summary["step"] == 2 and not summary["finished"]
    assert main(["--resume", str(stopped)]) == 0
    a, b = weights(straight), weights(stopped)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
    ra, rb = rows(straight), rows(stopped)
    for x, y in zip(ra, rb, strict=True):  # the same samples step by step
        assert x.get("reward_mean") == y.get("reward_mean")
        assert x.get("eval_reward") == y.get("eval_reward")
    for r in ra[1:]:
        # the engine samples the policy the trainer scores: float32 rounding apart
        assert r["mismatch_max_abs"] < 1e-4 and r["mismatch_k3"] < 1e-8, r
        assert 0.9999 < r["mismatch_seq_ratio_min"] <= r["mismatch_seq_ratio_max"] < 1.0001


def test_sigterm_checkpoints_and_resumes(tmp_path):
    common = [*TINY, "--steps", "40", "--eval-every", "100", "--checkpoint-every", "100"]
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "gspo", "train", *common, "--run-dir",
                             str(killed)], env=env, stderr=subprocess.PIPE, text=True)  # fmt: skip
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(rows(killed)) >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    saved = list_checkpoints(killed)
    assert len(saved) == 1 and 1 <= int(saved[0].name.split("-")[1]) < 40
    assert main(["--resume", str(killed), "--steps", str(int(saved[0].name[-6:]) + 1)]) == 0


def test_reward_error_stops_with_a_checkpoint(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"sum {t:02d}:", "target": t}) + "\n"
                            for t in range(1, 9)))  # fmt: skip
    (tmp_path / "bad_reward.py").write_text(
        "def score(prompts, completions, target):\n    raise RuntimeError('broken')\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        code = main([*TINY, "--steps", "2", "--prompts", str(path), "--reward",
                     "bad_reward:score", "--run-dir", str(tmp_path / "run")])  # fmt: skip
    finally:
        sys.path.remove(str(tmp_path))
    assert code == 3
    assert "raised RuntimeError" in capsys.readouterr().err
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-000000"]
