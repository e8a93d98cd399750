"""`gspo train --env openenv:URL --rollout vllm`: episodes on OpenEnv's own server
(tests/openenv_guess.py on 127.0.0.1), sampled by vLLM one call per turn, train with the
sampler's log-probs as the old policy, which match the trainer's to float rounding."""

from __future__ import annotations

import pytest

from gspo.train.cli import main
from test_openenv import Server, _prompts, _rewarded_by_the_game
from test_train_e2e import rows
from test_train_vllm import TINY


def test_an_openenv_server_trains_on_vllm(tmp_path):
    pytest.importorskip("vllm")
    pytest.importorskip("openenv.core")
    server = Server(tmp_path / "server.log")
    run = tmp_path / "run"
    try:
        assert main([*TINY, "--steps", "2", "--prompts", _prompts(tmp_path), "--env",
                     f"openenv:{server.url}/guess", "--max-turns", "2", "--max-new-tokens",
                     "3", "--old-logprobs", "sampler", "--samples-per-step", "4",
                     "--run-dir", str(run)]) == 0  # fmt: skip
    finally:
        server.kill()
    assert len(_rewarded_by_the_game(run)) == 2 * 4 * 4  # steps x groups written x G
    for r in rows(run)[1:]:
        assert 1 <= r["turns_per_episode"] <= 2, r
        assert r["mismatch_max_abs"] < 1e-4 and r["mismatch_k3"] < 1e-8, r
