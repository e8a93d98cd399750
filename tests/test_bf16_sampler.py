"""--dtype bf16 with --old-logprobs sampler is refused at start (issue 16, item 3): the
sampler's log-probs (HF generate and vLLM compute in fp32) are not the bf16 policy's.

Measured on SmolLM2-135M-Instruct, arith level 1, 32 tokens, temperature 0.7, 24 samples
each, the trainer's log-probs of the engine's samples: vLLM fp32 vs trainer fp32 k3 4.2e-11;
vLLM fp32 vs trainer bf16 8.3e-4 (max |delta| 0.24); vLLM bf16 vs trainer bf16 1.9e-3 (no
closer, so vLLM stays fp32). A 1-step bf16 run's sequence ratios: 0.968..1.018, while
GSPO's clip range is 0.997..1.004: sampler log-probs as the old policy's would clip
on-policy samples."""

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
