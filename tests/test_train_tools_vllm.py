"""`gspo train --tools --rollout vllm` at tiny sizes: function-tool episodes sampled by vLLM
train with the sampler's log-probs as the old policy (matching the trainer's to float
rounding), and every episode's tool calls and errors are the ones its replies make."""

from __future__ import annotations

import json

import pytest

from gspo.train.cli import main
from test_train_e2e import rows
from test_train_tools import TINY_TEMPLATE, expected_counts
from test_train_vllm import TINY


def test_function_tools_on_vllm(tmp_path):
    pytest.importorskip("vllm")
    run = tmp_path / "run"
    assert main([*TINY, "--steps", "2", "--task", "digitsum", "--max-new-tokens", "6",
                 "--tools", "test_train_tools:double", "--tool-parser", "digits",
                 "--chat-template", TINY_TEMPLATE, "--old-logprobs", "sampler",
                 "--samples-per-step", "4", "--run-dir", str(run)]) == 0  # fmt: skip
    for r in rows(run)[1:]:
        assert {"tool_calls", "tool_errors"} <= set(r)
        assert r["mismatch_max_abs"] < 1e-4 and r["mismatch_k3"] < 1e-8, r
    calls = 0
    for line in (run / "samples.jsonl").read_text().splitlines():
        for c in json.loads(line)["completions"]:
            replies = [t["content"] for t in c["turns"] if t["role"] == "assistant"]
            want = [expected_counts(x) for x in replies]
            assert (c["tool_calls"], c["tool_errors"]) == \
                (sum(w[0] for w in want), sum(w[1] for w in want)), c  # fmt: skip
            calls += c["tool_calls"]
    assert calls > 0
