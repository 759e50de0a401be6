"""``llmppl.exact`` against values computed by hand."""

import math

import pytest
import torch

import llmppl as pp
from llmppl.exact import enumerate_target, tv_distance
from llmppl.models import NGramLM, TabularLM, pivotal_lm

EPS = 1e-9  # pivotal_lm's smoothing


def test_pivotal_base_and_power_by_hand():
    lm = pivotal_lm()
    base = enumerate_target(pp.Target(lm), [0], 3)
    # p(0 2 EOS) = .4 * .9, p(0 EOS) = .4 * .1, p(1 v EOS) = .6 * .25 each
    assert base.prob((0, 2)) == pytest.approx(0.36, abs=1e-6)
    assert base.prob((0,)) == pytest.approx(0.04, abs=1e-6)
    for v in range(4):
        assert base.prob((1, v)) == pytest.approx(0.15, abs=1e-6)
    assert base.log_Z == pytest.approx(0.0, abs=1e-6)

    sharp = enumerate_target(pp.Target(lm, pp.Power(4.0)), [0], 3)
    z = 0.36**4 + 0.04**4 + 4 * 0.15**4
    assert sharp.log_Z == pytest.approx(math.log(z), abs=1e-5)
    assert sharp.prob((0, 2)) == pytest.approx(0.36**4 / z, abs=1e-5)
    # p^4 prefers the pivotal token 0; low temperature prefers 1
    low = enumerate_target(pp.Target(lm, pp.Tempered(0.25)), [0], 3)
    first0_sharp = sum(p for s, p in sharp.as_dict().items() if s and s[0] == 0)
    first0_low = sum(p for s, p in low.as_dict().items() if s and s[0] == 0)
    assert first0_sharp > 0.8 and first0_low < 0.2


def test_truncated_sequences_carry_prefix_mass():
    table = {(0,): [0.5, 0.5, 0.0]}
    lm = TabularLM(vocab_size=3, eos_token_id=2, table=table, default=[0.3, 0.3, 0.4])
    d = enumerate_target(pp.Target(lm), [0], 2)
    # completions: (v, EOS) with v in {0,1}: .5*.4 ; (v, w) truncated: .5*.3 each
    assert d.prob((0,)) == pytest.approx(0.2)
    assert d.prob((0, 1)) == pytest.approx(0.15)
    assert d.log_Z == pytest.approx(0.0, abs=1e-6)
    assert len(d.sequences) == 2 + 4


def test_reward_and_constraint_by_hand():
    lm = pivotal_lm()
    r = lambda cs: [float(len(c.token_ids)) for c in cs]  # noqa: E731
    d = enumerate_target(pp.Target(lm, pp.Power(2.0) * pp.RewardTilt(r, 0.5)), [0], 3)
    # log γ = 2 log p + 2 len
    expect = {(0, 2): 0.36**2 * math.exp(4), (0,): 0.04**2 * math.exp(2)}
    expect.update({(1, v): 0.15**2 * math.exp(4) for v in range(4)})
    z = sum(expect.values())
    for s, g in expect.items():
        assert d.prob(s) == pytest.approx(g / z, abs=1e-6)
    c = enumerate_target(pp.Target(lm, pp.Constraint(lambda comp: comp.token_ids[:1] == [1])), [0], 3)
    assert c.log_Z == pytest.approx(math.log(0.6), abs=1e-6)
    with pytest.raises(ValueError, match="zero mass"):
        enumerate_target(pp.Target(lm, pp.Constraint(lambda comp: False)), [0], 3)


def test_tv_and_empirical():
    d = enumerate_target(pp.Target(NGramLM(vocab_size=3, seed=1)), [0], 4)
    assert abs(sum(d.as_dict().values()) - 1) < 1e-9
    assert d.tv(d.sequences, d.probs.tolist()) < 1e-12
    assert tv_distance({"a": 1.0}, {"b": 1.0}) == 1.0


def test_enumeration_limits():
    with pytest.raises(ValueError, match="max_new_tokens"):
        enumerate_target(pp.Target(NGramLM()), [0], 0)
    with pytest.raises(ValueError, match="smaller vocabulary"):
        enumerate_target(pp.Target(NGramLM(vocab_size=60, seed=0)), [0], 5)
