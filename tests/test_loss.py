"""gspo_loss against the pure reference (hypothesis), gradients, garbage, extremes, errors.

Batches are ragged: several groups, sequences of different lengths, padded ([B,T]
+ mask) or packed ([N] + seq_lens / cu_seqlens).
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from eager_reference import eager_gspo_loss
from gspo import gspo_loss
from gspo.reference import sequence_objective

GARBAGE = [math.nan, math.inf, -math.inf, 1e30, -7.0]


def make_batch(seed, num_groups, group_size, max_len, spread, dtype=torch.float64):
    """Random ragged batch: per-sequence token lists plus rewards (python floats)."""
    g = torch.Generator().manual_seed(seed)
    b = num_groups * group_size
    lens = torch.randint(1, max_len + 1, (b,), generator=g).tolist()
    new = [(-3 * torch.rand(n, generator=g, dtype=dtype)).tolist() for n in lens]
    # logp_old = logp + noise: the spread decides how far ratios move off 1 and past the clip.
    old = [[x + spread * float(torch.randn(1, generator=g)) for x in row] for row in new]
    rewards = torch.randint(0, 4, (b,), generator=g).to(dtype).div(3).tolist()  # ties happen
    return new, old, rewards


def pad(rows, dtype=torch.float64, fill=0.0):
    """[B,T] tensor and mask; padded slots hold `fill` (garbage when asked)."""
    t = max(len(r) for r in rows)
    out = torch.full((len(rows), t), fill, dtype=dtype)
    mask = torch.zeros(len(rows), t, dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=dtype)
        mask[i, : len(r)] = True
    return out, mask


def pack(rows, dtype=torch.float64):
    return torch.tensor([x for r in rows for x in r], dtype=dtype), torch.tensor(
        [len(r) for r in rows]
    )


def reference_objective(new, old, rewards, group_size, eps_low, eps_high):
    """Batch objective from the spec: per-group objectives weighted by group size, / B."""
    total = 0.0
    for k in range(0, len(new), group_size):
        sl = slice(k, k + group_size)
        total += group_size * sequence_objective(
            new[sl], old[sl], rewards[sl], eps_low, epsilon_high=eps_high
        )
    return total / len(new)


batches = st.builds(
    dict,
    seed=st.integers(0, 2**31 - 1),
    num_groups=st.integers(1, 4),
    group_size=st.integers(1, 5),
    max_len=st.integers(1, 9),
    spread=st.sampled_from([0.0, 0.01, 0.2, 1.0]),
)
eps_pairs = st.tuples(st.sampled_from([3e-4, 0.05, 0.2]), st.sampled_from([4e-4, 0.1, 0.28]))


@given(batch=batches, eps=eps_pairs, garbage=st.sampled_from(GARBAGE))
def test_padded_matches_reference(batch, eps, garbage):
    new, old, rewards = make_batch(**batch)
    logp, mask = pad(new, fill=garbage)
    logp_old, _ = pad(old, fill=garbage)
    g = batch["group_size"]
    loss, _ = gspo_loss(logp, logp_old, mask, rewards=torch.tensor(rewards, dtype=torch.float64),
                        group_size=g, eps_low=eps[0], eps_high=eps[1])  # fmt: skip
    want = -reference_objective(new, old, rewards, g, *eps)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(want, abs=1e-10, rel=1e-10)


@given(batch=batches, eps=eps_pairs, cu=st.booleans())
def test_packed_matches_reference_and_padded(batch, eps, cu):
    new, old, rewards = make_batch(**batch)
    g = batch["group_size"]
    r = torch.tensor(rewards, dtype=torch.float64)
    logp, lens = pack(new)
    logp_old, _ = pack(old)
    logp.requires_grad_(True)
    kw = dict(rewards=r, group_size=g, eps_low=eps[0], eps_high=eps[1])
    lens_kw = {"cu_seqlens": torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])} if cu \
        else {"seq_lens": lens}  # fmt: skip
    loss, _ = gspo_loss(logp, logp_old, **lens_kw, **kw)
    assert loss.item() == pytest.approx(-reference_objective(new, old, rewards, g, *eps), abs=1e-10)
    loss.backward()

    padded, mask = pad(new)
    padded.requires_grad_(True)
    loss_p, _ = gspo_loss(padded, pad(old)[0], mask, **kw)
    loss_p.backward()
    torch.testing.assert_close(padded.grad[mask], logp.grad, rtol=1e-10, atol=1e-12)


@given(batch=batches)
def test_group_ids_shuffled_equal_contiguous(batch):
    new, old, rewards = make_batch(**batch)
    b, g = len(new), batch["group_size"]
    perm = torch.randperm(b, generator=torch.Generator().manual_seed(batch["seed"])).tolist()
    ids = torch.arange(b) // g
    logp, lens = pack([new[i] for i in perm])
    logp_old, _ = pack([old[i] for i in perm])
    loss, _ = gspo_loss(logp, logp_old, seq_lens=lens, rewards=torch.tensor(rewards, dtype=torch.float64)[perm],
                        group_ids=ids[perm], eps_low=0.2)  # fmt: skip
    want = -reference_objective(new, old, rewards, g, 0.2, 0.2)
    assert loss.item() == pytest.approx(want, abs=1e-10)


@given(batch=batches, eps=eps_pairs, per_token=st.booleans())
def test_gspo_token_equals_gspo_with_sequence_advantages(batch, eps, per_token):
    new, old, rewards = make_batch(**batch)
    logp, mask = pad(new, fill=math.nan)
    logp_old, _ = pad(old, fill=math.nan)
    adv = torch.randn(len(new), dtype=torch.float64)
    # The same advantage on every token of a sequence, given per token or per sequence.
    adv_arg = adv[:, None].expand_as(logp).clone() if per_token else adv
    grads, values = [], []
    for variant, a in (("sequence", adv), ("token", adv_arg)):
        x = logp.clone().requires_grad_(True)
        loss, _ = gspo_loss(x, logp_old, mask, advantages=a, eps_low=eps[0], eps_high=eps[1],
                            variant=variant)  # fmt: skip
        loss.backward()
        values.append(loss.item())
        grads.append(x.grad)
    assert values[0] == pytest.approx(values[1], abs=1e-12)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-13)


def test_gspo_token_diverges_with_per_token_advantages():
    # Two tokens with advantages +1 and -1: GSPO-token's gradient pushes the first up and
    # the second down; no per-sequence advantage can do both.
    logp = torch.tensor([[-1.0, -1.0]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    loss, _ = gspo_loss(logp, logp.detach(), torch.ones(1, 2, dtype=torch.bool), advantages=adv,
                        eps_low=0.2, variant="token")  # fmt: skip
    loss.backward()
    assert logp.grad.tolist() == [[-0.5, 0.5]]  # -(1/B)(1/T) * s * A_t with s = 1


def test_grpo_variant_by_hand():
    # One sequence, tokens with log-ratios 0.5 and 0.0, A = 1, eps 0.2:
    # token ratios e^0.5 -> clipped 1.2 (A > 0 takes min -> 1.2) and 1.0 -> L = (1.2 + 1) / 2.
    # GSPO instead uses e^0.25 = 1.284 -> clipped 1.2 -> L = 1.2.
    logp = torch.tensor([[0.5, 0.0]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    kw = dict(advantages=torch.ones(1, dtype=torch.float64), eps_low=0.2)
    assert gspo_loss(logp, torch.zeros(1, 2), mask, variant="grpo", **kw)[0].item() == -1.1
    assert gspo_loss(logp, torch.zeros(1, 2), mask, **kw)[0].item() == pytest.approx(-1.2)


def ratios_away_from_clip(seed, eps):
    """A padded batch whose sequence ratios sit at least 0.02 away from 1 +- eps."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(6, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(6, 5, generator=g) < 0.7
    mask[:, 0] = True
    offsets = torch.tensor([-0.5, -0.1, 0.0, 0.05, 0.1, 0.6], dtype=torch.float64)
    count = mask.sum(1)
    noise = torch.randn(6, 5, generator=g, dtype=torch.float64) * 0.05
    noise = torch.where(mask, noise - (noise * mask).sum(1, keepdim=True) / count[:, None], 0.0)
    logp_old = logp - offsets[:, None] - noise  # mean log-ratio per sequence = offset
    ratio = offsets.exp()
    assert ((ratio - (1 - eps)).abs().min() > 0.02) and ((ratio - (1 + eps)).abs().min() > 0.02)
    return logp, logp_old, mask


@pytest.mark.parametrize("variant", ["sequence", "token", "grpo"])
def test_gradcheck_float64(variant):
    logp, logp_old, mask = ratios_away_from_clip(0, eps=0.2)
    rewards = torch.tensor([0.1, 0.9, 0.4, 0.3, 0.3, 0.8], dtype=torch.float64)
    tol = 0.25 if variant == "grpo" else 0.2  # grpo: token ratios spread wider

    def f(x):
        return gspo_loss(x, logp_old, mask, rewards=rewards, group_size=3, eps_low=tol,
                         variant=variant)[0]  # fmt: skip

    assert torch.autograd.gradcheck(f, (logp.clone().requires_grad_(True),))


def test_gradient_by_hand():
    # One group of two single-token sequences, A = [1, -1], log-ratios 0.1 and 0.1, eps 0.2:
    # both unclipped; dL/dlogp_i = A_i * e^0.1 / (B * T_i); the loss is -L.
    logp = torch.tensor([[0.1], [0.1]], dtype=torch.float64, requires_grad=True)
    loss, m = gspo_loss(logp, torch.zeros(2, 1), torch.ones(2, 1, dtype=torch.bool),
                        rewards=torch.tensor([1.0, 0.0]), group_size=2, eps_low=0.2)  # fmt: skip
    loss.backward()
    e = math.exp(0.1)
    assert logp.grad[:, 0].tolist() == pytest.approx([-e / 2, e / 2])
    assert m["clip_frac_high"].item() == 0.0 and m["ratio_mean"].item() == pytest.approx(e)


@pytest.mark.parametrize("variant", ["sequence", "token", "grpo"])
@pytest.mark.parametrize("garbage", GARBAGE)
def test_garbage_in_masked_slots_changes_nothing(variant, garbage):
    logp, logp_old, mask = ratios_away_from_clip(1, eps=0.2)
    rewards = torch.tensor([0.1, 0.9, 0.4, 0.3, 0.3, 0.8], dtype=torch.float64)
    results = []
    for fill in (0.0, garbage):
        x = torch.where(mask, logp, fill).requires_grad_(True)
        y = torch.where(mask, logp_old, fill)
        loss, metrics = gspo_loss(x, y, mask, rewards=rewards, group_size=3, eps_low=0.2,
                                  variant=variant)  # fmt: skip
        loss.backward()
        results.append((loss.item(), x.grad, metrics))
    (v0, g0, m0), (v1, g1, m1) = results
    assert v0 == v1 and torch.isfinite(g1).all()
    torch.testing.assert_close(g0, g1, rtol=0, atol=0)
    assert (g1[~mask] == 0).all()
    for k in m0:
        assert m0[k].item() == m1[k].item(), k


@pytest.mark.parametrize("variant", ["sequence", "token", "grpo"])
@pytest.mark.parametrize("shift", [1e4, -1e4, 85.0, 25.0])
def test_extreme_log_ratios_stay_finite(variant, shift):
    logp = torch.full((4, 3), -1.0, requires_grad=True)
    logp_old = torch.full((4, 3), -1.0)
    logp_old[:2] -= shift  # sequences 0, 1: mean log-ratio = shift (e^shift overflows)
    loss, metrics = gspo_loss(logp, logp_old, torch.ones(4, 3, dtype=torch.bool),
                              rewards=torch.tensor([1.0, 0.0, 0.5, 0.2]), group_size=4,
                              eps_low=0.2, variant=variant)  # fmt: skip
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert all(torch.isfinite(v) for v in metrics.values())


def test_clamp_is_exact_inside_the_bound():
    # |mean log-ratio| = 19.5 < 20: exactly the reference (ratio e^19.5, unclipped for A < 0).
    new, old, rewards = [[0.0], [0.0]], [[-19.5], [0.0]], [0.0, 1.0]
    loss, _ = gspo_loss(torch.tensor(new, dtype=torch.float64), torch.tensor(old, dtype=torch.float64),
                        torch.ones(2, 1, dtype=torch.bool), rewards=torch.tensor(rewards),
                        group_size=2, eps_low=0.2)  # fmt: skip
    assert loss.item() == pytest.approx(-sequence_objective(new, old, rewards, 0.2), rel=1e-12)


def test_matches_eager_baseline_on_clean_input():
    new, old, rewards = make_batch(3, 4, 4, 12, 0.2)
    logp, mask = pad(new)
    logp_old, _ = pad(old)
    r = torch.tensor(rewards, dtype=torch.float64)
    got, _ = gspo_loss(logp, logp_old, mask, rewards=r, group_size=4, eps_low=0.1, eps_high=0.2)
    want = eager_gspo_loss(logp, logp_old, mask, r, 4, 0.1, 0.2)
    assert got.item() == pytest.approx(want.item(), abs=1e-12)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-5)])
def test_low_precision_inputs_compute_in_float32(dtype, tol):
    # The inputs are rounded to `dtype`; the arithmetic must then be float32-exact,
    # i.e. equal to float64 arithmetic on the same rounded values to ~1e-5.
    new, old, rewards = make_batch(5, 8, 8, 512, 0.05)
    logp, mask = pad(new)
    logp_old, _ = pad(old)
    r = torch.tensor(rewards)
    lo, lo_old = logp.to(dtype), logp_old.to(dtype)
    got, _ = gspo_loss(lo, lo_old, mask, rewards=r, group_size=8, eps_low=0.2)
    exact, _ = gspo_loss(lo.double(), lo_old.double(), mask, rewards=r.double(), group_size=8,
                         eps_low=0.2)  # fmt: skip
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(exact.item(), abs=tol, rel=tol)


def test_bf16_within_stated_tolerance_of_float64():
    # bf16 keeps 8 significant bits: each log-prob in [-3, 0] is off by <= 2^-8 * 3 / 2, so
    # each sequence's mean log-ratio by <= 2^-8 * 3 = 0.0117, the ratio by ~1.2%, and the
    # loss (|A| <= sqrt(G - 1) ~ 2.65 at G = 8) by <= 0.012 * 1.1 * 2.65 = 0.035.
    new, old, rewards = make_batch(6, 8, 8, 256, 0.05)
    logp, mask = pad(new)
    logp_old, _ = pad(old)
    r = torch.tensor(rewards, dtype=torch.float64)
    exact, _ = gspo_loss(logp, logp_old, mask, rewards=r, group_size=8, eps_low=0.2)
    got, _ = gspo_loss(logp.bfloat16(), logp_old.bfloat16(), mask, rewards=r, group_size=8,
                       eps_low=0.2)  # fmt: skip
    assert abs(got.item() - exact.item()) <= 0.035


def test_num_sequences_divides():
    new, old, rewards = make_batch(7, 2, 4, 6, 0.2)
    logp, mask = pad(new)
    logp_old, _ = pad(old)
    kw = dict(rewards=torch.tensor(rewards), group_size=4, eps_low=0.2)
    local, _ = gspo_loss(logp, logp_old, mask, **kw)
    glob, _ = gspo_loss(logp, logp_old, mask, num_sequences=32, **kw)
    assert glob.item() == pytest.approx(local.item() * 8 / 32, rel=1e-12)


def test_metrics_by_hand():
    # Four one-token sequences; eps 0.2; ratios e^[-0.5, -0.5, 0.5, 0.0] = [0.61, 0.61, 1.65, 1].
    # A from rewards [0, 1, 1, 0] = [-1, 1, 1, -1]. Active clips: seq 0 low (r < 0.8, A < 0),
    # seq 2 high (r > 1.2, A > 0); seq 1 is below 0.8 but A > 0, so not clipped.
    logp = torch.tensor([[-0.5], [-0.5], [0.5], [0.0]], dtype=torch.float64)
    loss, m = gspo_loss(logp, torch.zeros(4, 1, dtype=torch.float64),
                        torch.ones(4, 1, dtype=torch.bool),
                        rewards=torch.tensor([0.0, 1.0, 1.0, 0.0]), group_size=4, eps_low=0.2)  # fmt: skip
    assert m["clip_frac_low"].item() == 0.25 and m["clip_frac_high"].item() == 0.25
    assert m["ratio_min"].item() == pytest.approx(math.exp(-0.5))
    assert m["ratio_max"].item() == pytest.approx(math.exp(0.5))
    # k3 per token: e^x - 1 - x, averaged over the four tokens.
    k3 = [math.expm1(x) - x for x in (-0.5, -0.5, 0.5, 0.0)]
    assert m["approx_kl"].item() == pytest.approx(sum(k3) / 4)
    assert m["adv_mean"].item() == 0.0 and m["adv_std"].item() == pytest.approx(1.0)
    assert not any(v.requires_grad for v in m.values())


B, T = 4, 3
OK = dict(
    logp=torch.zeros(B, T), logp_old=torch.zeros(B, T), mask=torch.ones(B, T, dtype=torch.bool),
    rewards=torch.arange(B, dtype=torch.float32), group_size=2,
)  # fmt: skip


def _with(**changes):
    kw = {**OK, **changes}
    return {k: v for k, v in kw.items() if v is not None}


def _row_masked(i):
    m = torch.ones(B, T, dtype=torch.bool)
    m[i] = False
    return m


def _nan_at(i, t):
    x = torch.zeros(B, T)
    x[i, t] = math.nan
    return x


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            _with(
                logp=torch.zeros(0, T),
                logp_old=torch.zeros(0, T),
                mask=torch.ones(0, T, dtype=torch.bool),
            ),
            ValueError,
            "no sequences",
        ),  # noqa: E501
        (_with(logp_old=torch.zeros(B, T + 1)), ValueError, "logp_old has shape"),
        (_with(mask=torch.ones(B, T + 1, dtype=torch.bool)), ValueError, "mask has shape"),
        (_with(mask=torch.ones(B, T)), ValueError, "mask must be a bool"),
        (_with(mask=None), ValueError, "mask"),
        (_with(mask=_row_masked(2)), ValueError, "mask row 2 has 0 valid tokens"),
        (_with(logp=_nan_at(1, 2)), ValueError, r"logp is non-finite at valid position \(1, 2\)"),
        (
            _with(logp_old=_nan_at(3, 0)),
            ValueError,
            r"logp_old is non-finite at valid position \(3, 0\)",
        ),  # noqa: E501
        (_with(rewards=torch.tensor([0.0, math.inf, 1.0, 2.0])), ValueError, r"rewards\[1\]"),
        (_with(rewards=torch.zeros(B + 1)), ValueError, "rewards must have shape"),
        (_with(eps_low=0.0), ValueError, "eps_low must be > 0"),
        (_with(eps_low=-0.2), ValueError, "eps_low"),
        (_with(eps_low=math.nan), ValueError, "eps_low"),
        (_with(eps_high=math.inf), ValueError, "eps_high"),
        (_with(group_size=3), ValueError, "does not divide"),
        (_with(group_size=None), ValueError, "exactly one of group_size"),
        (_with(advantages=torch.zeros(B)), ValueError, "exactly one of rewards"),
        (
            _with(rewards=None, group_size=None, advantages=torch.zeros(B + 1)),
            ValueError,
            "advantages must have shape",
        ),  # noqa: E501
        (
            _with(rewards=None, group_size=None, advantages=torch.zeros(B, T)),
            ValueError,
            "per-token advantages need",
        ),  # noqa: E501
        (_with(logp=torch.zeros(B, T, dtype=torch.long)), ValueError, "logp must be a floating"),
        (
            _with(logp_old=torch.zeros(B, T, dtype=torch.long)),
            ValueError,
            "logp_old must be a floating",
        ),  # noqa: E501
        (_with(logp=[[0.0] * T] * B), TypeError, "logp must be a torch.Tensor"),
        (_with(variant="seq"), ValueError, "variant must be one of"),
        (_with(adv_norm="zscore"), ValueError, "adv_norm"),
        (_with(num_sequences=2), ValueError, "num_sequences=2 is smaller"),
        (_with(logp_old=torch.zeros(B, T, device="meta")), ValueError, "logp_old is on meta"),
        (_with(seq_lens=torch.tensor([1, 2])), ValueError, "not both"),
        (
            _with(mask=None, seq_lens=torch.tensor([3, 3, 3, 3])),
            ValueError,
            "packed logp must have shape",
        ),  # noqa: E501
    ],
)
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        gspo_loss(**kwargs)


@pytest.mark.parametrize(
    "lens, match",
    [
        (dict(seq_lens=torch.tensor([2, 0, 4])), "sequence 1 has 0 valid tokens"),
        (dict(seq_lens=torch.tensor([2, 3])), "cover 5 tokens but logp holds 6"),
        (dict(seq_lens=torch.tensor([2.0, 4.0])), "integer"),
        (dict(cu_seqlens=torch.tensor([1, 3, 6])), "starting at 0"),
        (dict(seq_lens=torch.tensor([], dtype=torch.long)), "no sequences"),
        (dict(seq_lens=torch.tensor([2, 4]), cu_seqlens=torch.tensor([0, 2, 6])), "not both"),
    ],
)
def test_bad_packed_input(lens, match):
    x = torch.zeros(6)
    with pytest.raises(ValueError, match=match):
        gspo_loss(x, x, **lens, advantages=torch.zeros(max(1, len(next(iter(lens.values()))))))


def test_kl_metric_keeps_small_kl():
    # Near on-policy, per-token log-ratios of +-1e-3 give k3 ~ 5e-7 per token; a float32
    # exp(x) - 1 - x would lose it to rounding (exp(1e-3) has ulp ~1.2e-7).
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(64, 256, generator=g, dtype=torch.float64)
    lr = 1e-3 * torch.randn(64, 256, generator=g, dtype=torch.float64)
    mask = torch.ones(64, 256, dtype=torch.bool)
    want = (torch.expm1(lr) - lr).mean().item()
    _, m = gspo_loss(logp.float(), (logp - lr).float(), mask, advantages=torch.zeros(64))
    # the float32 inputs themselves carry ~6e-8 error per log-ratio: 1e-3 relative on k3
    assert m["approx_kl"].item() == pytest.approx(want, rel=2e-2)


def test_second_backward_with_retained_graph_is_right():
    # A second backward through a retained graph gives the same gradient (an in-place
    # backward that consumed a forward buffer once failed this).
    logp, logp_old, mask = ratios_away_from_clip(2, eps=0.2)
    x = logp.clone().requires_grad_(True)
    loss, _ = gspo_loss(x, logp_old, mask, rewards=torch.arange(6.0), group_size=3, eps_low=0.2)
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)
    assert g1.abs().sum() > 0
