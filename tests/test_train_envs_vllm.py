"""`gspo train --env --rollout vllm` at tiny sizes: multi-turn episodes sampled by vLLM (one
call per turn for all live episodes) train with the sampler's own log-probs as the old
policy, and the trainer's log-probs of the model's tokens match the sampler's to float
rounding on every step."""

from __future__ import annotations

import json

import pytest

from gspo.train.cli import main
from test_train_e2e import rows
from test_train_vllm import TINY


def test_multi_turn_vllm_old_logprobs_sampler_matches_the_trainer(tmp_path):
    pytest.importorskip("vllm")
    run = tmp_path / "run"
    assert main([*TINY, "--steps", "2", "--no-plot", "--env", "test_train_envs:Digits",
                 "--old-logprobs", "sampler", "--run-dir", str(run)]) == 0  # fmt: skip
    for r in rows(run)[1:]:
        assert r["turns_per_episode"] == 2 and r["tool_call_rate"] == 1.0, r
        # the sampler's log-probs of the model's tokens are the trainer's: rounding apart
        assert r["mismatch_max_abs"] < 1e-4 and r["mismatch_k3"] < 1e-8, r
        assert 0.9999 < r["mismatch_seq_ratio_min"] <= r["mismatch_seq_ratio_max"] < 1.0001
    sample = json.loads((run / "samples.jsonl").read_text().splitlines()[0])
    assert [t["role"] for t in sample["completions"][0]["turns"]] == \
        ["user", "assistant", "user", "assistant"]  # fmt: skip
