"""DPPO (Binary-TV / Binary-KL), VESPO, LUSPO, the MaxRL advantage and the off-policy sequence
mask: gspo_loss against gspo.reference_2026, and docs/spec.md's worked examples.

As tests/test_objectives.py: the reference gives L and dL/dlogp per token in pure Python
(float64); gspo_loss returns -L. Batches are ragged, several groups, padded (garbage in
the padding) or packed. float64 tolerances 1e-10 (sums in different orders ~1e-15 apart;
a wrong term is off by 1e-2 or more).
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gspo import gspo_loss
from gspo.advantages import advantages as group_advantages_t
from gspo.reference import group_advantages, objective_terms
from gspo.reference_2026 import (
    binary_kl,
    dppo_terms,
    luspo_terms,
    maxrl_advantages,
    seq_mask,
    vespo_terms,
)
from test_loss import pack, pad

NEW_2026 = ("dppo-tv", "dppo-kl", "vespo", "luspo")
GARBAGE = [math.nan, math.inf, -math.inf, 1e30]
PARAMS = {
    "dppo-tv": st.sampled_from([{}, {"delta_high": 0.05}, {"delta_low": 0.02, "delta_high": 0.3}]),
    "dppo-kl": st.sampled_from([{}, {"delta_high": 0.01}, {"delta_low": 0.2, "delta_high": 0.02}]),
    "vespo": st.sampled_from([{}, {"k_pos": 1.0, "lambda_pos": 0.5},
                              {"k_neg": 0.0, "lambda_neg": 4.0, "k_pos": 3.0}]),  # fmt: skip
    "luspo": st.sampled_from([{}, {"eps_low": 0.2}, {"eps_low": 0.01, "eps_high": 0.3}]),
}

# docs/spec.md's example for these sections: A = [1, -1] (rewards [1, 0], spec step 1)
NEW = [[-0.2, -1.0], [-0.9, -0.3, -2.0]]
OLD = [[-0.6, -1.2], [-0.5, -0.3, -2.0]]
ADV = [1.0, -1.0]


def make_batch(seed, num_groups, group_size, max_len, spread, shift=0.0):
    """Ragged log-probs <= 0 (DPPO reads them as probabilities) and rewards; ties happen."""
    g = torch.Generator().manual_seed(seed)
    b = num_groups * group_size
    lens = torch.randint(1, max_len + 1, (b,), generator=g).tolist()
    new = [(-3 * torch.rand(n, generator=g, dtype=torch.float64)).tolist() for n in lens]
    off = (shift * (torch.rand(b, generator=g) < 0.3)).tolist()
    old = [[min(x + spread * float(torch.randn(1, generator=g)) - abs(o), 0.0) for x in row]
           for row, o in zip(new, off, strict=True)]  # fmt: skip
    rewards = torch.randint(0, 4, (b,), generator=g).double().div(3).tolist()
    return new, old, rewards


def reference(new, old, rewards, group_size, variant, params, delta=None):
    """(L, [dL/dlogp per token]) of the batch; advantages per group, masked by ``delta``."""
    adv = [a for k in range(0, len(new), group_size)
           for a in group_advantages(rewards[k : k + group_size])]  # fmt: skip
    if delta is not None:
        adv = [a if keep else 0.0 for a, keep in zip(adv, seq_mask(new, old, adv, delta), strict=True)]
    terms = objective_terms(new, old, adv, variant, **params)
    # the scale of the terms bounds the rounding of their sum (e^20-sized ratios cancel)
    scale = max([abs(t.share) for t in terms] + [1.0])
    return math.fsum(t.share for t in terms), [list(t.gradient) for t in terms], scale


batches = st.builds(
    dict,
    seed=st.integers(0, 2**31 - 1),
    num_groups=st.integers(1, 3),
    group_size=st.integers(1, 5),
    max_len=st.integers(1, 9),
    spread=st.sampled_from([0.0, 0.01, 0.3, 1.0]),
    shift=st.sampled_from([0.0, 0.0, 25.0]),
)


@st.composite
def cases(draw):
    variant = draw(st.sampled_from(NEW_2026))
    return variant, draw(PARAMS[variant]), draw(batches)


@given(case=cases(), garbage=st.sampled_from(GARBAGE), delta=st.sampled_from([None, 0.05, 1.0]))
@settings(max_examples=150, deadline=None)
def test_padded_matches_reference(case, garbage, delta):
    variant, params, batch = case
    new, old, rewards = make_batch(**batch)
    g = batch["group_size"]
    want, want_grad, scale = reference(new, old, rewards, g, variant, params, delta)
    logp, mask = pad(new, fill=garbage)
    logp.requires_grad_(True)
    loss, metrics = gspo_loss(logp, pad(old, fill=garbage)[0], mask, variant=variant,
                              rewards=torch.tensor(rewards, dtype=torch.float64), group_size=g,
                              seq_mask_delta=delta, **params)  # fmt: skip
    loss.backward()
    assert loss.item() == pytest.approx(-want, rel=1e-10, abs=1e-12 * scale)
    want_grad_t = pad([[-x for x in row] for row in want_grad])[0]
    torch.testing.assert_close(logp.grad, want_grad_t, rtol=1e-10, atol=1e-12)  # 0 in padding
    assert all(torch.isfinite(v) for v in metrics.values()), metrics


@given(case=cases(), cu=st.booleans(), delta=st.sampled_from([None, 0.05]))
@settings(max_examples=100, deadline=None)
def test_packed_matches_reference(case, cu, delta):
    variant, params, batch = case
    new, old, rewards = make_batch(**batch)
    g = batch["group_size"]
    want, want_grad, scale = reference(new, old, rewards, g, variant, params, delta)
    logp, lens = pack(new)
    logp.requires_grad_(True)
    lens_kw = ({"cu_seqlens": torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])}
               if cu else {"seq_lens": lens})  # fmt: skip
    loss, _ = gspo_loss(logp, pack(old)[0], **lens_kw, variant=variant, group_size=g,
                        rewards=torch.tensor(rewards, dtype=torch.float64),
                        seq_mask_delta=delta, **params)  # fmt: skip
    loss.backward()
    assert loss.item() == pytest.approx(-want, rel=1e-10, abs=1e-12 * scale)
    torch.testing.assert_close(logp.grad, -torch.tensor([x for row in want_grad for x in row],
                                                        dtype=torch.float64),
                               rtol=1e-10, atol=1e-12)  # fmt: skip


@pytest.mark.parametrize("variant", NEW_2026)
@pytest.mark.parametrize("per_token", [False, True], ids=["adv[B]", "adv[B,T]"])
def test_gradcheck(variant, per_token):
    if variant == "luspo" and per_token:
        pytest.skip("luspo's ratio is per sequence: per-token advantages are refused")
    g = torch.Generator().manual_seed(3)
    logp = (-2 * torch.rand(4, 5, generator=g, dtype=torch.float64)).requires_grad_(True)
    logp_old = (logp.detach() + 0.1 * torch.randn(4, 5, generator=g, dtype=torch.float64)).clamp(max=-1e-3)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]).bool()
    adv = torch.tensor([1.0, -1.0, 0.5, -0.3], dtype=torch.float64)
    if per_token:
        adv = adv[:, None] * (1 + torch.rand(4, 5, generator=g, dtype=torch.float64))
    params = {"eps_low": 0.3} if variant == "luspo" else {}  # away from the clip's kinks
    shift = logp.detach() - logp_old

    def f(x):
        # VESPO's phi(w) is detached (its gradient is phi A d logp): moving logp_old with x
        # holds w, and so phi, fixed, where the value's derivative is that gradient
        old = x - shift if variant == "vespo" else logp_old
        return gspo_loss(x, old, mask, advantages=adv, variant=variant, **params)[0]

    assert torch.autograd.gradcheck(f, (logp,), eps=1e-6, atol=1e-8)


# ------------------------------------------------------- docs/spec.md's worked examples


def test_spec_example_dppo():
    # p - p_old: seq 0 (A = +1) 0.2699 > 0.15: token 0 masked; 0.0667 kept, r = e^0.2.
    # seq 1 (A = -1) -0.1999 < -0.15: token 0 masked; tokens 1, 2 unchanged (r = 1), kept.
    # L_0 = (0 + 1.221403) / 2 = 0.610701, L_1 = (0 - 1 - 1) / 3 = -0.666667, L = -0.027983.
    for div in ("tv", "kl"):  # KL: 0.1919 > 0.05 (up, A > 0), 0.0809 > 0.05 (down, A < 0)
        terms = dppo_terms(NEW, OLD, ADV, divergence=div)
        assert [t.weight for t in terms] == [(0.0, 1.0), (0.0, 1.0, 1.0)]
        assert math.fsum(t.share for t in terms) == pytest.approx(-0.027982644, abs=1e-9)
        loss, m = gspo_loss(*pad(NEW)[:1], pad(OLD)[0], pad(NEW)[1], variant=f"dppo-{div}",
                            advantages=torch.tensor(ADV, dtype=torch.float64))  # fmt: skip
        assert loss.item() == pytest.approx(0.027982644, abs=1e-9)
        assert m["mask_frac_high"].item() == pytest.approx(1 / 5) and m["mask_frac_low"].item() == pytest.approx(1 / 5)
    assert binary_kl(-0.6, -0.2) == pytest.approx(0.191915, abs=1e-6)
    assert binary_kl(-1.2, -1.0) == pytest.approx(0.009846, abs=1e-6)
    assert binary_kl(-0.5, -0.9) == pytest.approx(0.080929, abs=1e-6)


def test_spec_example_vespo():
    # w_0 = e^0.6 = 1.822119, phi = w^2 e^(3 (1 - w)) = 0.281857 (k+ = 2, lambda+ = 3);
    # w_1 = e^-0.4 = 0.670320, phi = w^3 e^(2 (1 - w)) = 0.582375 (k- = 3, lambda- = 2).
    # L = (0.281857 * 1 * (-1.2) + 0.582375 * (-1) * (-3.2)) / 5 tokens = 0.305075.
    # A mean log-ratio (GSPO's s_i) would give w_0 = e^0.3 and phi = 0.8005 instead.
    terms = vespo_terms(NEW, OLD, ADV)
    assert terms[0].weight[0] == pytest.approx(0.281857, abs=1e-6)
    assert terms[1].weight[0] == pytest.approx(0.582375, abs=1e-6)
    assert math.fsum(t.share for t in terms) == pytest.approx(0.305075, abs=1e-6)
    logp, mask = pad(NEW)
    logp.requires_grad_(True)
    loss, _ = gspo_loss(logp, pad(OLD)[0], mask, variant="vespo",
                        advantages=torch.tensor(ADV, dtype=torch.float64))  # fmt: skip
    loss.backward()
    assert loss.item() == pytest.approx(-0.305075, abs=1e-6)
    assert logp.grad[0, 0].item() == pytest.approx(-0.281857 / 5, abs=1e-6)  # -phi A / 5


def test_spec_example_luspo():
    # eps 0.2: s_0 = e^0.3 = 1.349859 > 1.2, A > 0: clipped, L_0 = 2 * 1.2 = 2.4 (no gradient);
    # s_1 = e^(-0.4/3) = 0.875173, A < 0: L_1 = 3 * (-0.875173) = -2.625520;
    # L = (2.4 - 2.625520) / 2 = -0.112760; GSPO (no T_i) would give (1.2 - 0.875173) / 2.
    terms = luspo_terms(NEW, OLD, ADV, eps_low=0.2)
    assert [t.objective for t in terms] == pytest.approx([2.4, -2.625520], abs=1e-6)
    assert math.fsum(t.share for t in terms) == pytest.approx(-0.112760, abs=1e-6)
    logp, mask = pad(NEW)
    logp.requires_grad_(True)
    loss, _ = gspo_loss(logp, pad(OLD)[0], mask, variant="luspo", eps_low=0.2,
                        advantages=torch.tensor(ADV, dtype=torch.float64))  # fmt: skip
    loss.backward()
    assert loss.item() == pytest.approx(0.112760, abs=1e-6)
    # every token of sequence 1 gets s_1 A_1 / N = -0.875173 / 2, whatever its length
    assert logp.grad[1].tolist() == pytest.approx([0.437587] * 3, abs=1e-6)


def test_spec_example_seq_mask_and_maxrl():
    # D_1 = mean(old - new) = (0.4 + 0 + 0) / 3 = 0.1333 > 0.1 with A_1 < 0: masked.
    # D_0 = -0.3 (the policy rose): kept whatever its sign.
    assert seq_mask(NEW, OLD, ADV, 0.1) == [True, False]
    assert seq_mask(NEW, OLD, ADV, 0.15) == [True, True]
    loss, m = gspo_loss(*pad(NEW)[:1], pad(OLD)[0], pad(NEW)[1], eps_low=0.2, seq_mask_delta=0.1,
                        advantages=torch.tensor(ADV, dtype=torch.float64))  # fmt: skip
    assert loss.item() == pytest.approx(-1.2 / 2)  # only L_0 = 1.2 is left, divided by B = 2
    assert m["seq_mask_frac"].item() == 0.5
    # MaxRL, rewards [1, 0, 0, 0]: mean 0.25, A = (r - 0.25) / 0.25 = [3, -1, -1, -1]
    # (population std 0.433: [1.732, -0.577, ...]); all-zero rewards: mean 0, A = 0.
    assert maxrl_advantages([1, 0, 0, 0]) == [3.0, -1.0, -1.0, -1.0]
    assert maxrl_advantages([0, 0, 0]) == [0.0, 0.0, 0.0]
    got = group_advantages_t(torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0]), group_size=4, norm="maxrl")
    assert got.tolist() == [3.0, -1.0, -1.0, -1.0, 0.0, 0.0, 0.0, 0.0]


@given(rewards=st.lists(st.sampled_from([0.0, 0.25, 1.0, 2.0, -1.0]), min_size=1, max_size=6))
def test_maxrl_matches_reference(rewards):
    got = group_advantages_t(torch.tensor(rewards, dtype=torch.float64), group_size=len(rewards),
                             norm="maxrl")  # fmt: skip
    assert got.tolist() == pytest.approx(maxrl_advantages(rewards), rel=1e-12, abs=1e-12)


def test_seq_mask_with_per_token_advantages_masks_the_negative_tokens():
    logp, mask = pad(NEW)
    adv = torch.tensor([[1.0, 2.0, 0.0], [-1.0, -0.5, -2.0]], dtype=torch.float64)
    plain, _ = gspo_loss(logp, pad(OLD)[0], mask, advantages=adv * torch.tensor([[1.0], [0.0]]),
                         variant="grpo")  # fmt: skip
    masked, m = gspo_loss(logp, pad(OLD)[0], mask, advantages=adv, variant="grpo",
                          seq_mask_delta=0.1)  # fmt: skip
    assert masked.item() == plain.item() and m["seq_mask_frac"].item() == 0.5


@pytest.mark.parametrize("changes, error, match", [
    (dict(variant="dppo-tv", delta_high=0.0), ValueError, "delta_high must be finite and > 0"),
    (dict(variant="dppo-kl", delta_low=-1.0), ValueError, "delta_low must be finite and > 0"),
    (dict(variant="dppo-tv", eps_low=0.2), ValueError, "DPPO bounds the token probability"),
    (dict(variant="vespo", k_pos=-1.0), ValueError, "k_pos must be finite and >= 0"),
    (dict(variant="vespo", lambda_neg=math.inf), ValueError, "lambda_neg must be finite and >= 0"),
    (dict(variant="vespo", eps_high=0.2), ValueError, "VESPO has no clip range"),
    (dict(variant="vespo", num_sequences=4), ValueError, "pass num_tokens instead"),
    (dict(variant="luspo", delta_high=0.1), ValueError, "applies to variant=dppo-tv / variant=dppo-kl"),
    (dict(variant="gspo", k_pos=1.0), ValueError, "k_pos=1.0 does not apply to variant='gspo'"),
    (dict(variant="gspo", seq_mask_delta=0.0), ValueError, "seq_mask_delta must be finite and > 0"),
    (dict(variant="gspo", delta=0.1), TypeError, "unexpected keyword argument 'delta'"),
    (dict(variant="luspo", advantages=torch.zeros(2, 3)), ValueError, "'luspo' is per sequence"),
])  # fmt: skip
def test_bad_options_name_the_option(changes, error, match):
    logp, mask = pad(NEW)
    kw = {"advantages": torch.tensor(ADV, dtype=torch.float64), **changes}
    with pytest.raises(error, match=match):
        gspo_loss(logp, pad(OLD)[0], mask, **kw)


@pytest.mark.parametrize("loss, extra, want", [
    ("dppo-tv", {}, -0.02798264379329085),
    ("dppo-kl", {}, -0.02798264379329085),
    ("vespo", {}, 0.30507461565686056),
    ("luspo", {"eps_low": 0.2}, -0.11275997856442133),
])  # fmt: skip
def test_gspo_objective_prints_the_spec_examples(loss, extra, want, tmp_path, capsys):
    """`gspo objective --loss NAME` reads the registry: the worked examples above from JSON
    (rewards [1, 0] give A = [1, -1]); --explain ends with the same L."""
    import json

    from gspo.cli import main

    path = tmp_path / "x.json"
    path.write_text(json.dumps({"log_probs_new": NEW, "log_probs_old": OLD, "rewards": [1, 0],
                                **extra}))  # fmt: skip
    assert main(["objective", "--loss", loss, str(path)]) == 0
    assert float(capsys.readouterr().out) == pytest.approx(want, abs=1e-12)
    assert main(["objective", "--loss", loss, "--explain", str(path)]) == 0
    assert capsys.readouterr().out.strip().endswith(repr(want))


@pytest.mark.parametrize("variant, kw", [("vespo", {}), ("dppo-kl", {}), ("dppo-tv", {}),
                                         ("luspo", {"eps_low": 0.2}),
                                         ("gspo", {"seq_mask_delta": 0.05})])  # fmt: skip
@pytest.mark.parametrize("fused", [False, True])
def test_chunked_and_fused_paths_equal_the_plain_loss(variant, kw, fused):
    """gspo_loss_from_hidden (chunked log-probs, and the fused LM-head pass) takes the new
    variants' keywords and gives gspo_loss's value and gradient in the hidden states."""
    from gspo.chunked import gspo_loss_from_hidden
    from gspo.logprobs import naive_token_logprobs

    def plain_logp(h, w, y):
        return naive_token_logprobs(h.reshape(-1, h.shape[-1]), w, y.reshape(-1)).view(y.shape)

    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 11, (3, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]).bool()
    old = plain_logp(h.detach(), w, y) - 0.3 * torch.rand(3, 5, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    got, _ = gspo_loss_from_hidden(h, w, y, old, mask, advantages=adv, variant=variant,
                                   fused=fused, chunk_size=4, **kw)  # fmt: skip
    (got_grad,) = torch.autograd.grad(got, h)
    want, _ = gspo_loss(plain_logp(h, w, y), old, mask, advantages=adv, variant=variant, **kw)
    (want_grad,) = torch.autograd.grad(want, h)
    assert got.item() == pytest.approx(want.item(), rel=1e-12, abs=1e-15)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=1e-14)
