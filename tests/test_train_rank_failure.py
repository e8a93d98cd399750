"""One torchrun rank fails mid-run: the others stop at once with its message (one line, exit
3), and the last checkpoint resumes.

The failure is injected by a test-only reward module (``--reward failing:reward``): importing
it wraps the loop's ``update`` so that rank FAIL_RANK raises torch.OutOfMemoryError at its
FAIL_STEP-th update (what a GPU out of memory on one rank looks like), and the other rank
stays BUSY_S seconds in the same step's local work before its next collective. Before this
was handled, the other rank printed gloo's "Connection closed by peer" traceback and was
killed by torchrun (exit -15); a busy rank swallowed torchrun's SIGTERM (the loop's
checkpoint-and-stop handler), worked on, and was killed by SIGKILL 30 s later, silently.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from test_train_distributed import TINY, free_port

REPO = Path(__file__).resolve().parents[1]

FAILING = """
import os
import time

import torch

from gspo.train import loop
from gspo.train.tasks import get

_calls = [0]
_update = loop.update


def update(*args, **kwargs):
    _calls[0] += 1
    if _calls[0] == int(os.environ.get("FAIL_STEP", "0")):
        if os.environ["RANK"] == os.environ["FAIL_RANK"]:
            raise torch.OutOfMemoryError("CUDA out of memory (injected on this rank)")
        time.sleep(float(os.environ.get("BUSY_S", "0")))
    return _update(*args, **kwargs)


loop.update = update


def reward(prompts, completions, **fields):
    return get("digitsum").reward(prompts, completions, **fields)
"""

MESSAGE = "gspo train: error: rank 1 failed: OutOfMemoryError: CUDA out of memory (injected"


def torchrun(tmp_path: Path, args: list[str], **failure: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", **failure}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(free_port()), "-m", "gspo", "train", *TINY,
           "--reward", "failing:reward", "--prompts", "prompts.jsonl", *args]  # fmt: skip
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def setup(tmp_path: Path) -> None:
    from gspo.train.tasks import get

    (tmp_path / "failing.py").write_text(FAILING)
    rows = get("digitsum").prompts(200, 0, ())
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(dict(r)) + "\n" for r in rows))


def exit_code(stderr: str, rank: int) -> int:
    """Rank ``rank``'s exit code from torchrun's failure summary."""
    found = re.search(rf"rank\s*: {rank} \(local_rank: {rank}\)\s*exitcode\s*: (-?\d+)", stderr)
    assert found, stderr[-3000:]
    return int(found.group(1))


def assert_stopped_with_the_message(done: subprocess.CompletedProcess, run_dir: Path) -> None:
    assert done.returncode != 0
    lines = [x for x in done.stderr.splitlines() if x.startswith("gspo train: error:")]
    assert len(lines) == 1, done.stderr[-3000:]  # one line, from rank 0 only
    assert lines[0].startswith(MESSAGE), lines
    assert "the last checkpoint (step-000002) is intact" in lines[0], lines
    assert f"--resume {run_dir}" in lines[0], lines
    assert "Connection closed by peer" not in done.stderr  # no traceback of the collective
    assert exit_code(done.stderr, 0) == 3  # the survivor, on its own
    assert exit_code(done.stderr, 1) == 1  # the failing rank: its own traceback


def test_a_rank_failing_mid_run_stops_the_others_and_the_run_resumes(tmp_path):
    """Rank 1 fails at step 3's update while rank 0 waits for it in the update's first
    collective: rank 0 stops with rank 1's message; --resume continues from step 2 to the
    end, every step's metrics once."""
    setup(tmp_path)
    run_dir = tmp_path / "run"
    args = ["--steps", "5", "--checkpoint-every", "2", "--run-dir", str(run_dir)]
    done = torchrun(tmp_path, args, FAIL_RANK="1", FAIL_STEP="3")
    assert_stopped_with_the_message(done, run_dir)
    again = torchrun(tmp_path, ["--resume", str(run_dir)])
    assert again.returncode == 0, again.stderr[-3000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5]


def test_a_busy_rank_stops_at_torchruns_signal_when_another_failed(tmp_path):
    """Rank 0 is 10 minutes into local work when rank 1 fails: torchrun's SIGTERM, which
    the loop otherwise answers by finishing the step and checkpointing, finds rank 1's
    notice in the job's store and stops rank 0 at once, with the message and exit 3."""
    setup(tmp_path)
    run_dir = tmp_path / "run"
    args = ["--steps", "5", "--checkpoint-every", "2", "--run-dir", str(run_dir)]
    done = torchrun(tmp_path, args, FAIL_RANK="1", FAIL_STEP="3", BUSY_S="600")
    assert_stopped_with_the_message(done, run_dir)
    assert (run_dir / "checkpoints" / "step-000002" / "trainer.pt").exists()
