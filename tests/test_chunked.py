"""token_logprobs (chunked) against naive_token_logprobs: values and gradients.

Tolerance: float32 results agree to 1e-5 of each tensor's largest entry
(`assert_close_rel`). The two paths sum the same terms in a different order, so
they differ by float32 rounding of the largest terms; an entry that cancels to
near 0 cannot be held to 1e-5 of itself. A wrong gradient term, a missing
temperature factor or an off-by-one chunk boundary shows up at order 1e-1 to 1.
bfloat16: see its test.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gspo.chunked import gspo_loss_from_hidden, token_logprobs
from gspo.logprobs import naive_token_logprobs

REL = 1e-5


def assert_close_rel(got, want, rel=REL):
    """max |got - want| <= rel * max |want| (a normwise relative error), same dtype/shape."""
    assert got.shape == want.shape and got.dtype == want.dtype
    scale = want.abs().max() if want.numel() else 0.0
    err = (got - want).abs().max() if want.numel() else 0.0
    assert err <= rel * scale + 1e-30, f"max error {float(err):.3g} > {rel} * {float(scale):.3g}"


def make(n, h, v, *, dtype=torch.float32, seed=0, ignore=(), bias=True, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * scale).to(dtype).requires_grad_()
    weight = torch.randn(v, h, generator=g).to(dtype).requires_grad_()
    b = torch.randn(v, generator=g).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    for i in ignore:
        labels[i] = -100
    return hidden, weight, b, labels


def values_and_grads(fn, hidden, weight, bias, labels, *, entropy=False, seed=1, **kw):
    """fn's outputs and the gradients of a random linear function of them."""
    out = fn(hidden, weight, labels, bias=bias, return_entropy=entropy, **kw)
    outs = out if entropy else (out,)
    g = torch.Generator().manual_seed(seed)
    total = sum((o * torch.randn(o.shape, generator=g).to(o.dtype)).sum() for o in outs)
    inputs = [x for x in (hidden, weight, bias) if x is not None]
    grads = torch.autograd.grad(total, inputs)
    return [o.detach() for o in outs], list(grads)


def assert_matches(hidden, weight, bias, labels, *, entropy=False, rel=REL, **kw):
    want = values_and_grads(
        naive_token_logprobs,
        hidden,
        weight,
        bias,
        labels,
        entropy=entropy,
        temperature=kw.get("temperature", 1.0),
    )
    got = values_and_grads(token_logprobs, hidden, weight, bias, labels, entropy=entropy, **kw)
    for w, g in zip(want[0] + want[1], got[0] + got[1], strict=True):
        assert_close_rel(g, w, rel)
    return got


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 40),
    h=st.integers(1, 12),
    v=st.integers(1, 70),
    chunk=st.integers(1, 50),
    temperature=st.sampled_from([1.0, 0.6, 1.7]),
    bias=st.booleans(),
    entropy=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_naive_on_random_shapes(n, h, v, chunk, temperature, bias, entropy, seed):
    ignore = [i for i in range(n) if (i * 7 + seed) % 5 == 0]
    hidden, weight, b, labels = make(n, h, v, seed=seed, ignore=ignore, bias=bias)
    assert_matches(
        hidden, weight, b, labels, entropy=entropy, chunk_size=chunk, temperature=temperature
    )


@pytest.mark.parametrize(
    "n, v, chunk",
    [(1, 97, 8), (5, 97, 64), (64, 97, 16), (64, 100, 7), (33, 1000, 32)],
    ids=["N=1", "N<chunk", "N=4chunks", "V,N not multiples", "N=chunk+1"],
)
def test_edge_shapes(n, v, chunk):
    hidden, weight, b, labels = make(n, 24, v, seed=n + v)
    assert_matches(hidden, weight, b, labels, chunk_size=chunk, entropy=True)


def test_chunk_size_does_not_change_results():
    hidden, weight, b, labels = make(50, 16, 300, seed=3, ignore=[0, 7, 49])
    ref = values_and_grads(token_logprobs, hidden, weight, b, labels, chunk_size=50)
    for chunk in (1, 3, 16, 49, 1000):
        got = values_and_grads(token_logprobs, hidden, weight, b, labels, chunk_size=chunk)
        for r, g in zip(ref[0] + ref[1], got[0] + got[1], strict=True):
            assert_close_rel(g, r)


def test_ignore_index_gives_zero_logp_and_no_gradient():
    hidden, weight, b, labels = make(12, 8, 40, seed=5, ignore=[0, 5, 11])
    with torch.no_grad():
        hidden[5] = float("nan")  # an ignored row is never read, so NaN must not leak
    (logp, ent), (gh, gw, gb) = values_and_grads(
        token_logprobs, hidden, weight, b, labels, entropy=True, chunk_size=4
    )
    ignored = labels == -100
    assert torch.equal(logp[ignored], torch.zeros(3)) and torch.equal(ent[ignored], torch.zeros(3))
    assert torch.equal(gh[ignored], torch.zeros(3, 8))
    assert torch.isfinite(logp).all() and torch.isfinite(gw).all() and torch.isfinite(gb).all()
    assert (logp[~ignored] < 0).all() and (gh[~ignored].abs().sum(1) > 0).all()


def test_all_ignored_gives_zeros():
    hidden, weight, b, labels = make(4, 8, 40, ignore=range(4))
    (logp,), grads = values_and_grads(token_logprobs, hidden, weight, b, labels)
    assert torch.equal(logp, torch.zeros(4))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_entropy_value_and_gradient_match_naive_and_uniform_case():
    hidden, weight, b, labels = make(30, 16, 257, seed=9, ignore=[2])
    assert_matches(hidden, weight, b, labels, entropy=True, chunk_size=8, temperature=0.8)
    # zero hidden, zero bias -> uniform distribution: entropy log V, logp -log V
    z = torch.zeros(3, 16)
    logp, ent = token_logprobs(z, weight.detach(), labels[:3].clamp(min=0), return_entropy=True)
    torch.testing.assert_close(ent, torch.full((3,), torch.log(torch.tensor(257.0)).item()))
    torch.testing.assert_close(logp, -ent)


def test_entropy_unused_still_gives_logp_gradient():
    hidden, weight, b, labels = make(10, 8, 50, seed=4)
    logp, _ = token_logprobs(hidden, weight, labels, bias=b, return_entropy=True, chunk_size=3)
    (g,) = torch.autograd.grad(logp.sum(), hidden)
    (want,) = torch.autograd.grad(
        naive_token_logprobs(hidden, weight, labels, bias=b).sum(), hidden
    )
    assert_close_rel(g, want)


def test_large_logits_are_stable():
    # logits of order 1e3: exp would overflow without the max shift
    hidden, weight, b, labels = make(20, 16, 90, seed=2, scale=100.0)
    (logp,), grads = assert_matches(hidden, weight, b, labels, chunk_size=6, rel=1e-4)
    assert torch.isfinite(logp).all() and all(torch.isfinite(g).all() for g in grads)


def test_bfloat16_within_tolerance():
    """bf16 inputs: matmuls in bf16, softmax in float32, float32 log-probs.

    Both paths are compared with the float64 truth computed from the same bf16
    numbers. Each bf16 logit carries up to two roundings (matmul, bias add) of
    unit roundoff 2**-8, so |error| <= 2**-7 * max|logit| per logit, and logp =
    z_y - lse inherits at most twice that: tolerance 2**-6 * max|logit| (~0.45
    here; measured ~0.07-0.12 for both paths). Gradients are bf16 matmuls of a
    bf16-rounded softmax: measured ~1% of their largest entry for both paths;
    tolerance 2**-5 (3%). A wrong gradient term or temperature factor is O(100%).
    """
    hidden, weight, b, labels = make(40, 32, 300, dtype=torch.bfloat16, seed=11, ignore=[3])
    zmax = (hidden.double() @ weight.double().T + b.double()).abs().max()
    exact = [x.detach().double().requires_grad_() for x in (hidden, weight, b)]
    truth = values_and_grads(naive_token_logprobs, *exact, labels)
    got = values_and_grads(token_logprobs, hidden, weight, b, labels, chunk_size=16)
    naive = values_and_grads(naive_token_logprobs, hidden, weight, b, labels)
    assert got[0][0].dtype == torch.float32
    assert [g.dtype for g in got[1]] == [torch.bfloat16] * 3
    for result in (got, naive):
        assert (result[0][0].double() - truth[0][0]).abs().max() <= 2**-6 * zmax
        for g, t in zip(result[1], truth[1], strict=True):
            assert (g.double() - t).abs().max() <= 2**-5 * t.abs().max()


def test_float64_gradcheck():
    hidden, weight, b, labels = make(6, 3, 7, dtype=torch.float64, seed=1, ignore=[2])

    def fn(h, w, bb):
        logp, ent = token_logprobs(
            h, w, labels, bias=bb, chunk_size=4, temperature=0.7, return_entropy=True
        )
        return logp, ent

    assert torch.autograd.gradcheck(fn, (hidden, weight, b))


@pytest.mark.parametrize("scale, softcap", [(0.0625, None), (1.0, 2.5), (3.0, 0.7)])
def test_logit_scale_and_softcap_match_naive(scale, softcap):
    """The model's own logit transform (Cohere's scale, Gemma's soft-cap) in the chunked path.
    softcap 0.7 against logits of order 10 saturates tanh, so a missing 1 - tanh^2 factor in
    the backward is an O(1) gradient error; a missing scale is a factor 16 at 0.0625."""
    hidden, weight, b, labels = make(23, 8, 60, seed=12, ignore=[4], scale=1.5)
    kw = dict(temperature=0.8, logit_scale=scale, softcap=softcap)
    want = values_and_grads(naive_token_logprobs, hidden, weight, b, labels, entropy=True, **kw)
    got = values_and_grads(
        token_logprobs, hidden, weight, b, labels, entropy=True, chunk_size=5, **kw
    )
    for w, g in zip(want[0] + want[1], got[0] + got[1], strict=True):
        assert_close_rel(g, w)
    plain = values_and_grads(naive_token_logprobs, hidden, weight, b, labels, temperature=0.8)
    assert (plain[0][0] - got[0][0]).abs().max() > 0.1  # the transform changes the answer


def test_softcap_by_hand():
    # one logit pair [4, 0], cap 2: capped [2 tanh 2, 0] = [1.92806, 0]
    hidden, weight = torch.tensor([[4.0]]), torch.tensor([[1.0], [0.0]])
    logp = naive_token_logprobs(hidden, weight, torch.tensor([1]), softcap=2.0)
    capped = 2 * math.tanh(2.0)
    torch.testing.assert_close(logp, torch.tensor([-math.log1p(math.exp(capped))]))
    for bad in (dict(softcap=0.0), dict(logit_scale=float("nan"))):
        with pytest.raises(ValueError, match=next(iter(bad))):
            token_logprobs(hidden, weight, torch.tensor([1]), **bad)


def test_float64_gradcheck_with_softcap_and_scale():
    hidden, weight, b, labels = make(6, 3, 7, dtype=torch.float64, seed=2, ignore=[1])

    def fn(h, w, bb):
        return token_logprobs(h, w, labels, bias=bb, chunk_size=4, temperature=0.7,
                              return_entropy=True, logit_scale=1.3, softcap=1.1)  # fmt: skip

    assert torch.autograd.gradcheck(fn, (hidden, weight, b))


def test_gradient_without_bias_and_weight_frozen():
    hidden, weight, _, labels = make(9, 8, 30, seed=6, bias=False)
    weight.requires_grad_(False)
    logp = token_logprobs(hidden, weight, labels, chunk_size=4)
    (g,) = torch.autograd.grad(logp.sum(), hidden)
    (want,) = torch.autograd.grad(naive_token_logprobs(hidden, weight, labels).sum(), hidden)
    assert_close_rel(g, want)


BAD = [
    ("hidden", dict(hidden=torch.zeros(4)), ValueError),
    ("hidden", dict(hidden=torch.zeros(4, 8, dtype=torch.long)), TypeError),
    ("weight", dict(weight=torch.zeros(10, 7)), ValueError),
    ("weight", dict(weight=torch.zeros(10, 8, dtype=torch.float64)), TypeError),
    ("labels", dict(labels=torch.zeros(5, dtype=torch.long)), ValueError),
    ("labels", dict(labels=torch.zeros(4)), TypeError),
    ("labels", dict(labels=torch.tensor([0, 1, 10, 2])), ValueError),
    ("labels", dict(labels=torch.tensor([0, -1, 2, 3])), ValueError),
    ("bias", dict(bias=torch.zeros(9)), ValueError),
    ("chunk_size", dict(chunk_size=0), ValueError),
    ("chunk_size", dict(chunk_size=2.0), TypeError),
    ("temperature", dict(temperature=0.0), ValueError),
    ("temperature", dict(temperature=-1.0), ValueError),
    ("temperature", dict(temperature=float("inf")), ValueError),
    ("temperature", dict(temperature=float("nan")), ValueError),
]


@pytest.mark.parametrize("name, change, error", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_names_the_argument(name, change, error):
    args = dict(
        hidden=torch.zeros(4, 8),
        weight=torch.zeros(10, 8),
        labels=torch.tensor([0, 1, -100, 9]),
        bias=None,
        chunk_size=2,
        temperature=1.0,
    )
    args.update(change)
    with pytest.raises(error, match=name):
        token_logprobs(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)


def test_wrong_device_names_the_argument():
    meta = torch.zeros(10, 8, device="meta")
    with pytest.raises(ValueError, match="weight"):
        token_logprobs(torch.zeros(4, 8), meta, torch.zeros(4, dtype=torch.long))


def packed_batch(seed=0, lens=(5, 9, 3, 7), h=16, v=120):
    hidden, weight, b, labels = make(sum(lens), h, v, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    logp_old = -torch.rand(sum(lens), generator=g) * 3
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.2])
    kw = dict(seq_lens=torch.tensor(lens), rewards=rewards, group_size=2, eps_low=0.2)
    return hidden, weight, b, labels, logp_old, kw


@pytest.mark.parametrize("variant", ["gspo", "gspo-token", "grpo"])
def test_gspo_loss_from_hidden_packed_equals_logp_then_loss(variant):
    from gspo.loss import gspo_loss

    hidden, weight, b, labels, logp_old, kw = packed_batch()
    kw["variant"] = variant
    loss, metrics = gspo_loss_from_hidden(
        hidden, weight, labels, logp_old, bias=b, temperature=0.9, chunk_size=4, **kw
    )
    logp = naive_token_logprobs(hidden, weight, labels, bias=b, temperature=0.9)
    want, want_metrics = gspo_loss(logp, logp_old, **kw)
    assert_close_rel(loss, want)
    got_g = torch.autograd.grad(loss, (hidden, weight, b))
    want_g = torch.autograd.grad(want, (hidden, weight, b))
    assert any(g.abs().max() > 0 for g in want_g)  # the comparison below is not vacuous
    for g, w in zip(got_g, want_g, strict=True):
        assert_close_rel(g, w)
    assert metrics.keys() == want_metrics.keys()


def test_gspo_loss_from_hidden_padded_ignores_garbage_labels():
    from gspo.loss import gspo_loss

    hidden, weight, b, labels = make(12, 16, 120, seed=8)
    hidden3, labels2 = hidden.view(3, 4, 16), labels.clone().view(3, 4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    labels2[~mask] = 10**6  # garbage where the mask is False must not matter
    logp_old = -torch.rand(3, 4)
    kw = dict(mask=mask, advantages=torch.tensor([1.0, -0.5, 0.3]), eps_low=0.2)
    loss, _ = gspo_loss_from_hidden(hidden3, weight, labels2, logp_old, bias=b, chunk_size=5, **kw)
    safe = torch.where(mask, labels2, -100).view(-1)
    logp = naive_token_logprobs(hidden, weight, safe, bias=b).view(3, 4)
    want, _ = gspo_loss(logp, logp_old, **kw)
    assert_close_rel(loss, want)
    for g, w in zip(
        torch.autograd.grad(loss, (hidden, weight)),
        torch.autograd.grad(want, (hidden, weight)),
        strict=True,
    ):
        assert_close_rel(g, w)


@pytest.mark.parametrize("variant", ["gspo", "gspo-token", "grpo"])
@pytest.mark.parametrize("chunk", [1, 6, 9, 100], ids=lambda c: f"C={c}")
def test_fused_equals_recompute_packed(variant, chunk):
    # C=6: sequences (5, 9, 3, 7) split into blocks of whole sequences and the
    # 9- and 7-token ones exceed C (two-pass); C=100: one block holds all.
    hidden, weight, b, labels, logp_old, kw = packed_batch(seed=chunk)
    labels[6] = -100
    kw["variant"] = variant
    results = []
    for fused in (False, True):
        loss, metrics = gspo_loss_from_hidden(
            hidden, weight, labels, logp_old, bias=b, temperature=0.9, chunk_size=chunk,
            fused=fused, **kw,
        )  # fmt: skip
        grads = torch.autograd.grad(2.5 * loss, (hidden, weight, b))
        results.append([loss, *grads, *metrics.values()])
    for got, want in zip(results[1], results[0], strict=True):
        assert_close_rel(got, want)


def test_fused_equals_recompute_padded():
    hidden, weight, b, labels = make(15, 16, 120, seed=12)
    hidden3, labels2 = hidden.view(3, 5, 16), labels.clone().view(3, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    labels2[~mask] = -7  # garbage
    kw = dict(mask=mask, rewards=torch.tensor([0.1, 0.9, 0.4]), group_size=3, eps_low=0.2)
    logp_old = -torch.rand(3, 5, generator=torch.Generator().manual_seed(0))
    results = []
    for fused in (False, True):
        loss, _ = gspo_loss_from_hidden(
            hidden3, weight, labels2, logp_old, bias=b, chunk_size=4, fused=fused, **kw
        )
        results.append([loss, *torch.autograd.grad(loss, (hidden, weight, b))])
    assert results[0][1].abs().max() > 0
    for got, want in zip(results[1], results[0], strict=True):
        assert_close_rel(got, want)


def test_fused_blocks_are_whole_sequences_within_chunk():
    from gspo.chunked import _blocks

    bounds = [0, 5, 14, 17, 24, 40]  # sequence lengths 5, 9, 3, 7, 16
    valid = torch.ones(40, dtype=torch.bool)
    valid[20:24] = False  # 4 ignored tokens in the 7-token sequence: it counts 3
    blocks = list(_blocks(bounds, valid, 10))
    # 5 | 9 | 3 + 3 | 16 (alone, longer than C: two passes)
    assert blocks == [(0, 5), (5, 14), (14, 24), (24, 40)]
    assert list(_blocks(bounds, valid, 1000)) == [(0, 40)]
    assert list(_blocks(bounds, valid, 1)) == [(0, 5), (5, 14), (14, 17), (17, 24), (24, 40)]


@pytest.mark.parametrize("fused", [False, True])
def test_gspo_loss_from_hidden_takes_mask_by_position(fused):
    # Like gspo_loss(logp, logp_old, mask, ...): the padded mask is the fifth positional.
    hidden, weight, b, labels = make(12, 16, 120, seed=9)
    hidden3, labels2 = hidden.view(3, 4, 16), labels.view(3, 4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    logp_old = -torch.rand(3, 4)
    kw = dict(advantages=torch.tensor([1.0, -0.5, 0.3]), eps_low=0.2, fused=fused)
    by_position, _ = gspo_loss_from_hidden(hidden3, weight, labels2, logp_old, mask, **kw)
    by_keyword, _ = gspo_loss_from_hidden(hidden3, weight, labels2, logp_old, mask=mask, **kw)
    assert by_position.item() == by_keyword.item() and by_position.item() != 0.0


def test_gspo_loss_from_hidden_defaults_to_the_fused_path_at_its_own_chunk(monkeypatch):
    # The defaults come from bench/logprobs.py's sweep: fused at 512, recompute at 256.
    import gspo.chunked as chunked

    seen = {}
    real_fused, real_token = chunked._fused_gspo_loss, chunked.token_logprobs

    def fused_spy(*args):
        seen["fused_chunk"] = args[6]
        return real_fused(*args)

    def token_spy(*args, **kwargs):
        seen["token_chunk"] = kwargs["chunk_size"]
        return real_token(*args, **kwargs)

    monkeypatch.setattr(chunked, "_fused_gspo_loss", fused_spy)
    monkeypatch.setattr(chunked, "token_logprobs", token_spy)
    hidden, weight, b, labels, logp_old, kw = packed_batch(seed=3)
    default, _ = gspo_loss_from_hidden(hidden, weight, labels, logp_old, bias=b, **kw)
    assert chunked.DEFAULT_FUSED_CHUNK_SIZE == 512 and seen == {"fused_chunk": 512}
    recompute, _ = gspo_loss_from_hidden(hidden, weight, labels, logp_old, bias=b, fused=False,
                                         **kw)  # fmt: skip
    assert seen["token_chunk"] == chunked.DEFAULT_CHUNK_SIZE == 256
    assert_close_rel(default, recompute)
