"""Top-p log-probs (gspo.nucleus through token_logprobs and naive_token_logprobs): a plain
one-row-at-a-time float64 reference, the samplers' own top-p code, hand-worked ties, and
gradients (chunked against naive, float64 gradcheck).

The logits are fed in exactly by scoring ``hidden = logits`` against ``weight = eye(V)``
(each output is one product by 1 plus zeros: exact), so that ties can be made on purpose;
then the gradient w.r.t. ``hidden`` is d/dz itself.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gspo import nucleus
from gspo.chunked import token_logprobs
from gspo.logprobs import naive_token_logprobs
from test_chunked import assert_close_rel, make

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def reference_row(z: list[float], y: int, top_p: float):
    """(logp, entropy, dlogp/dz) of label y under the nucleus, in plain float64 Python.

    The samplers' rule: sort ascending, cumulative softmax, drop the prefix whose cumulative
    mass is <= 1 - top_p, never the top token. Of the tokens tied with the smallest kept
    value t, the sort keeps n_keep; any n_keep of them give the same normaliser. The label
    is in S if z_y >= t (a tied label is one of the kept ones), else added. The gradient
    spreads the tied tokens' share evenly over them (w = n_keep / n_eq each).
    """
    v = len(z)
    s = sorted(z)
    top = s[-1]
    total = sum(math.exp(x - top) for x in s)
    cum, removed = 0.0, 0
    for x in s[:-1]:
        cum += math.exp(x - top) / total
        if cum <= 1 - top_p:
            removed += 1
    t = s[removed]
    n_keep = v - removed - sum(x > t for x in z)
    n_eq = sum(x == t for x in z)
    m = [1.0 if x > t else n_keep / n_eq if x == t else 0.0 for x in z]
    if z[y] < t:
        m[y] = 1.0  # the label left the nucleus: kept, weight 1
    norm = sum(mj * math.exp(x - top) for mj, x in zip(m, z, strict=True))
    lse = top + math.log(norm)
    q = [mj * math.exp(x - lse) for mj, x in zip(m, z, strict=True)]
    entropy = -sum(qj * (x - lse) for qj, x in zip(q, z, strict=True))
    grad = [(1.0 if j == y else 0.0) - q[j] for j in range(v)]
    return z[y] - lse, entropy, grad


def near_the_cut(z: list[float], top_p: float, gap: float = 1e-9) -> bool:
    """A cumulative mass within ``gap`` of 1 - top_p: a rounding could move the cut."""
    s = sorted(z)
    e = [math.exp(x - s[-1]) for x in s]
    cum = 0.0
    for x in e[:-1]:
        cum += x / sum(e)
        if abs(cum - (1 - top_p)) < gap:
            return True
    return False


def score(logits: torch.Tensor, labels: torch.Tensor, top_p: float, *, fn=token_logprobs,
          **kw):  # fmt: skip
    """fn on exact logits: (logp, entropy, d logp.sum() / dz)."""
    z = logits.clone().requires_grad_()
    eye = torch.eye(logits.shape[1], dtype=logits.dtype)
    logp, ent = fn(z, eye, labels, top_p=top_p, return_entropy=True, **kw)
    (grad,) = torch.autograd.grad(logp.sum(), z)
    return logp.detach(), ent.detach(), grad


@SETTINGS
@given(
    n=st.integers(1, 12),
    v=st.integers(1, 40),
    top_p=st.floats(0.01, 1.0),
    chunk=st.integers(1, 16),
    ties=st.booleans(),
    first_k=st.sampled_from([1, 2, 5, nucleus.FIRST_K]),
    seed=st.integers(0, 2**16),
)
def test_logp_entropy_and_gradient_equal_the_plain_reference(
    n, v, top_p, chunk, ties, first_k, seed
):
    """first_k < V: the top-k search widens for rows whose top k hold < top_p, and counts
    a tie group that runs past the top k in the whole row."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    if ties:  # whole numbers: tied values everywhere, the cut often inside a tie group
        logits = logits.round()
    labels = torch.randint(0, v, (n,), generator=g)
    ignored = torch.rand(n, generator=g) < 0.25
    labels[ignored] = -100
    logits[ignored] = float("nan")  # rows of ignored labels are never read
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nucleus, "FIRST_K", first_k)
        patch.setattr(nucleus, "K_GROWTH", 2)
        logp, ent, grad = score(logits, labels, top_p, chunk_size=chunk)
    assert torch.equal(logp[ignored], torch.zeros(int(ignored.sum()), dtype=torch.float64))
    assert torch.equal(grad[ignored], torch.zeros_like(grad[ignored]))
    for i in (~ignored).nonzero()[:, 0].tolist():
        row = logits[i].tolist()
        if near_the_cut(row, top_p):
            continue
        want_logp, want_ent, want_grad = reference_row(row, int(labels[i]), top_p)
        assert logp[i].item() == pytest.approx(want_logp, abs=1e-12), i
        assert ent[i].item() == pytest.approx(want_ent, abs=1e-12), i
        assert grad[i].tolist() == pytest.approx(want_grad, abs=1e-12), i


@SETTINGS
@given(
    n=st.integers(1, 30),
    h=st.integers(1, 10),
    v=st.integers(1, 60),
    chunk=st.integers(1, 40),
    top_p=st.sampled_from([0.05, 0.3, 0.5, 0.9, 0.999]),
    temperature=st.sampled_from([1.0, 0.7]),
    softcap=st.sampled_from([None, 5.0]),
    entropy=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_chunked_equals_naive_values_and_gradients(
    n, h, v, chunk, top_p, temperature, softcap, entropy, seed
):
    """float32 hidden/weight/bias, chunks that do and do not divide N: the chunked path
    (forward keeps the nucleus bounds, backward recomputes the logits and S) equals the
    naive one (autograd through log-sum-exp over S) to float32 rounding."""
    ignore = [i for i in range(n) if (i * 7 + seed) % 5 == 0]
    hidden, weight, bias, labels = make(n, h, v, seed=seed, ignore=ignore)
    kw = dict(bias=bias, top_p=top_p, temperature=temperature, softcap=softcap,
              return_entropy=entropy)  # fmt: skip
    outs = []
    for fn, extra in ((naive_token_logprobs, {}), (token_logprobs, {"chunk_size": chunk})):
        out = fn(hidden, weight, labels, **kw, **extra)
        out = out if entropy else (out,)
        g = torch.Generator().manual_seed(seed + 1)
        total = sum((o * torch.randn(o.shape, generator=g)).sum() for o in out)
        outs.append([o.detach() for o in out] + list(torch.autograd.grad(total, [hidden, weight, bias])))
    for want, got in zip(*outs, strict=True):
        assert_close_rel(got, want)


@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("fn", [token_logprobs, naive_token_logprobs], ids=["chunked", "naive"])
def test_gradcheck_float64(fn, entropy):
    """Away from ties and from the cut, S is locally constant: finite differences agree."""
    hidden, weight, bias, labels = make(9, 5, 23, dtype=torch.float64, seed=4, ignore=[3])
    kw = {"chunk_size": 4} if fn is token_logprobs else {}

    def f(h, w, b):
        return fn(h, w, labels, bias=b, top_p=0.4, temperature=0.8, return_entropy=entropy, **kw)

    assert torch.autograd.gradcheck(f, (hidden, weight, bias))


def test_hand_worked_ties_and_a_label_outside_the_nucleus():
    # Row 0: four equal logits, top_p 0.5. Sorted probs 1/4 each, cumulative 1/4, 1/2, 3/4, 1:
    # the first two are <= 1 - 0.5, so 2 of the 4 tied tokens stay and every label has
    # logp = log(1/2) = -0.693147 and entropy log 2. A rule that keeps all ties gives
    # log(1/4); one that keeps a tied label only if its sort put it on top gives -inf or
    # log(1/3) for two labels of the four.
    # Row 1: z = [2, 0, 0, -1]. Sorted probs 0.0377, 0.1025, 0.1025, 0.7573 (sum e^z =
    # 9.7569); cumulative 0.0377, 0.1402, 0.2427 are all <= 0.5, so S = {token 0} (logp 0,
    # entropy 0). Label 1 (after the policy moved, outside S) is added with weight 1:
    # logp = 0 - log(e^2 + e^0) = -2.126928, finite; the full softmax would say
    # -log(9.7569) = -2.278000.
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0]] * 4 + [[2.0, 0.0, 0.0, -1.0]] * 2,
                          dtype=torch.float64)  # fmt: skip
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    for chunk in (1, 4, 6):
        logp, ent, grad = score(logits, labels, 0.5, chunk_size=chunk)
        assert logp[:4].tolist() == pytest.approx([-math.log(2)] * 4, abs=1e-15)
        assert ent[:4].tolist() == pytest.approx([math.log(2)] * 4, abs=1e-15)
        assert logp[4:].tolist() == pytest.approx([0.0, -math.log(math.e**2 + 1)], abs=1e-15)
        assert ent[4].item() == pytest.approx(0.0, abs=1e-15)
        # dlogp/dz: onehot - q; the tied share 1/2 spread as 1/4 each; row 5 q = (e^2, 1)/(e^2+1)
        assert grad[0].tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25], abs=1e-15)
        q0 = math.e**2 / (math.e**2 + 1)
        assert grad[5].tolist() == pytest.approx([-q0, q0, 0.0, 0.0], abs=1e-15)
        assert grad[4].tolist() == pytest.approx([0.0] * 4, abs=1e-15)


def test_top_k_search_widens_and_counts_a_tie_group_past_it(monkeypatch):
    """nucleus_bounds looks at the top FIRST_K tokens, widening by K_GROWTH; here 1 and 2.
    Row 0: z = [3, 3, 0, 0], top_p 0.3: each 3 has p = e^3 / (2 e^3 + 2) = 0.4763 >= 0.3, so
    the top 1 settles it, but the tie runs past it: 1 of the 2 tied tokens is kept, each
    label has logp = 3 - 3 = 0, and dlogp/dz for label 0 is [1/2, -1/2, 0, 0]. Counting the
    tie only inside the top 1 would keep both: logp -log 2.
    Row 1: z = [1, 1, 1, 1, 0], top_p 0.9: each 1 has p = e / (4e + 1) = 0.2290; the top 1,
    2 hold 0.229, 0.458 < 0.9, the top 4 hold 0.916: the four 1s, logp = -log 4."""
    monkeypatch.setattr(nucleus, "FIRST_K", 1)
    monkeypatch.setattr(nucleus, "K_GROWTH", 2)
    logits = torch.tensor([[3.0, 3.0, 0.0, 0.0, -30.0], [1.0, 1.0, 1.0, 1.0, 0.0]],
                          dtype=torch.float64)  # fmt: skip
    logp, _, grad = score(logits[:1], torch.tensor([0]), 0.3)
    assert logp.item() == pytest.approx(0.0, abs=1e-15)
    assert grad[0].tolist() == pytest.approx([0.5, -0.5, 0.0, 0.0, 0.0], abs=1e-15)
    logp, _, _ = score(logits[1:], torch.tensor([2]), 0.9)
    assert logp.item() == pytest.approx(-math.log(4), abs=1e-15)


def hf_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    from transformers.generation.logits_process import TopPLogitsWarper

    return TopPLogitsWarper(top_p)(None, logits.clone())


def vllm_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    ops = pytest.importorskip("vllm.v1.sample.ops.topk_topp_sampler")
    p = torch.full((logits.shape[0],), top_p, dtype=torch.float32)
    return ops.apply_top_k_top_p_pytorch(logits.clone(), None, p)


@pytest.mark.parametrize("sampler", [hf_top_p, vllm_top_p], ids=["hf", "vllm"])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.97])
def test_equals_the_samplers_log_probs_of_every_token_they_keep(sampler, ties, top_p):
    """The engines report log_softmax(processed logits)[y] for the token y they drew: the
    trainer's float32 nucleus log-prob of every kept token equals it to float32 rounding,
    ties included (HF: TopPLogitsWarper; vLLM: apply_top_k_top_p_pytorch, its CPU and
    no-Triton path; both compute the cut in float32 as the trainer does)."""
    g = torch.Generator().manual_seed(int(top_p * 100) + ties)
    logits = torch.randn(64, 300, generator=g) * 2.5
    if ties:
        logits = (logits * 2).round() / 2
    processed = sampler(logits, top_p)
    kept = torch.isfinite(processed)
    want = torch.log_softmax(processed, dim=-1)
    rows, cols = kept.nonzero(as_tuple=True)
    pick = torch.randperm(rows.shape[0], generator=g)[:1000]  # a sample of the kept tokens
    rows, cols = rows[pick], cols[pick]
    logp, _, _ = score(logits[rows], cols, top_p, chunk_size=37)
    torch.testing.assert_close(logp, want[rows, cols], rtol=0, atol=2e-6)
    # and the set: S (without a label outside it) has as many tokens as the sampler keeps
    t, w = nucleus.nucleus_bounds(logits, top_p)
    m = (logits > t[:, None]).double() + (logits == t[:, None]).double() * w[:, None].double()
    torch.testing.assert_close(m.sum(1), kept.sum(1).double(), rtol=0, atol=1e-5)  # w: float32


def test_top_p_one_is_the_plain_path_without_a_sort(monkeypatch):
    def no_sort(*args):
        raise AssertionError("top_p = 1 must not sort")

    hidden, weight, bias, labels = make(20, 8, 50, seed=2, ignore=[4])
    plain = token_logprobs(hidden, weight, labels, bias=bias, return_entropy=True, chunk_size=7)
    monkeypatch.setattr("gspo.chunked.nucleus_forward", no_sort)
    monkeypatch.setattr("gspo.chunked.nucleus_weights", no_sort)
    monkeypatch.setattr("gspo.logprobs.naive_nucleus_logp_all", no_sort)
    one = token_logprobs(hidden, weight, labels, bias=bias, return_entropy=True, chunk_size=7,
                         top_p=1.0)  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(plain, one, strict=True))
    ga = torch.autograd.grad(sum(x.sum() for x in plain), [hidden, weight, bias])
    gb = torch.autograd.grad(sum(x.sum() for x in one), [hidden, weight, bias])
    assert all(torch.equal(a, b) for a, b in zip(ga, gb, strict=True))
    naive = naive_token_logprobs(hidden, weight, labels, bias=bias, top_p=1.0)
    assert torch.isfinite(naive).all()


@pytest.mark.parametrize("bad, error", [(0.0, ValueError), (1.5, ValueError),
                                        (float("nan"), ValueError), (True, TypeError),
                                        ("0.5", TypeError)])  # fmt: skip
def test_invalid_top_p_names_the_argument(bad, error):
    hidden, weight, bias, labels = make(3, 4, 10)
    for fn in (token_logprobs, naive_token_logprobs):
        with pytest.raises(error, match="top_p"):
            fn(hidden, weight, labels, top_p=bad)
