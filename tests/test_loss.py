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
    for variant, a in (("gspo", adv), ("gspo-token", adv_arg)):
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
                        eps_low=0.2, variant="gspo-token")  # fmt: skip
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


@pytest.mark.parametrize("variant", ["gspo", "gspo-token", "grpo"])
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


@pytest.mark.parametrize("variant", ["gspo", "gspo-token", "grpo"])
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


@pytest.mark.parametrize("variant", ["gspo", "gspo-token", "grpo"])
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
        (_with(eps_low=1.5), ValueError, "eps_low must be < 1"),
        (_with(eps_low=1.0), ValueError, "eps_low must be < 1"),
        (_with(max_log_ratio=0.0), ValueError, "max_log_ratio must be > 0"),
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


def naive_sequence_loss(logp, logp_old, layout_kw, adv, eps_low, eps_high, bound=20.0):
    """The docstring's spec code, run through autograd: the oracle for SequenceLoss's backward."""
    dtype = torch.float64
    lr = logp.to(dtype) - logp_old.to(dtype)
    if "mask" in layout_kw:
        mask = layout_kw["mask"]
        seq_lr = torch.where(mask, lr, 0.0).sum(-1) / mask.sum(-1).clamp(min=1)
    else:
        seq_lr = torch.segment_reduce(lr, "sum", lengths=layout_kw["seq_lens"])
        seq_lr = seq_lr / layout_kw["seq_lens"]
    s = seq_lr.clamp(-bound, bound).exp()
    return -torch.minimum(s * adv, s.clamp(1 - eps_low, 1 + eps_high) * adv).sum() / len(adv)


@given(batch=batches, eps=eps_pairs, shift=st.sampled_from([0.0, 0.3, 25.0]), packed=st.booleans())
def test_sequence_backward_equals_autograd_of_the_spec_code(batch, eps, shift, packed):
    # The hand-written backward against autograd through the code it replaces, with
    # sequences clipped below and above, and shifts past the clamp (25 > 20).
    new, old, _ = make_batch(**batch)
    g = torch.Generator().manual_seed(batch["seed"])
    offsets = shift * (2 * torch.rand(len(new), generator=g, dtype=torch.float64) - 1)
    old = [[x - float(o) for x in row] for row, o in zip(old, offsets, strict=True)]
    adv = torch.randn(len(new), generator=g, dtype=torch.float64)
    if packed:
        logp, lens = pack(new)
        logp_old, _ = pack(old)
        layout_kw = {"seq_lens": lens}
    else:
        logp, mask = pad(new, fill=math.nan)
        logp_old, _ = pad(old, fill=math.inf)
        layout_kw = {"mask": mask}
    got_x, want_x = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    got, _ = gspo_loss(got_x, logp_old, **layout_kw, advantages=adv, eps_low=eps[0],
                       eps_high=eps[1])  # fmt: skip
    clean_x = torch.nan_to_num(want_x, nan=0.0) if not packed else want_x
    want = naive_sequence_loss(clean_x, torch.nan_to_num(logp_old, posinf=0.0), layout_kw, adv,
                               *eps)  # fmt: skip
    got.backward()
    want.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-12, abs=1e-12)
    torch.testing.assert_close(got_x.grad, torch.nan_to_num(want_x.grad), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_padded_equals_packed(dtype):
    # Upcast happens before the subtraction in both layouts, so they agree to float32
    # rounding. A subtraction in bf16 (fused.py once did that for padded input) rounds
    # logp - logp_old to 8 bits wherever the two are not within a factor of 2 of each
    # other (Sterbenz), hence the wide spread (1.0) between them here.
    new, old, rewards = make_batch(11, 8, 8, 300, 1.0)
    r = torch.tensor(rewards)
    padded, mask = pad(new, dtype=dtype)
    padded_old, _ = pad(old, dtype=dtype)
    packed, lens = padded[mask], mask.sum(-1)
    kw = dict(rewards=r, group_size=8, eps_low=0.2)
    x_pad, x_pack = padded.clone().requires_grad_(True), packed.clone().requires_grad_(True)
    loss_pad, _ = gspo_loss(x_pad, padded_old, mask, **kw)
    loss_pack, _ = gspo_loss(x_pack, padded_old[mask], seq_lens=lens, **kw)
    assert loss_pad.dtype == loss_pack.dtype == torch.float32
    assert loss_pad.item() == pytest.approx(loss_pack.item(), rel=1e-6, abs=1e-7)
    loss_pad.backward()
    loss_pack.backward()
    assert x_pad.grad.dtype == dtype
    torch.testing.assert_close(x_pad.grad[mask], x_pack.grad, rtol=0, atol=0)


@pytest.mark.parametrize(
    "new_dtype, old_dtype, compute",
    [(torch.float32, torch.float64, torch.float64), (torch.float64, torch.float32, torch.float64),
     (torch.bfloat16, torch.float32, torch.float32), (torch.float32, torch.float16, torch.float32)],
)  # fmt: skip
def test_mixed_dtypes_compute_in_the_wider_one(new_dtype, old_dtype, compute):
    # docs/loss.md: mixed float dtypes are accepted (a bf16 policy against float32 sampler
    # log-probs is common); both are upcast to float64 if either is, else float32.
    # The result equals the same values upcast by hand: nothing is rounded to the narrower.
    new, old, rewards = make_batch(12, 4, 4, 40, 0.1)
    logp, mask = pad(new, dtype=new_dtype)
    logp_old, _ = pad(old, dtype=old_dtype)
    kw = dict(rewards=torch.tensor(rewards), group_size=4, eps_low=0.2)
    got, _ = gspo_loss(logp, logp_old, mask, **kw)
    want, _ = gspo_loss(logp.to(compute), logp_old.to(compute), mask, **kw)
    assert got.dtype == compute
    assert got.item() == want.item()


def test_mismatched_dtype_that_is_not_float_is_refused():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="logp_old must be a floating-point tensor"):
        gspo_loss(x, x.long(), torch.ones(2, 3, dtype=torch.bool), advantages=torch.zeros(2))


def test_same_clamp_rule_as_the_reference():
    # A mean log-ratio of 1000 overflows exp in both float32 and float64; both the
    # loss and the reference (and so `gspo objective`) hold it at e^20 (MAX_LOG_RATIO).
    new, old, rewards = [[1000.0], [0.0]], [[0.0], [0.0]], [0.0, 1.0]
    ref = sequence_objective(new, old, rewards, 0.2)
    assert ref == pytest.approx((-math.exp(20) + 1.0) / 2, rel=1e-12)  # A = [-1, 1]
    for dtype in (torch.float32, torch.float64):
        loss, _ = gspo_loss(torch.tensor(new, dtype=dtype), torch.tensor(old, dtype=dtype),
                            torch.ones(2, 1, dtype=torch.bool), rewards=torch.tensor(rewards),
                            group_size=2, eps_low=0.2)  # fmt: skip
        assert loss.item() == pytest.approx(-ref, rel=1e-6)


def test_eps_high_may_exceed_one():
    # Only the lower bound 1 - eps_low must stay a positive ratio; 1 + 1.5 is one.
    logp = torch.tensor([[0.5]], dtype=torch.float64)
    loss, _ = gspo_loss(logp, torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool),
                        advantages=torch.ones(1), eps_low=0.2, eps_high=1.5)  # fmt: skip
    assert loss.item() == pytest.approx(-math.exp(0.5))  # e^0.5 < 2.5: unclipped


def test_kl_metric_is_optional():
    logp, logp_old, mask = ratios_away_from_clip(3, eps=0.2)
    kw = dict(advantages=torch.arange(6.0), eps_low=0.2)
    loss_on, on = gspo_loss(logp, logp_old, mask, **kw)
    loss_off, off = gspo_loss(logp, logp_old, mask, kl_metric=False, **kw)
    assert "approx_kl" in on and "approx_kl" not in off and on["approx_kl"].item() > 0
    assert loss_on.item() == loss_off.item()
    assert {k: v.item() for k, v in off.items()} == {
        k: v.item() for k, v in on.items() if k != "approx_kl"
    }
