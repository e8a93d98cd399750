"""Group-standardised advantages against the pure reference and hand-worked numbers."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gspo import advantages
from gspo.reference import group_advantages


def test_two_groups_population_std():
    # Group 0: [1, 3] -> mean 2, population std 1 -> [-1, 1]. (sample std sqrt(2) -> +-0.707)
    # Group 1: [5, 5] -> all equal -> exactly [0, 0].
    got = advantages(torch.tensor([1.0, 3.0, 5.0, 5.0]), group_size=2)
    assert got.tolist() == [-1.0, 1.0, 0.0, 0.0]


def test_norms_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)  # mean 3, deviations -2 -1 0 3
    dev = torch.tensor([-2.0, -1.0, 0.0, 3.0], dtype=torch.float64)
    pop, samp = math.sqrt(14 / 4), math.sqrt(14 / 3)
    torch.testing.assert_close(advantages(r, group_size=4), dev / pop)
    torch.testing.assert_close(advantages(r, group_size=4, norm="sample"), dev / samp)
    torch.testing.assert_close(advantages(r, group_size=4, norm="center"), dev)
    # Leave-one-out: r_0 - mean(2, 3, 6) = 1 - 11/3 = -8/3 = 4/3 * (-2).
    loo = advantages(r, group_size=4, norm="loo")
    torch.testing.assert_close(loo, dev * 4 / 3)
    assert loo[0].item() == pytest.approx(1 - 11 / 3)


def test_group_ids_any_order_equal_contiguous():
    r = torch.tensor([0.2, 0.9, 0.4, 0.1, 0.7, 0.3])
    ids = torch.tensor([7, 3, 7, 3, 7, 3])
    got = advantages(r, group_ids=ids)
    order = torch.tensor([0, 2, 4, 1, 3, 5])
    contiguous = advantages(r[order], group_size=3)
    torch.testing.assert_close(got[order], contiguous)


@pytest.mark.parametrize("norm", ["population", "sample", "center", "loo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tied_group_is_exactly_zero(norm, dtype):
    # In float32 a naive (r - mean) / (std + eps) gives |A| ~ 0.008 here (verl, measured).
    r = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.3, 0.7, 0.7, 0.1], dtype=dtype)
    got = advantages(r, group_size=4, norm=norm)
    assert got[:4].tolist() == [0.0] * 4
    assert got[4:].abs().min() > 0
    assert got.dtype == dtype


def test_integer_rewards_and_singleton_groups():
    got = advantages(torch.tensor([1, 0, 1]), group_size=1)
    assert got.tolist() == [0.0, 0.0, 0.0] and got.dtype == torch.float32


@given(
    groups=st.lists(
        st.lists(st.floats(-5, 5, allow_nan=False), min_size=1, max_size=6), min_size=1, max_size=5
    )
)
def test_matches_reference(groups):
    flat = [r for g in groups for r in g]
    ids = torch.tensor([k for k, g in enumerate(groups) for _ in g])
    got = advantages(torch.tensor(flat, dtype=torch.float64), group_ids=ids)
    want = [a for g in groups for a in group_advantages(g)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(rewards=torch.ones(4)), ValueError, "exactly one of group_size"),
        (dict(rewards=torch.ones(4), group_size=3), ValueError, "does not divide"),
        (dict(rewards=torch.ones(4), group_size=0), ValueError, "positive int"),
        (
            dict(rewards=torch.ones(4), group_size=2, group_ids=torch.zeros(4)),
            ValueError,
            "exactly one",
        ),
        (dict(rewards=torch.ones(4), group_ids=torch.zeros(3)), ValueError, "group_ids must have"),
        (dict(rewards=torch.ones(4), group_ids=torch.zeros(4)), ValueError, "integer"),
        (dict(rewards=torch.tensor([1.0, math.nan]), group_size=2), ValueError, r"rewards\[1\]"),
        (dict(rewards=torch.tensor([1.0, math.inf]), group_size=2), ValueError, "finite"),
        (dict(rewards=torch.ones(2, 2), group_size=2), ValueError, "shape"),
        (dict(rewards=torch.ones(0), group_size=1), ValueError, "B >= 1"),
        (dict(rewards="12", group_size=2), TypeError, "sequence of numbers, got a string"),
        (dict(rewards={1.0, 2.0}, group_size=2), TypeError, "sequence of numbers, got set"),
        (dict(rewards=torch.ones(2), group_size=2, norm="zscore"), ValueError, "norm"),
    ],
)
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        advantages(**kwargs)


@pytest.mark.parametrize("scale", [1e-200, 1.0, 1e200])
def test_tiny_and_huge_spreads_do_not_underflow(scale):
    # Squaring deviations of 1e-200 underflows to 0 (and of 1e200 overflows to inf);
    # a scale-free computation still gives the advantages of [0, 1].
    r = torch.tensor([0.0, scale], dtype=torch.float64)
    assert advantages(r, group_size=2).tolist() == [-1.0, 1.0]
    assert group_advantages([0.0, scale]) == [-1.0, 1.0]


def test_python_lists_are_accepted():
    """rewards and group_ids as lists of numbers (the bug: TypeError for anything but a
    tensor); a non-number is a TypeError that names the element."""
    from gspo import gspo_loss

    rewards, ids = [1.0, 0.0, 0.5, 0.5], [7, 7, 3, 3]
    expected = advantages(torch.tensor(rewards), group_ids=torch.tensor(ids))
    assert torch.equal(advantages(rewards, group_ids=ids), expected)
    assert torch.equal(advantages((1, 0, 2, 2), group_size=2), torch.tensor([1.0, -1.0, 0, 0]))
    logp = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    mask = torch.ones(4, 3, dtype=torch.bool)
    a = gspo_loss(logp, logp.detach() + 0.01, mask, rewards=rewards, group_ids=ids)[0]
    b = gspo_loss(logp, logp.detach() + 0.01, mask, rewards=torch.tensor(rewards),
                  group_ids=torch.tensor(ids))[0]  # fmt: skip
    assert torch.equal(a, b)
    with pytest.raises(TypeError, match=r"rewards\[1\] is 'x' \(str\), not a number"):
        advantages([1.0, "x"], group_size=2)
    with pytest.raises(TypeError, match=r"group_ids\[0\] is None \(NoneType\), not a number"):
        gspo_loss(logp, logp.detach(), mask, rewards=rewards, group_ids=[None, 1, 1, 1])
    with pytest.raises(ValueError, match="group_ids must be an integer"):
        advantages(rewards, group_ids=[0.5, 0.5, 1.0, 1.0])
