"""vLLM's length is the start-up check's (issue 16, item 3): the engine holds the longest
prompt data.fit accepted plus --max-new-tokens, up to the model's positions, and a launch
whose engine fails on its first work leaves no run directory behind.

The bug: VLLMEngine capped max_model_len at 4096 while data.fit allowed the model's whole
positions. With an 8192-position model, a 4151-token prompt passed the check and crashed
vLLM at step 0 (leaving a RUN_DIR that could be neither reused nor resumed), and a
4086-token prompt with --max-new-tokens 32 got every vLLM completion cut to 10 tokens
(4096 - 4086) while --rollout hf gave 32.

The tiny model (1 layer, width 128: 4 heads of 32, the smallest vLLM's CPU attention
runs) with its positions raised to 8192; one character is one token, no BOS.
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest

from gspo.train import data
from gspo.train.cli import main
from gspo.train.config import SamplingConfig, TaskConfig
from gspo.train.engines.hf import HFEngine
from gspo.train.tiny import tiny_model, tiny_tokenizer

pytest.importorskip("vllm")

POSITIONS = 8192


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    """A directory holding the tiny model with 8192 positions (its rotary table covers any
    length: raising the limit changes no weight)."""
    path = tmp_path_factory.mktemp("long")
    model = tiny_model(layers=1, hidden=128, seed=0)
    model.config.max_position_embeddings = POSITIONS
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_sequence_len_is_the_longest_accepted_prompt_plus_max_new_tokens():
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=POSITIONS))
    assert data.sequence_len(model, 4151, 32) == 4183  # not min(8192, 4096) = 4096
    assert data.sequence_len(model, 4086, 32) == 4118  # main gave 4096: 10 new tokens
    assert data.sequence_len(model, 8160, 32) == POSITIONS  # exactly the model's positions
    assert data.sequence_len(model, None, 32) == POSITIONS  # not told: the model's own
    with pytest.raises(ValueError, match="8161 tokens plus --max-new-tokens 32 exceeds"):
        data.sequence_len(model, 8161, 32)
    with pytest.raises(ValueError, match="no position limit"):
        data.sequence_len(SimpleNamespace(config=SimpleNamespace()), None, 32)


def test_vllm_gives_the_whole_response_after_a_4086_token_prompt(long_model):
    """Greedy, so both engines must give the same tokens: 32 of them (this prompt's greedy
    path meets no EOS; the HF engine shows it). main's vLLM stopped at 10."""
    from gspo.train import models
    from gspo.train.engines.vllm import VLLMEngine

    model, tok = models.load(str(long_model), layers=0, hidden=0, seed=0)
    model.eval()
    sampling = SamplingConfig(max_new_tokens=32, vllm_memory=0.05)
    prompts = [{"prompt": "a" * 4079 + "sum 07:"}]  # 4086 characters = tokens
    (kept,), dropped, longest = data.fit([prompts], tok, model, SimpleNamespace(
        data=TaskConfig(max_prompt_tokens=None), sampling=sampling))  # fmt: skip
    assert (kept, dropped, longest) == (prompts, 0, 4086)
    hf = HFEngine.for_eval(model, tok, sampling, device=None, seed=0, batch_size=1)
    want = hf.sample(prompts, group_size=1, greedy=True)
    assert int(want.response_mask.sum()) == 32
    engine = VLLMEngine.for_eval(model, tok, sampling, device=model.device, seed=0,
                                 batch_size=1, prompt_tokens=longest)  # fmt: skip
    try:
        got = engine.sample(prompts, group_size=1, greedy=True)
    finally:
        engine.close()
    assert int(got.response_mask.sum()) == 32  # main: 10
    assert got.completions == want.completions


def test_a_4151_token_prompt_trains_with_vllm(long_model, tmp_path):
    """main: data.fit accepted it (4151 + 4 <= 8192) and vLLM (max_model_len 4096) refused
    it at step 0's evaluation, after RUN_DIR was written."""
    rows = [{"prompt": "a" * 4144 + f"sum {t:02d}:", "target": t} for t in range(1, 5)]
    rows += [{"prompt": f"sum {t:02d}:", "target": t} for t in range(5, 9)]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "length_reward.py").write_text(
        "def score(prompts, completions, target):\n"
        "    return [float(len(c)) for c in completions]\n"
    )
    run = tmp_path / "run"
    sys.path.insert(0, str(tmp_path))
    try:
        code = main(["--model", str(long_model), "--prompts", str(path), "--reward",
                     "length_reward:score", "--rollout", "vllm", "--vllm-memory", "0.05",
                     "--steps", "1", "--prompts-per-step", "2", "--group-size", "2",
                     "--minibatches", "1", "--max-new-tokens", "4", "--eval-prompts", "1",
                     "--run-dir", str(run), "--no-progress", "--no-plot"])  # fmt: skip
    finally:
        sys.path.remove(str(tmp_path))
    assert code == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1]


def test_an_engine_that_fails_at_step_0_leaves_no_run_dir(tmp_path, monkeypatch):
    """Step 0's evaluation is the engine's first work; main wrote RUN_DIR (config.json,
    metrics.jsonl) before it, so a failure there left a directory that --run-dir refuses
    (not empty) and --resume refuses (no checkpoint)."""

    def fails(self, prompts, *, group_size, greedy):
        raise RuntimeError("the engine ran out of memory")

    monkeypatch.setattr(HFEngine, "sample", fails)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="out of memory"):
        main(["--tiny-hidden", "32", "--tiny-layers", "1", "--steps", "1", "--prompts-per-step",
              "2", "--group-size", "2", "--minibatches", "1", "--eval-prompts", "1",
              "--run-dir", str(run), "--no-progress", "--no-plot"])  # fmt: skip
    assert not run.exists()
