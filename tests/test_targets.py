"""The potential algebra, checked as properties in log space."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llmppl as pp
from llmppl.models import NGramLM

LM = NGramLM(vocab_size=4, order=2, seed=3)
PROMPT = [0]
SEQS = [[1, 3], [2, 1, 3], [0, 0], [1, 2]]  # two finished (end in EOS=3), two truncated at 2


def reward_len(cs):
    return [float(len(c.token_ids)) for c in cs]


def reward_first(cs):
    return [float(c.token_ids[0]) if c.token_ids else 0.0 for c in cs]


alphas = st.floats(min_value=0.05, max_value=8.0, allow_nan=False)
potentials = st.one_of(
    alphas.map(pp.Power),
    st.floats(0.1, 3.0).map(pp.Tempered),
    st.floats(0.2, 3.0).map(lambda b: pp.RewardTilt(reward_len, b)),
    st.floats(0.2, 3.0).map(lambda b: pp.RewardTilt(reward_first, b)),
    st.just(pp.Constraint(mask=[0, 1, 2, 3])),
)


def logd(potential):
    target = pp.Target(LM, pp.Power(1.0) * potential)
    return target.log_density(PROMPT, SEQS, max_new_tokens=2)


@given(alphas, alphas)
def test_power_merges(a, b):
    assert pp.Power(a) * pp.Power(b) == pp.Power(a + b)
    t1 = pp.Target(LM, pp.Power(a) * pp.Power(b))
    t2 = pp.Target(LM, pp.Power(a + b))
    assert torch.allclose(t1.log_density(PROMPT, SEQS, 2), t2.log_density(PROMPT, SEQS, 2))


@settings(max_examples=30, deadline=None)
@given(potentials, potentials, potentials)
def test_product_commutes_and_associates(f, g, h):
    left = logd((f * g) * h)
    right = logd(f * (g * h))
    swapped = logd(h * (g * f))
    assert torch.allclose(left, right, atol=1e-5, equal_nan=True)
    assert torch.allclose(left, swapped, atol=1e-5, equal_nan=True)
    # the log density of a product is the sum of the logs
    base = pp.Target(LM, pp.Power(1.0)).log_density(PROMPT, SEQS, max_new_tokens=2)
    parts = logd(f) + logd(g) + logd(h) - 2 * base
    assert torch.allclose(left, parts, atol=1e-4, equal_nan=True)


def test_target_exponent_rules():
    assert pp.Target(LM).base_exponent == 1.0
    assert pp.Target(LM, pp.Power(4)).base_exponent == 4.0
    assert pp.Target(LM, pp.Tempered(0.5)).base_exponent == 0.0
    assert pp.Target(LM, pp.RewardTilt(reward_len, 1.0)).base_exponent == 1.0


def test_tempered_replaces_the_base_factor():
    """Decided (issue 12 item 9): a Tempered factor without a Power factor *replaces* p
    (base_exponent 0); ``Power(1) * Tempered(τ)`` keeps both.  Checked on the densities."""
    from llmppl.exact import enumerate_target

    seqs = [[1, 2, LM.eos_token_id], [2, LM.eos_token_id]]
    base = pp.Target(LM).log_density(PROMPT, seqs)
    low = pp.Target(LM, pp.Tempered(0.5)).log_density(PROMPT, seqs)
    both = pp.Target(LM, pp.Power(1.0) * pp.Tempered(0.5))
    assert both.base_exponent == 1.0
    assert torch.allclose(both.log_density(PROMPT, seqs), base + low, atol=1e-5)
    tilted = pp.Target(LM, pp.Tempered(0.5) * pp.RewardTilt(reward_len, 1.0))
    assert tilted.base_exponent == 0.0
    r = torch.tensor([float(len(s) - 1) for s in seqs], dtype=torch.float64)
    assert torch.allclose(tilted.log_density(PROMPT, seqs), low + r, atol=1e-5)
    # Target(lm, Tempered(τ)) is the law of low-temperature decoding: its Z is 1
    assert enumerate_target(pp.Target(LM, pp.Tempered(0.5)), PROMPT, 3).log_Z == pytest.approx(0.0, abs=1e-5)
    assert "replaces" in pp.Target.__doc__


def test_power_density_by_hand():
    t = pp.Target(LM, pp.Power(2.5))
    seq = [1, 2, 3]
    lp = sum(float(LM.next_logprobs([PROMPT + seq[:k]])[0, seq[k]]) for k in range(3))
    assert math.isclose(float(t.log_density(PROMPT, [seq])[0]), 2.5 * lp, rel_tol=1e-6)


def test_tempered_is_locally_normalised():
    t = pp.Target(LM, pp.Tempered(0.5))
    lp = LM.next_logprobs([PROMPT])
    inc = t.log_next(t.batch(PROMPT, [[]], lp))
    assert abs(float(torch.logsumexp(inc[0].double(), 0))) < 1e-6
    assert not torch.allclose(inc, pp.Target(LM, pp.Power(2.0)).log_next(t.batch(PROMPT, [[]], lp)))


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "x"])
def test_bad_parameters(bad):
    with pytest.raises(ValueError, match="alpha"):
        pp.Power(bad)
    with pytest.raises(ValueError, match="tau"):
        pp.Tempered(bad)
    with pytest.raises(ValueError, match="beta"):
        pp.RewardTilt(reward_len, bad)


def test_reward_errors_name_the_completion():
    t = pp.Target(LM, pp.RewardTilt(lambda cs: [float("nan")] * len(cs), 1.0))
    with pytest.raises(pp.targets.RewardError, match="completion 0"):
        t.log_density(PROMPT, [[1, 3]])
    t = pp.Target(LM, pp.RewardTilt(lambda cs: [1.0], 1.0))
    with pytest.raises(pp.targets.RewardError, match="1 values for 2"):
        t.log_density(PROMPT, [[1, 3], [2, 3]])

    def boom(cs):
        raise RuntimeError("verifier down")

    t = pp.Target(LM, pp.RewardTilt(boom, 1.0))
    with pytest.raises(pp.targets.RewardError, match="verifier down"):
        t.log_density(PROMPT, [[1, 3]])
