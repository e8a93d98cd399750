"""bench/gpu.py --tiny runs from the source tree on CPU (what CI runs): four cases and the
HF rollout, a table and one JSON line whose figures are positive and consistent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_tiny_runs_and_reports():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # it finds src/ itself
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--tiny"],
                         capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    found = json.loads(lines[-1])
    assert found["bench"] == "gpu" and found["tokens"] == 2 * 4 * (16 + 24)
    assert [r["case"] for r in found["cases"]] == ["today", "shared prefix", "fused loss",
                                                   "both (default)"]  # fmt: skip
    for row in found["cases"]:
        assert row["seconds"] > 0 and row["peak_mib"] > 0
        # tokens/s and MFU are the same time read two ways
        assert abs(row["tokens_per_s"] * row["seconds"] - found["tokens"]) < 1e-6 * found["tokens"]
        flop = found["model_tflop"] * 1e12
        assert abs(row["mfu"] - flop / row["seconds"] / (found["peak_tflops"] * 1e12)) < 1e-9
    assert found["generate"]["tokens_per_s"] > 0
    assert any(line.startswith("both (default)") for line in lines)
