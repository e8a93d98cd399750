"""SAPO, CISPO and GMPO: gspo_loss(variant=...) against gspo.reference, and the spec's examples.

The reference gives L and dL/dlogp per token in pure Python (float64); gspo_loss returns
-L, so its gradient is the reference's negated. Batches are ragged, several groups,
padded ([B,T] + mask, garbage in the padding) or packed ([N] + seq_lens / cu_seqlens).
Tolerances: float64 1e-10 (the two sum in different orders: ~1e-15 apart; a wrong
term is off by 1e-2 or more); float32 / bfloat16 inputs are compared with float64 on
the same rounded values, which the float32 arithmetic must meet to ~1e-6 relative.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gspo import gspo_loss
from gspo.chunked import gspo_loss_from_hidden
from gspo.logprobs import naive_token_logprobs
from gspo.reference import (
    explain_token_objective,
    group_advantages,
    objective,
    objective_terms,
)
from test_loss import pack, pad  # the padded and packed layouts of a ragged batch

VARIANTS = ("sapo", "cispo", "gmpo")
GARBAGE = [math.nan, math.inf, -math.inf, 1e30]
# The parameters each variant takes, as gspo_loss keywords and as reference keywords.
PARAMS = {
    "sapo": st.sampled_from([{}, {"tau_pos": 1.0, "tau_neg": 1.05}, {"tau_pos": 0.5, "tau_neg": 3.0}]),
    "cispo": st.sampled_from([{}, {"eps_high": 0.2}, {"eps_high": 0.28, "eps_low": 0.2}]),
    "gmpo": st.sampled_from([{}, {"eps_low": 0.4}, {"eps_low": 0.1, "eps_high": 0.3}]),
}

# docs/spec.md's worked example, shared by the three sections.
NEW = [[-0.5, -1.0], [-0.7, -0.2]]
OLD = [[-1.0, -1.0], [-0.2, -0.4]]
REWARDS = [1.0, 0.0]  # A = [1, -1]; d = [[0.5, 0.0], [-0.5, 0.2]]


def make_batch(seed, num_groups, group_size, max_len, spread, shift=0.0):
    """Ragged per-sequence token lists and rewards (python floats); ties happen."""
    g = torch.Generator().manual_seed(seed)
    b = num_groups * group_size
    lens = torch.randint(1, max_len + 1, (b,), generator=g).tolist()
    new = [(-3 * torch.rand(n, generator=g, dtype=torch.float64)).tolist() for n in lens]
    # per-token noise moves ratios off 1 and past every clip / cap / gate knee; a shift of
    # some sequences past MAX_LOG_RATIO (20) checks the clamp rule is the same in both
    off = (shift * (torch.rand(b, generator=g) < 0.3)).tolist()
    old = [[x + spread * float(torch.randn(1, generator=g)) + o for x in row]
           for row, o in zip(new, off, strict=True)]  # fmt: skip
    rewards = torch.randint(0, 4, (b,), generator=g).double().div(3).tolist()
    return new, old, rewards


def reference(new, old, rewards, group_size, variant, params, terms_out=None):
    """(L, [dL/dlogp per token]) of the whole batch: advantages per group (spec step 1)."""
    adv = [a for k in range(0, len(new), group_size) for a in group_advantages(rewards[k : k + group_size])]
    terms = objective_terms(new, old, adv, variant, **params)
    if terms_out is not None:
        terms_out.extend(terms)
    return math.fsum(t.share for t in terms), [list(t.gradient) for t in terms]


def reference_metric(variant, params, terms):
    """The variant's first metric from the reference's per-token terms."""
    tokens = sum(len(t.ratio) for t in terms)
    if variant == "sapo":  # mean gate weight 4 s (1 - s)
        return "gate_weight_mean", math.fsum(w for t in terms for w in t.weight) / tokens
    if variant == "cispo":  # share of tokens whose weight is the cap
        cap = 1 + params.get("eps_high", 4.0)
        return "bound_frac_high", sum(r > cap for t in terms for r in t.ratio) / tokens
    # gmpo: share of tokens with A > 0 whose log-ratio is cut at eps_high
    hi = params.get("eps_high", params.get("eps_low", 0.4))
    return "clip_frac_high", sum(t.advantage > 0 and d > hi for t in terms for d in t.log_ratio) / tokens


batches = st.builds(
    dict,
    seed=st.integers(0, 2**31 - 1),
    num_groups=st.integers(1, 3),
    group_size=st.integers(1, 5),
    max_len=st.integers(1, 9),
    spread=st.sampled_from([0.0, 0.01, 0.3, 1.0, 3.0]),
    shift=st.sampled_from([0.0, 0.0, 25.0, -25.0]),
)


@st.composite
def cases(draw):
    variant = draw(st.sampled_from(VARIANTS))
    return variant, draw(PARAMS[variant]), draw(batches)


@given(case=cases(), garbage=st.sampled_from(GARBAGE))
def test_padded_matches_reference(case, garbage):
    variant, params, batch = case
    new, old, rewards = make_batch(**batch)
    g = batch["group_size"]
    terms = []
    want, want_grad = reference(new, old, rewards, g, variant, params, terms)
    logp, mask = pad(new, fill=garbage)
    logp.requires_grad_(True)
    loss, metrics = gspo_loss(logp, pad(old, fill=garbage)[0], mask, rewards=torch.tensor(rewards, dtype=torch.float64),
                              group_size=g, variant=variant, **params)  # fmt: skip
    loss.backward()
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(-want, rel=1e-10, abs=1e-10)
    want_grad_t = pad([[-x for x in row] for row in want_grad])[0]
    torch.testing.assert_close(logp.grad, want_grad_t, rtol=1e-10, atol=1e-12)  # 0 in padding
    assert all(torch.isfinite(v) for v in metrics.values())
    name, value = reference_metric(variant, params, terms)
    assert metrics[name].item() == pytest.approx(value, rel=1e-12, abs=1e-15), name


@given(case=cases(), cu=st.booleans())
def test_packed_matches_reference(case, cu):
    variant, params, batch = case
    new, old, rewards = make_batch(**batch)
    g = batch["group_size"]
    want, want_grad = reference(new, old, rewards, g, variant, params)
    logp, lens = pack(new)
    logp.requires_grad_(True)
    lens_kw = {"cu_seqlens": torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])} if cu \
        else {"seq_lens": lens}  # fmt: skip
    loss, _ = gspo_loss(logp, pack(old)[0], **lens_kw, rewards=torch.tensor(rewards, dtype=torch.float64), group_size=g,
                        variant=variant, **params)  # fmt: skip
    loss.backward()
    assert loss.item() == pytest.approx(-want, rel=1e-10, abs=1e-10)
    flat = torch.tensor([-x for row in want_grad for x in row], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, flat, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------ docs/spec.md's examples


def test_sapo_spec_example():
    # d = [[0.5, 0], [-0.5, 0.2]], A = [1, -1]; tau = 1 for sequence 0, 1.05 for sequence 1.
    # g(e^0.5) = 4 sigmoid(0.648721) = 2.626889, g(1) = 2 -> L_0 = 2.313444;
    # g(e^-0.5) = (4/1.05) sigmoid(-0.413143) = 1.516795, g(e^0.2) = (4/1.05) sigmoid(0.232473)
    # = 2.125173 -> L_1 = -1.820984; L = (2.313444 - 1.820984) / 2 = 0.246230.
    # tau picked by the wrong sign (1.05 for A > 0, 1 for A < 0) would give 0.150560.
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    l0 = (4 * s(math.exp(0.5) - 1) + 2.0) / 2
    l1 = -(4 / 1.05) * (s(1.05 * (math.exp(-0.5) - 1)) + s(1.05 * (math.exp(0.2) - 1))) / 2
    assert objective(NEW, OLD, REWARDS, "sapo") == pytest.approx((l0 + l1) / 2, abs=1e-15)
    assert objective(NEW, OLD, REWARDS, "sapo") == pytest.approx(0.24623018673537467, abs=1e-15)
    swapped = objective(NEW, OLD, REWARDS, "sapo", tau_pos=1.05, tau_neg=1.0)
    assert swapped == pytest.approx(0.150560, abs=1e-6)


def test_cispo_spec_example():
    # eps_high 0.2: w = [[min(e^0.5, 1.2), 1], [e^-0.5, min(e^0.2, 1.2)]] = [[1.2, 1], [0.606531, 1.2]]
    # sum w A logp = (1.2 * -0.5 + 1 * -1.0) - (0.606531 * -0.7 + 1.2 * -0.2) = -0.935429;
    # L = -0.935429 / 4 = -0.233857. Dividing by the sequences (2) instead gives -0.4677;
    # a lower bound of 1 - 0.2 = 0.8 (not MiniMax-M1's) lifts 0.606531 to 0.8: L = -0.2.
    want = (1.2 * -0.5 - 1.0 - (math.exp(-0.5) * -0.7 + 1.2 * -0.2)) / 4
    assert objective(NEW, OLD, REWARDS, "cispo", eps_high=0.2) == pytest.approx(want, abs=1e-15)
    assert want == pytest.approx(-0.23385713455028917, abs=1e-15)
    got = objective(NEW, OLD, REWARDS, "cispo", eps_high=0.2, eps_low=0.2)
    assert got == pytest.approx(-0.2, abs=1e-15)
    assert objective(NEW, OLD, REWARDS, "cispo") == pytest.approx(-0.2888771554797967, abs=1e-15)
    # the gradient is w A / sum T, also where w is capped: [[0.3, 0.25], [-0.151633, -0.3]]
    grads = [x for t in objective_terms(NEW, OLD, [1.0, -1.0], "cispo", eps_high=0.2) for x in t.gradient]
    assert grads == pytest.approx([0.3, 0.25, -math.exp(-0.5) / 4, -0.3], abs=1e-15)


def test_gmpo_spec_example():
    # eps 0.4: A = 1: m = min(d, clip d) = [0.4, 0] (0.5 cut) -> L_0 = e^0.2 = 1.221403;
    # A = -1: m = max(d, clip d) = [-0.4, 0.2] (-0.5 cut) -> L_1 = -e^-0.1 = -0.904837;
    # L = 0.158283. Without the clip (plain geometric mean): (e^0.25 - e^-0.15) / 2 = 0.211659.
    want = (math.exp(0.2) - math.exp(-0.1)) / 2
    assert objective(NEW, OLD, REWARDS, "gmpo") == pytest.approx(want, abs=1e-15)
    assert want == pytest.approx(0.15828267006210517, abs=1e-15)
    no_clip = objective(NEW, OLD, REWARDS, "gmpo", eps_low=100.0)
    assert no_clip == pytest.approx((math.exp(0.25) - math.exp(-0.15)) / 2, abs=1e-15)
    # cut tokens pass no gradient; the others A exp(mean m) / (T_i N)
    grads = [x for t in objective_terms(NEW, OLD, [1.0, -1.0], "gmpo") for x in t.gradient]
    assert grads == pytest.approx([0.0, math.exp(0.2) / 4, 0.0, -math.exp(-0.1) / 4], abs=1e-15)


@pytest.mark.parametrize("variant, params", [("sapo", {}), ("cispo", {"eps_high": 0.2}), ("gmpo", {})])
def test_spec_example_batched_with_metrics(variant, params):
    logp = torch.tensor(NEW, dtype=torch.float64)
    loss, m = gspo_loss(logp, torch.tensor(OLD, dtype=torch.float64), torch.ones(2, 2, dtype=torch.bool),
                        rewards=torch.tensor(REWARDS, dtype=torch.float64), group_size=2, variant=variant, **params)  # fmt: skip
    assert loss.item() == pytest.approx(-objective(NEW, OLD, REWARDS, variant, **params), abs=1e-15)
    if variant == "sapo":  # weights 4 s (1 - s) = [0.901753, 1, 0.958513, 0.986610]: none < 0.5
        assert m["gate_weight_mean"].item() == pytest.approx(0.961719, abs=1e-6)
        assert m["gate_weight_low_frac"].item() == 0.0
    elif variant == "cispo":  # e^0.5 and e^0.2 pass 1.2: two tokens of four at the cap
        assert (m["bound_frac_high"].item(), m["bound_frac_low"].item()) == (0.5, 0.0)
    else:  # 0.5 cut above (A > 0), -0.5 cut below (A < 0)
        assert (m["clip_frac_low"].item(), m["clip_frac_high"].item()) == (0.25, 0.25)
    assert m["ratio_max"].item() == pytest.approx(math.exp(0.5))


def test_sapo_gate_weight_below_half():
    # r = e^2 = 7.389 with tau 1: s = sigmoid(6.389) = 0.99832, 4 s (1 - s) = 0.0067 < 0.5
    logp = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    _, m = gspo_loss(logp, torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool),
                     advantages=torch.ones(1), variant="sapo")  # fmt: skip
    assert m["gate_weight_low_frac"].item() == 0.5
    s = 1 / (1 + math.exp(-(math.exp(2) - 1)))
    assert m["gate_weight_mean"].item() == pytest.approx((4 * s * (1 - s) + 1) / 2, rel=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
def test_tied_groups_give_exactly_zero(variant):
    # every group's rewards are equal: A = 0 exactly, so L and its gradient are exactly 0
    new, old, _ = make_batch(4, 3, 4, 7, 1.0)
    logp, mask = pad(new, fill=math.nan)
    logp.requires_grad_(True)
    rewards = torch.tensor([0.1] * 4 + [0.7] * 4 + [1.0] * 4)
    loss, m = gspo_loss(logp, pad(old, fill=math.inf)[0], mask, rewards=rewards, group_size=4,
                        variant=variant)  # fmt: skip
    loss.backward()
    assert loss.item() == 0.0 and (logp.grad == 0).all() and m["zero_adv_frac"].item() == 1.0
    assert objective(new[:4], old[:4], [0.1] * 4, variant) == 0.0
    assert objective(NEW, OLD, [0.5, 0.5], variant) == 0.0  # docs/spec.md's tie example


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("variant", ["sapo", "cispo"])
def test_on_policy_gradient_is_the_policy_gradient(variant, dtype):
    # At r = 1 (logp_old = logp): SAPO's 4 s (1 - s) r = 4 * 1/4 * 1 = 1, so dL/dlogp_t =
    # A_i / (T_i B); CISPO's w = 1, so dL/dlogp_t = A_i / sum T. The loss is -L.
    new, _, rewards = make_batch(5, 3, 4, 9, 0.0)
    logp, mask = pad(new, dtype=dtype)
    logp.requires_grad_(True)
    adv = torch.randn(len(new), generator=torch.Generator().manual_seed(0), dtype=dtype)
    loss, _ = gspo_loss(logp, logp.detach(), mask, advantages=adv, variant=variant)
    loss.backward()
    count = mask.sum(-1, keepdim=True).to(dtype)
    per = count * len(new) if variant == "sapo" else mask.sum().to(dtype)
    want = torch.where(mask, -adv[:, None] / per, 0.0)
    tol = 1e-15 if dtype == torch.float64 else 1e-7
    torch.testing.assert_close(logp.grad, want, rtol=tol, atol=tol * 1e-2)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("garbage", GARBAGE)
def test_garbage_in_padding_changes_nothing(variant, garbage):
    new, old, rewards = make_batch(6, 2, 3, 6, 0.5)
    results = []
    for fill in (0.0, garbage):
        logp, mask = pad(new, fill=fill)
        logp.requires_grad_(True)
        loss, metrics = gspo_loss(logp, pad(old, fill=fill)[0], mask, rewards=torch.tensor(rewards, dtype=torch.float64),
                                  group_size=3, variant=variant)  # fmt: skip
        loss.backward()
        results.append((loss.item(), logp.grad, {k: v.item() for k, v in metrics.items()}))
    (v0, g0, m0), (v1, g1, m1) = results
    assert v0 == v1 and m0 == m1
    torch.testing.assert_close(g0, g1, rtol=0, atol=0)
    assert (g1[~pad(new)[1]] == 0).all()


def away_from_kinks(seed):
    """Padded float64 batch whose token log-ratios sit >= 0.05 from GMPO's clip at +-0.4."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(6, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(6, 5, generator=g) < 0.7
    mask[:, 0] = True
    d = torch.tensor([-0.9, -0.2, 0.0, 0.1, 0.3, 0.8], dtype=torch.float64)
    d = d[torch.randint(0, 6, (6, 5), generator=g)]
    return logp, logp - d, mask


@pytest.mark.parametrize("variant", ["sapo", "gmpo"])
def test_gradcheck_float64(variant):
    logp, logp_old, mask = away_from_kinks(0)
    rewards = torch.tensor([0.1, 0.9, 0.4, 0.3, 0.3, 0.8], dtype=torch.float64)

    def f(x):
        return gspo_loss(x, logp_old, mask, rewards=rewards, group_size=3, variant=variant)[0]

    assert torch.autograd.gradcheck(f, (logp.clone().requires_grad_(True),))


def test_cispo_gradcheck_where_every_weight_is_capped():
    # CISPO's gradient is w A / sum T with w held fixed (sg): the derivative of its value
    # only where w does not move with logp, i.e. every ratio above the cap 1 + eps_high.
    logp, logp_old, mask = away_from_kinks(1)
    logp_old = logp - 0.5 - torch.rand(logp.shape, dtype=torch.float64)  # r >= e^0.5 > 1.2
    adv = torch.tensor([1.0, -0.5, 0.3, 2.0, -1.0, 0.7], dtype=torch.float64)

    def f(x):
        return gspo_loss(x, logp_old, mask, advantages=adv, variant="cispo", eps_high=0.2)[0]

    assert torch.autograd.gradcheck(f, (logp.clone().requires_grad_(True),))


@pytest.mark.parametrize("variant", VARIANTS)
def test_data_parallel_divisors(variant):
    # Two "ranks" each holding half the batch, with the global divisor (num_tokens for
    # CISPO, num_sequences for the others), sum to the whole batch's loss and gradient.
    new, old, _ = make_batch(7, 2, 4, 9, 0.5)
    adv = torch.randn(8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    logp, mask = pad(new)
    logp.requires_grad_(True)
    full, _ = gspo_loss(logp, pad(old)[0], mask, advantages=adv, variant=variant)
    (want,) = torch.autograd.grad(full, logp)
    key = "num_tokens" if variant == "cispo" else "num_sequences"
    total = int(mask.sum()) if variant == "cispo" else 8
    parts, grads = [], []
    for rows in (slice(0, 3), slice(3, 8)):
        x, m = pad(new[rows])
        x.requires_grad_(True)
        loss, _ = gspo_loss(x, pad(old[rows])[0], m, advantages=adv[rows], variant=variant,
                            **{key: total})  # fmt: skip
        parts.append(loss.item())
        grads.append(torch.autograd.grad(loss, x)[0][m])
    assert sum(parts) == pytest.approx(full.item(), rel=1e-12)
    torch.testing.assert_close(torch.cat(grads), want[mask], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("variant", ["sapo", "cispo"])
def test_per_token_advantages_equal_per_sequence_when_constant(variant):
    new, old, _ = make_batch(8, 2, 3, 7, 0.5)
    logp, mask = pad(new, fill=math.nan)
    logp_old = pad(old, fill=math.nan)[0]
    adv = torch.randn(6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = []
    for a in (adv, adv[:, None].expand_as(logp).clone()):
        x = logp.clone().requires_grad_(True)
        loss, _ = gspo_loss(x, logp_old, mask, advantages=a, variant=variant)
        out.append((loss.item(), torch.autograd.grad(loss, x)[0]))
    assert out[0][0] == pytest.approx(out[1][0], abs=1e-14)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_compute_in_float32(variant, dtype):
    # The inputs are rounded to dtype; float32 arithmetic on them must then match float64
    # arithmetic on the same rounded values to ~1e-6 of the loss's scale, padded and packed.
    new, old, rewards = make_batch(9, 4, 8, 200, 0.3)
    logp, mask = pad(new, dtype=dtype)
    logp_old = pad(old, dtype=dtype)[0]
    kw = dict(rewards=torch.tensor(rewards, dtype=torch.float64), group_size=8, variant=variant)
    got, _ = gspo_loss(logp, logp_old, mask, **kw)
    packed, _ = gspo_loss(logp[mask], logp_old[mask], seq_lens=mask.sum(-1), **kw)
    exact, _ = gspo_loss(logp.double(), logp_old.double(), mask, **kw)
    assert got.dtype == packed.dtype == torch.float32
    scale = max(1.0, abs(exact.item()))
    assert abs(got.item() - exact.item()) <= 2e-6 * scale
    assert abs(packed.item() - exact.item()) <= 2e-6 * scale


# ------------------------------------------------------------ hidden states -> loss


def hidden_batch(seed=0, lens=(5, 9, 3, 7), h=16, v=120):
    g = torch.Generator().manual_seed(seed)
    n = sum(lens)
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    weight = torch.randn(v, h, generator=g).requires_grad_()
    bias = torch.randn(v, generator=g).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    logp_old = naive_token_logprobs(hidden, weight, labels, bias=bias).detach()
    logp_old = logp_old + 0.5 * torch.randn(n, generator=g)  # ratios on both sides of every knee
    return hidden, weight, bias, labels, logp_old, torch.tensor(lens)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fused, chunk", [(False, 4), (True, 1), (True, 6), (True, 100)])
def test_from_hidden_equals_logp_then_loss(variant, fused, chunk):
    # C=6: blocks of whole sequences, the 9- and 7-token ones longer than C (two passes).
    hidden, weight, bias, labels, logp_old, lens = hidden_batch(seed=chunk)
    kw = dict(seq_lens=lens, rewards=torch.tensor([1.0, 0.0, 0.5, 0.2]), group_size=2,
              variant=variant)  # fmt: skip
    loss, metrics = gspo_loss_from_hidden(hidden, weight, labels, logp_old, bias=bias,
                                          temperature=0.9, chunk_size=chunk, fused=fused, **kw)  # fmt: skip
    logp = naive_token_logprobs(hidden, weight, labels, bias=bias, temperature=0.9)
    want, want_metrics = gspo_loss(logp, logp_old, **kw)
    inputs = (hidden, weight, bias)
    got_g, want_g = torch.autograd.grad(loss, inputs), torch.autograd.grad(want, inputs)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    for g, w in zip(got_g, want_g, strict=True):
        assert w.abs().max() > 0 and (g - w).abs().max() <= 1e-5 * w.abs().max()
    assert metrics.keys() == want_metrics.keys()
    for k in metrics:
        assert metrics[k].item() == pytest.approx(want_metrics[k].item(), rel=1e-5, abs=1e-6), k


def test_from_hidden_padded_cispo_ignores_garbage_labels():
    hidden, weight, bias, labels, _, _ = hidden_batch(seed=3, lens=(4, 4, 4))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    labels2 = labels.clone().view(3, 4)
    labels2[~mask] = 10**6  # garbage where the mask is False
    logp_old = -torch.rand(3, 4, generator=torch.Generator().manual_seed(0))
    kw = dict(mask=mask, advantages=torch.tensor([1.0, -0.5, 0.3]), variant="cispo", eps_high=0.2)
    loss, _ = gspo_loss_from_hidden(hidden.view(3, 4, -1), weight, labels2, logp_old, bias=bias,
                                    chunk_size=5, **kw)  # fmt: skip
    safe = torch.where(mask, labels2, -100).view(-1)
    logp = naive_token_logprobs(hidden, weight, safe, bias=bias).view(3, 4)
    want, _ = gspo_loss(logp, logp_old, **kw)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    got_g, want_g = torch.autograd.grad(loss, hidden), torch.autograd.grad(want, hidden)
    assert (got_g[0] - want_g[0]).abs().max() <= 1e-5 * want_g[0].abs().max()


# ------------------------------------------------------------ errors


B, T = 4, 3
OK = dict(logp=torch.zeros(B, T), logp_old=torch.zeros(B, T), mask=torch.ones(B, T, dtype=torch.bool),
          advantages=torch.arange(B, dtype=torch.float32))  # fmt: skip


@pytest.mark.parametrize(
    "changes, error, match",
    [
        (dict(variant="gspo", tau_pos=1.0), ValueError, r"tau_pos=1.0 does not apply to variant='gspo'"),
        (dict(variant="gmpo", tau_neg=1.0), ValueError, "tau_neg=1.0 does not apply to variant='gmpo'"),
        (dict(variant="sapo", eps_low=0.2), ValueError, "SAPO has no clip range"),
        (dict(variant="sapo", eps_high=0.2), ValueError, "eps_high=0.2 does not apply"),
        (dict(variant="cispo", num_sequences=8), ValueError, "pass num_tokens instead"),
        (dict(variant="gspo", num_tokens=12), ValueError, "pass num_sequences instead"),
        (dict(variant="sapo", tau_pos=0.0), ValueError, "tau_pos must be finite and > 0"),
        (dict(variant="sapo", tau_neg=math.inf), ValueError, "tau_neg must be finite and > 0"),
        (dict(variant="sapo", tau_pos="1"), TypeError, "tau_pos must be a number"),
        (dict(variant="cispo", eps_high=-1.0), ValueError, "eps_high must be finite and > 0"),
        (dict(variant="cispo", eps_low=1.0), ValueError, "eps_low must be < 1"),
        (dict(variant="gmpo", eps_low=0.0), ValueError, "eps_low must be finite and > 0"),
        (dict(variant="cispo", num_tokens=11), ValueError, "num_tokens=11 is smaller than this batch's 12"),
        (dict(variant="cispo", num_tokens=12.0), TypeError, "num_tokens must be an int"),
        (dict(variant="gmpo", advantages=torch.zeros(B, T)), ValueError, "'gmpo' is per sequence"),
        (dict(variant="gmpo", logp=torch.full((B, T), math.nan)), ValueError, "logp is non-finite"),
    ],
)
def test_bad_input_names_the_argument(changes, error, match):
    with pytest.raises(error, match=match):
        gspo_loss(**{**OK, **changes})


def test_gmpo_log_space_clip_may_exceed_one():
    # GMPO clips the log-ratio: eps_low = 1.5 is the ratio bound e^-1.5 > 0, a valid range
    loss, _ = gspo_loss(**{**OK, "variant": "gmpo", "eps_low": 1.5})
    assert torch.isfinite(loss)


def test_gspo_default_clip_range_is_unchanged():
    # eps_low's default became None so each variant can have its own; GSPO's stays 3e-4.
    new, old, rewards = make_batch(10, 2, 4, 6, 0.01)
    logp, mask = pad(new)
    kw = dict(rewards=torch.tensor(rewards, dtype=torch.float64), group_size=4)
    default, _ = gspo_loss(logp, pad(old)[0], mask, **kw)
    explicit, _ = gspo_loss(logp, pad(old)[0], mask, eps_low=3e-4, eps_high=3e-4, **kw)
    assert default.item() == explicit.item()


def test_explain_table():
    text = explain_token_objective(NEW, OLD, REWARDS, "gmpo")
    assert "m_t" in text and "passes" in text and " no " in text
    assert text.splitlines()[-1] == f"L = mean_i L_i = {objective(NEW, OLD, REWARDS, 'gmpo')!r}"
    text = explain_token_objective(NEW, OLD, REWARDS, "cispo", eps_high=0.2)
    assert "1.200000" in text and "sum_i (sum_t w_t A_i logp_t) / sum_i T_i" in text
