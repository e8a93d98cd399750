"""Sampler-vs-trainer mismatch metrics and rollout corrections against a hand-written,
one-number-at-a-time reference; garbage in masked slots changes nothing."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gspo.train import correction
from gspo.train.config import TrainConfig
from gspo.train.rollout import Rollout
from gspo.train.update import old_logprobs

LOW, HIGH, CAP = 0.9, 1.1, 2.0


def reference(kind, old, sampler, lengths):
    """Pure Python: lists of per-sequence token log-probs (only the valid ones)."""
    deltas = [[o - s for o, s in zip(orow[:n], srow[:n], strict=True)]
              for orow, srow, n in zip(old, sampler, lengths, strict=True)]  # fmt: skip
    tokens = [d for row in deltas for d in row]
    metrics = {
        "mismatch_k3": sum(math.exp(d) - 1 - d for d in tokens) / len(tokens),
        "mismatch_max_abs": max(abs(d) for d in tokens),
        "mismatch_seq_ratio_min": min(math.exp(sum(r) / len(r)) for r in deltas),
        "mismatch_seq_ratio_max": max(math.exp(sum(r) / len(r)) for r in deltas),
    }
    if kind == "seq-mask":
        w = [1.0 if LOW <= math.exp(sum(r) / len(r)) <= HIGH else 0.0 for r in deltas]
    elif kind == "seq-tis":
        w = [min(math.prod(math.exp(d) for d in r), CAP) for r in deltas]
    else:  # token-tis
        w = [[min(math.exp(d), CAP) for d in r] for r in deltas]
    return metrics, w


def padded(rows, lengths, T, garbage):
    out = torch.full((len(rows), T), garbage, dtype=torch.float32)
    for i, (row, n) in enumerate(zip(rows, lengths, strict=True)):
        out[i, :n] = torch.tensor(row[:n], dtype=torch.float32)
    return out


@given(
    data=st.data(),
    B=st.integers(1, 5),
    T=st.integers(1, 6),
    garbage=st.sampled_from([0.0, float("nan"), float("inf"), -float("inf"), 7.0]),
)
def test_metrics_and_weights_equal_the_reference(data, B, T, garbage):
    lengths = data.draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
    logp = st.floats(-6.0, -0.5, width=32)
    old = [data.draw(st.lists(logp, min_size=T, max_size=T)) for _ in range(B)]
    # sampler = old + a small mismatch, so seq-mask keeps some and drops some
    noise = st.floats(-0.25, 0.25, width=32)
    f32 = lambda x: torch.tensor(x, dtype=torch.float32).item()  # noqa: E731  (what the tensors hold)
    sampler = [[f32(o + data.draw(noise)) for o in row] for row in old]
    mask = padded([[1.0] * T] * B, lengths, T, 0.0).bool()
    lp_old, lp_s = padded(old, lengths, T, garbage), padded(sampler, lengths, T, garbage)
    ref_metrics, _ = reference("seq-mask", old, sampler, lengths)
    got = correction.mismatch(lp_old, lp_s, mask)
    for key, value in ref_metrics.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for kind in ("seq-mask", "seq-tis", "token-tis"):
        _, w_ref = reference(kind, old, sampler, lengths)
        w, _ = correction.weights(kind, lp_old, lp_s, mask, low=LOW, high=HIGH, cap=CAP)
        assert torch.isfinite(w).all(), kind
        if kind == "token-tis":
            for i, n in enumerate(lengths):
                assert w[i, :n].tolist() == pytest.approx(w_ref[i], rel=1e-5), kind
        elif kind == "seq-mask":
            # the float32 delta may sit on the other side of a threshold than the float64 one
            geo = [sum(o - s for o, s in zip(a[:n], b[:n], strict=True)) / n
                   for a, b, n in zip(old, sampler, lengths, strict=True)]  # fmt: skip
            for i, g in enumerate(geo):
                if min(abs(g - math.log(LOW)), abs(g - math.log(HIGH))) > 1e-5:
                    assert w[i].item() == w_ref[i], (kind, i)
        else:
            assert w.tolist() == pytest.approx(w_ref, rel=1e-5), kind


def test_hand_worked_numbers():
    # one sequence, delta = trainer - sampler = [+0.2, -0.1]
    old = torch.tensor([[-1.0, -2.0, float("nan")]])
    sampler = torch.tensor([[-1.2, -1.9, 3.0]])
    mask = torch.tensor([[True, True, False]])
    m = correction.mismatch(old, sampler, mask)
    # k3 = ((e^0.2 - 1.2) + (e^-0.1 - 0.9)) / 2 = (0.021403 + 0.004837) / 2 = 0.013120
    assert m["mismatch_k3"] == pytest.approx(0.0131202, abs=1e-6)
    assert m["mismatch_max_abs"] == pytest.approx(0.2, abs=1e-6)
    # geometric mean exp(0.05) = 1.051271; the product exp(0.1) = 1.105171
    assert m["mismatch_seq_ratio_max"] == pytest.approx(1.0512711, abs=1e-6)
    w, frac = correction.weights("seq-mask", old, sampler, mask, low=0.99, high=1.01, cap=2.0)
    assert w.tolist() == [0.0] and frac == 1.0  # 1.051 is outside [0.99, 1.01]
    w, _ = correction.weights("seq-mask", old, sampler, mask, low=0.9, high=1.1, cap=2.0)
    assert w.tolist() == [1.0]
    w, frac = correction.weights("seq-tis", old, sampler, mask, low=0.9, high=1.1, cap=2.0)
    assert w.item() == pytest.approx(1.1051709, abs=1e-6) and frac == 0.0
    w, frac = correction.weights("seq-tis", old, sampler, mask, low=0.9, high=1.1, cap=1.05)
    assert w.item() == pytest.approx(1.05, abs=1e-6) and frac == 1.0  # truncated at the cap
    w, frac = correction.weights("token-tis", old, sampler, mask, low=0.9, high=1.1, cap=1.1)
    # e^0.2 = 1.2214 -> 1.1 (cut), e^-0.1 = 0.904837, masked slot -> 1
    assert w.tolist()[0] == pytest.approx([1.1, 0.9048374, 1.0], abs=1e-6) and frac == 0.5
    adv = torch.tensor([2.0])
    assert correction.weigh(adv, w).tolist()[0] == pytest.approx([2.2, 1.8096748, 2.0], abs=1e-6)


class CountingLogprobs(torch.nn.Module):
    """A log-prob module that returns fixed values and counts its forwards."""

    def __init__(self, logp):
        super().__init__()
        self.logp, self.calls = logp, 0

    def forward(self, input_ids, attention_mask, *, temperature, return_entropy=False,
                target_mask=None, top_p=1.0):
        self.calls += 1
        assert not self.training  # old log-probs run with dropout off
        return self.logp


def rollout_with(logp_sampler):
    B, T = logp_sampler.shape
    return Rollout(prompts=[{}] * B, input_ids=torch.zeros(B, T + 1, dtype=torch.long),
                   attention_mask=torch.ones(B, T + 1, dtype=torch.long),
                   response_mask=torch.ones(B, T, dtype=torch.bool), prompt_len=1,
                   completions=[""] * B, logp_sampler=logp_sampler)  # fmt: skip


def test_old_logprobs_sampler_skips_the_forward_and_trainer_weighs_advantages():
    trainer = torch.tensor([[-1.0, -1.0], [-2.0, -2.0]])
    sampler = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]])  # row 1: geometric ratio e^-1
    r = rollout_with(sampler)
    module = CountingLogprobs(trainer).train()  # P = 1: columns 0.. are the response
    adv = torch.tensor([1.0, -1.0])
    config = TrainConfig(old_logprobs="sampler")
    logp_old, mismatch, out_adv = old_logprobs(module, r, adv, config)
    assert module.calls == 0 and logp_old is sampler and mismatch is None and out_adv is adv
    config = TrainConfig(rollout_correction="seq-mask", correction_low=0.5, correction_high=2.0)
    logp_old, mismatch, out_adv = old_logprobs(module, r, adv, config)
    assert module.calls == 1 and module.training  # back in train mode afterwards
    assert torch.equal(logp_old, trainer)
    assert out_adv.tolist() == [1.0, 0.0]  # row 1 (ratio 0.37) dropped
    assert mismatch["correction_frac"] == 0.5
    assert mismatch["mismatch_seq_ratio_min"] == pytest.approx(math.exp(-1), abs=1e-6)


@pytest.mark.parametrize(
    "change, message",
    [({"rollout_correction": "token-tis"}, "per-token weights need a per-token loss"),
     ({"rollout_correction": "seq-tis", "old_logprobs": "sampler"}, "needs --old-logprobs trainer"),
     ({"correction_low": 1.2}, "correction_low"), ({"correction_cap": 0.5}, "correction_cap"),
     ({"vllm_memory": 0.0}, "vllm_memory")],
)  # fmt: skip
def test_config_errors_name_the_field_and_the_fix(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TrainConfig(), **change)


def test_token_tis_runs_with_a_token_level_loss():
    TrainConfig(rollout_correction="token-tis", loss="gspo-token")


def test_k3_of_rounding_level_differences_is_not_rounded_to_zero():
    """Engines that agree to float32 rounding differ by ~1e-7 per token: k3 ~ d^2/2 ~ 1e-14,
    which exp(d) - 1 - d in float32 gives as exactly 0 (or noise of 1e-7)."""
    old = torch.tensor([[-1.0, -2.0]])
    sampler = torch.tensor([[-1.0 - 2.4e-7, -2.0 + 4.8e-7]])  # a few float32 ulps apart
    d = (old.double() - sampler.double())[0]  # the exact float32 differences
    expected = float((torch.expm1(d) - d).mean())
    assert 1e-15 < expected < 1e-12
    got = correction.mismatch(old, sampler, torch.ones(1, 2, dtype=torch.bool))["mismatch_k3"]
    assert got == pytest.approx(expected, rel=1e-6)
