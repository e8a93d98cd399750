"""The pure-Python reference against docs/spec.md's worked examples and its rules."""

import math
import subprocess
import sys

import pytest

from gspo.reference import explain_objective, group_advantages, sequence_objective, sequence_terms

# (log_probs_new, log_probs_old, rewards, epsilon, L) from docs/spec.md, float64.
SPEC_EXAMPLES = [
    ([[1.0, 0.5], [0.8, 1.2]], [[0.0, 0.0], [0.0, 0.0]], [0.9, 0.7], 0.2, -0.7591409142295236),
    ([[0.5, 0.5], [0.5, 0.5]], [[0.5, 0.5], [0.5, 0.5]], [1.0, -1.0], 0.2, 0.0),
    (
        [[-0.5, -0.3], [-0.2, -0.4], [-0.1, -0.6]],
        [[-0.6, -0.4], [-0.3, -0.5], [-0.2, -0.7]],
        [0.8, 0.5, 0.3],
        0.1,
        -0.0022368898100859624,
    ),
]


@pytest.mark.parametrize("new, old, rewards, eps, expected", SPEC_EXAMPLES)
def test_spec_examples(new, old, rewards, eps, expected):
    assert sequence_objective(new, old, rewards, eps) == pytest.approx(expected, abs=1e-12)


def test_example_1_by_hand():
    # A = [1, -1]; rho = [e^0.75, e^1.0]; both clip to 1.2.
    # L_1 = min(2.117 * 1, 1.2 * 1) = 1.2; L_2 = min(-2.718, -1.2) = -2.718 (unclipped wins).
    # A bug that always takes the clipped ratio would give (1.2 - 1.2) / 2 = 0.
    expected = (1.2 - math.e) / 2
    assert sequence_objective(*SPEC_EXAMPLES[0][:4]) == pytest.approx(expected, abs=1e-14)


def test_example_3_is_not_zero():
    # The problem text this spec came from printed 0.0: that is -0.0022 rounded to two
    # decimals. Every ratio is e^0.1 = 1.10517 and clips to 1.1. The positive-advantage
    # sequence takes the clipped 1.1, the two negative ones the unclipped 1.10517, so the
    # advantages (which sum to 0) are weighted unequally:
    #   L = (1.1 * A_0 + e^0.1 * (A_1 + A_2)) / 3 = (1.1 - e^0.1) * A_0 / 3.
    terms = sequence_terms(*SPEC_EXAMPLES[2][:4])
    assert [t.clipped_ratio for t in terms] == pytest.approx([1.1] * 3)
    a0 = terms[0].advantage
    expected = (1.1 - math.exp(0.1)) * a0 / 3
    assert sequence_objective(*SPEC_EXAMPLES[2][:4]) == pytest.approx(expected, abs=1e-15)
    assert round(expected, 2) == 0.0 and abs(expected) > 2e-3


def test_equal_rewards_give_exactly_zero_advantage():
    # mean([0.1] * 3) is 0.10000000000000002, so a computed sigma is ~1e-17, not 0.
    assert sum([0.1] * 3) / 3 != 0.1
    assert group_advantages([0.1, 0.1, 0.1]) == [0.0, 0.0, 0.0]
    # With zero advantages even a huge ratio contributes exactly 0, not NaN.
    assert sequence_objective([[50.0], [60.0]], [[-700.0], [-700.0]], [0.1, 0.1], 0.2) == 0.0


def test_population_std():
    # rewards [1, 2, 3, 4]: mean 2.5, population var 1.25 (sample var would be 1.667).
    adv = group_advantages([1.0, 2.0, 3.0, 4.0])
    assert adv == pytest.approx([x / math.sqrt(1.25) for x in (-1.5, -0.5, 0.5, 1.5)])


def test_ragged_lengths_normalise_per_sequence():
    # Sequence 0 has 1 token with log-ratio 0.3; sequence 1 has 3 tokens summing to 0.3.
    # Length normalisation gives ratios e^0.3 and e^0.1 (not e^0.3 twice).
    terms = sequence_terms([[0.3], [0.1, 0.1, 0.1]], [[0.0], [0.0, 0.0, 0.0]], [1.0, 0.0], 0.5)
    assert terms[0].ratio == pytest.approx(math.exp(0.3))
    assert terms[1].ratio == pytest.approx(math.exp(0.1))


def test_asymmetric_clip():
    # A = [1, -1]; ratio e^0.1 = 1.105: clipped at 1 + 0.05 for the positive sequence.
    new, old = [[0.1], [0.1]], [[0.0], [0.0]]
    got = sequence_objective(new, old, [1.0, 0.0], 0.2, epsilon_high=0.05)
    assert got == pytest.approx((1.05 - math.exp(0.1)) / 2)


def test_explain_table():
    text = explain_objective(*SPEC_EXAMPLES[2][:4])
    assert "rho_i" in text and "1.105171" in text and "1.100000" in text
    assert (
        text.splitlines()[-1] == f"L = mean_i L_i = {sequence_objective(*SPEC_EXAMPLES[2][:4])!r}"
    )


BAD = [
    (([], [], [], 0.2), ValueError, "no sequences"),
    (([[1.0]], [[1.0], [2.0]], [1.0], 0.2), ValueError, "outer lengths differ"),
    (([[1.0]], [[1.0]], [1.0, 2.0], 0.2), ValueError, "outer lengths differ"),
    (([[1.0], [1.0, 2.0]], [[1.0], [1.0]], [1.0, 2.0], 0.2), ValueError, "sequence 1"),
    (([[1.0], []], [[1.0], []], [1.0, 2.0], 0.2), ValueError, "sequence 1 is empty"),
    (([[float("nan")]], [[1.0]], [1.0], 0.2), ValueError, r"log_probs_new\[0\]\[0\]"),
    (([[1.0]], [[float("inf")]], [1.0], 0.2), ValueError, r"log_probs_old\[0\]\[0\]"),
    (([[1.0]], [[1.0]], [float("nan")], 0.2), ValueError, r"rewards\[0\]"),
    (([[1.0]], [[1.0]], [1.0], 0.0), ValueError, "epsilon must be > 0"),
    (([[1.0]], [[1.0]], [1.0], -0.1), ValueError, "epsilon must be > 0"),
    (([[1.0]], [[1.0]], [1.0], float("nan")), ValueError, "epsilon must be finite"),
    (([[1.0]], [[1.0]], [1.0], float("inf")), ValueError, "epsilon must be finite"),
    (([[1.0]], [[1.0]], [1.0], 1.5), ValueError, "epsilon must be < 1"),
    (([[1.0]], [[1.0]], [1.0], 1.0), ValueError, "epsilon must be < 1"),
    (([["a"]], [[1.0]], [1.0], 0.2), TypeError, r"log_probs_new\[0\]\[0\] must be a number"),
    (("ab", [[1.0]], [1.0], 0.2), TypeError, "log_probs_new must be a list"),
    (([[1.0]], [[1.0]], [True], 0.2), TypeError, r"rewards\[0\]"),
]


@pytest.mark.parametrize("args, error, match", BAD)
def test_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        sequence_objective(*args)


def test_import_does_not_load_torch():
    code = "import sys, gspo; gspo.sequence_objective([[0.0]], [[0.0]], [1.0], 0.2); "
    code += "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_public_api_resolves():
    import gspo

    for name in gspo.__all__:
        assert getattr(gspo, name) is not None, name
    assert callable(gspo.advantages) and callable(gspo.gspo_loss)


def test_log_ratio_beyond_the_bound_is_clamped_not_inf():
    # One rule with gspo_loss (MAX_LOG_RATIO = 20): without it e^1000 is inf and, with
    # A = -1, L would be -inf. Exact inside the bound: e^19.5 is used as is.
    from gspo.reference import MAX_LOG_RATIO

    terms = sequence_terms([[1000.0], [19.5]], [[0.0], [0.0]], [0.0, 1.0], 0.2)
    assert terms[0].ratio == math.exp(MAX_LOG_RATIO) and terms[0].log_ratio == 1000.0
    assert terms[1].ratio == math.exp(19.5)
    assert math.isfinite(sequence_objective([[1000.0], [0.0]], [[0.0], [0.0]], [0.0, 1.0], 0.2))
    text = explain_objective([[1000.0], [0.0]], [[0.0], [0.0]], [0.0, 1.0], 0.2)
    assert "sequence 0: mean log-ratio 1000 clamped to +20" in text


def test_epsilon_high_may_exceed_one():
    # Only the lower bound must stay a positive ratio: [0.8, 2.5] is a valid range.
    got = sequence_objective([[0.5]], [[0.0]], [1.0], 0.2, epsilon_high=1.5)
    assert got == 0.0  # one sequence: A = 0
