"""vLLM's "RotaryEmbedding: Failed to load weights" at every weight sync (issue 16, item 3):
harmless (the layer holds only its computed cos/sin table, which vLLM puts back) and kept
out of the user's log by a filter scoped to that record, on that logger, during a reload.

Measured on main: the warning came once per `load_weights` (the tiny Qwen2 and SmolLM2:
one RotaryEmbedding instance shared by every layer)."""

from __future__ import annotations

import logging

import pytest
import torch

from gspo.causal_lm import CausalLMLogprobs
from gspo.train import distributed as dd
from gspo.train.config import SamplingConfig
from gspo.train.tiny import tiny_model, tiny_tokenizer
from gspo.train.update import response_logprobs

pytest.importorskip("vllm")

RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"
PROMPTS = [{"prompt": "sum 07: " + "ab " * 20}, {"prompt": "sum 12:"}]


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(record.getMessage())


def test_reload_keeps_outputs_and_the_rotary_warning_out_of_the_log():
    from gspo.train.engines.vllm import VLLMEngine

    model = tiny_model(layers=1, hidden=128, seed=0).eval()
    engine = VLLMEngine(model, tiny_tokenizer(), SamplingConfig(max_new_tokens=8,
                        vllm_memory=0.05), device=model.device, seed=0)  # fmt: skip
    records = Records()
    logging.getLogger("vllm").addHandler(records)  # vLLM's loggers propagate to "vllm"
    try:
        engine.load_weights(dd.full_params(model))  # the same weights
        rollout = engine.sample(PROMPTS, group_size=4, greedy=False)
        # after the reload vLLM still samples the model the trainer scores: a cos/sin table
        # lost or left stale would move every later position's log-prob by far more
        with torch.no_grad():
            logp, _ = response_logprobs(CausalLMLogprobs(model), rollout, temperature=1.0)
        mask = rollout.response_mask
        assert (logp - rollout.logp_sampler)[mask].abs().max().item() < 1e-4
        assert not any("Failed to load weights" in m for m in records.seen), records.seen
        # scoped: another layer's failure on that logger still shows, and the filter goes
        # with the reload
        logger = logging.getLogger(RELOAD_LOGGER)
        logger.warning("%s: Failed to load weights", "RotaryEmbedding")
        assert records.seen[-1:] == ["RotaryEmbedding: Failed to load weights"]
        assert not logger.filters
    finally:
        logging.getLogger("vllm").removeHandler(records)
        engine.close()


def test_the_filter_drops_only_the_rotary_record():
    from gspo.train.engines.vllm import RotaryReloadFilter

    def record(*args):
        return logging.LogRecord(RELOAD_LOGGER, logging.WARNING, "layerwise.py", 266,
                                 "%s: Failed to load weights", args, None)  # fmt: skip

    keep = RotaryReloadFilter().filter
    assert not keep(record("RotaryEmbedding"))
    assert not keep(record("Llama3RotaryEmbedding"))
    assert keep(record("QKVParallelLinear"))  # a real weight that did not load
    assert keep(logging.LogRecord(RELOAD_LOGGER, logging.WARNING, "x", 1, "other %s",
                                  ("RotaryEmbedding",), None))  # fmt: skip
