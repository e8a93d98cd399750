"""The objective registry: a new objective is one registered record, and gspo_loss, the
trainer's config and --compare take it with nothing else changed; names are unique; listing
and checking objectives imports no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from gspo.objectives import registry


def _reinforce(x):
    """L = mean_i mean_t A_i logp_t: the plain policy gradient, for this test only."""
    layout = x.layout
    term = layout.select(layout.expand(x.adv) * x.logp.to(x.dtype))
    return -layout.seq_mean(term).sum() / x.divisor, {"scale_used": torch.tensor(x.params["scale"])}


@pytest.fixture
def reinforce():
    record = registry.register(registry.Objective(
        name="reinforce-test", summary="reinforce-test (a test's)", loss=_reinforce,
        options={"scale": 1.0},
        resolve=lambda given, bound: {"scale": registry.positive(
            "scale", given.get("scale") or 1.0)},
    ))  # fmt: skip
    yield record
    del registry._REGISTRY[record.name]


def test_a_registered_objective_is_everywhere(reinforce):
    from gspo import gspo_loss
    from gspo.train.compare import parse_variants
    from gspo.train.config import TrainConfig

    assert "reinforce-test" in registry.names()
    logp = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True], [True, False]])
    loss, metrics = gspo_loss(logp, logp.detach(), mask, variant="reinforce-test",
                              advantages=torch.tensor([1.0, -1.0], dtype=torch.float64),
                              scale=2.0)  # fmt: skip
    # L = (1 * (-1 - 2) / 2 + (-1) * (-0.5)) / 2 = (-1.5 + 0.5) / 2 = -0.5
    assert loss.item() == pytest.approx(0.5) and metrics["scale_used"].item() == 2.0
    options = TrainConfig(loss="reinforce-test:scale=3").objective.gspo_loss_options()
    assert options == {"variant": "reinforce-test", "scale": 3.0}
    assert parse_variants(["reinforce-test:scale=2"])[0].changes == {"loss": "reinforce-test:scale=2"}
    with pytest.raises(ValueError, match="scale=2.0 does not apply to variant='gspo'"):
        gspo_loss(logp, logp.detach(), mask, advantages=torch.zeros(2), scale=2.0)


def test_a_name_is_registered_once(reinforce):
    with pytest.raises(ValueError, match="'reinforce-test' is registered twice"):
        registry.register(reinforce)


def test_listing_and_checking_objectives_imports_no_torch():
    code = ("import sys\nfrom gspo.objectives import names\nfrom gspo.train.config import "
            "TrainConfig\nassert len(names()) >= 10\n"
            "TrainConfig(loss='vespo:k_pos=1').objective.gspo_loss_options()\n"
            "print('torch' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
