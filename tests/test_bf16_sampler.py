"""--dtype bf16 with --old-logprobs sampler is refused at start (issue 16, item 3): the
sampler's log-probs (HF generate and vLLM compute in fp32) are not the bf16 policy's.

Measured on SmolLM2-135M-Instruct, arith level 1, 32 tokens, temperature 0.7, 16 samples,
trainer in bf16: vLLM fp32 vs trainer mismatch_k3 1.0e-3, sequence ratios 0.968..1.018;
vLLM in bf16 (its own kernels) 3.4e-3, 0.964..1.034 (no closer). In fp32 the engines
match the trainer to ~1e-8 (tests/test_train_vllm.py). GSPO's clip range is 0.997..1.004,
so sampler log-probs as the old policy's would clip on-policy samples."""

from __future__ import annotations

import pytest

from gspo.train.cli import main
from gspo.train.config import TrainConfig


def test_bf16_with_sampler_logprobs_is_refused_naming_the_fix(capsys):
    with pytest.raises(ValueError, match=r"old_logprobs.*'sampler'.*--old-logprobs trainer"):
        TrainConfig(old_logprobs="sampler", dtype="bf16")
    TrainConfig(old_logprobs="trainer", dtype="bf16")  # the trainer's own forward: fine
    TrainConfig(old_logprobs="sampler", dtype="fp32")  # sampler == policy to ~1e-8: fine
    assert main(["--old-logprobs", "sampler", "--dtype", "bf16", "--steps", "1"]) == 2
    assert "not the bf16 policy's" in capsys.readouterr().err
