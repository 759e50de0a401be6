"""Exponent schedules and step kinds."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llmppl as pp
from llmppl.inference.schedules import BridgeStats, ScheduleContext, conditional_ess


def ctx(t, prev, final, stats=None, n=4, horizon=16):
    prev = torch.as_tensor([prev], dtype=torch.float64)
    return ScheduleContext(step=t, previous=prev, final=final, horizon=horizon,
                           log_weights=torch.zeros((1, n), dtype=torch.float64), stats=stats)


@settings(max_examples=30, deadline=None)
@given(a0=st.floats(0.1, 3.0), alpha=st.floats(0.5, 8.0), steps=st.integers(1, 20))
def test_bridges_end_at_the_target_exponent(a0, alpha, steps):
    for sched in (pp.schedules.Linear(a0, steps), pp.schedules.Geometric(a0, steps)):
        a = [sched.exponent(ctx(t, 0.0, alpha)) for t in range(1, steps + 5)]
        assert sched.initial(alpha) == pytest.approx(a0)
        assert a[steps - 1] == pytest.approx(alpha) and a[-1] == pytest.approx(alpha)
        diffs = [b - c for b, c in zip(a[1:], a[:-1])]
        assert all(d >= -1e-12 for d in diffs) or all(d <= 1e-12 for d in diffs)  # monotone


def test_constant():
    s = pp.schedules.Constant()
    assert s.initial(4.0) == 4.0 and s.exponent(ctx(3, 4.0, 4.0)) == 4.0


def _stats(spread, token_var):
    return lambda: BridgeStats(torch.tensor([spread], dtype=torch.float64),
                               torch.tensor([token_var], dtype=torch.float64))


def test_adaptive_bridges_from_identical_particles():
    """At t = 1 every particle shares the prompt (spread 0): the greedy conditional-ESS rule
    saw nothing and jumped to α; pricing in the horizon's token variance bridges instead."""
    s = pp.schedules.AdaptiveESS(target_ess=0.5)
    a1 = float(s.exponent(ctx(1, 1.0, 8.0, _stats(0.0, 2.0), horizon=16)))
    assert 1.0 < a1 < 2.0
    # the raise keeps the predicted ESS fraction at least κ: exp(-δ² V) ≥ 0.5 — or the linear pace
    V = 16 * 2.0
    delta = a1 - 1.0
    assert delta == pytest.approx(max(math.sqrt(math.log(2) / V), 7.0 / 16))


@settings(max_examples=30, deadline=None)
@given(spread=st.floats(0.0, 50.0), token_var=st.floats(0.0, 10.0), horizon=st.integers(1, 64),
       alpha=st.floats(1.0, 8.0))
def test_adaptive_reaches_alpha_by_the_horizon_monotonically(spread, token_var, horizon, alpha):
    s = pp.schedules.AdaptiveESS(target_ess=0.5)
    a, seq = s.initial(alpha), []
    for t in range(1, horizon + 1):
        a = float(s.exponent(ctx(t, a, alpha, _stats(spread, token_var), horizon=horizon)))
        seq.append(a)
    assert seq[-1] == pytest.approx(alpha)
    assert all(b >= c - 1e-12 for b, c in zip(seq[1:], seq[:-1])) and max(seq) <= alpha + 1e-12


def test_adaptive_jumps_when_the_weights_cannot_spread():
    s = pp.schedules.AdaptiveESS(target_ess=0.5)
    assert float(s.exponent(ctx(1, 1.0, 4.0, _stats(0.0, 0.0)))) == pytest.approx(4.0)


def test_conditional_ess_bounds():
    lw = torch.tensor([0.0, -1.0, -math.inf], dtype=torch.float64)
    assert conditional_ess(lw, torch.zeros(3, dtype=torch.float64)) == pytest.approx(3.0)
    assert conditional_ess(lw, torch.tensor([0.0, -50.0, 0.0], dtype=torch.float64)) < 3.0


@pytest.mark.parametrize("bad", [lambda: pp.schedules.Linear(0.0, 5), lambda: pp.schedules.Linear(1.0, 0),
                                 lambda: pp.schedules.AdaptiveESS(1.5), lambda: pp.schedules.AdaptiveESS(1.0), lambda: pp.steps.Tokens(0),
                                 lambda: pp.steps.Until("", 4), lambda: pp.steps.Until("\n", 0)])
def test_bad_arguments(bad):
    with pytest.raises(ValueError):
        bad()


def test_steps():
    lm = pp.models.NGramLM(vocab_size=5)
    assert pp.steps.Tokens(2).ends([1, 2], lm) and not pp.steps.Tokens(2).ends([1], lm)
    u = pp.steps.Until(2, max_tokens=3)
    assert u.ends([0, 2], lm) and u.ends([0, 1, 1], lm) and not u.ends([0, 1], lm)
    with pytest.raises(ValueError, match="tokenizer"):
        pp.steps.Until("\n\n").check(lm)
    with pytest.raises(ValueError, match="unknown step"):
        pp.SMC(2, step="sentence")


def test_adaptive_ess_counts_tokens_not_steps_under_segment_steps():
    """Under segment steps a step draws many tokens: AdaptiveESS prices the tokens still to
    come (horizon − tokens so far), not horizon − step + 1 SMC steps."""
    stats = lambda: BridgeStats(spread=torch.zeros(1, dtype=torch.float64),  # noqa: E731
                                token_var=torch.full((1,), 1e6, dtype=torch.float64))
    sched = pp.schedules.AdaptiveESS(0.5)
    base = dict(step=2, previous=torch.tensor([1.0], dtype=torch.float64), final=4.0, horizon=8,
                log_weights=torch.zeros((1, 4), dtype=torch.float64), stats=stats)
    # huge token variance: the pace is the linear floor (α − a_{t−1}) / tokens left
    by_steps = float(sched.exponent(ScheduleContext(**base)))                       # 7 left
    by_tokens = float(sched.exponent(ScheduleContext(**base, position=torch.tensor([6]))))  # 2 left
    assert by_steps == pytest.approx(1.0 + 3.0 / 7, rel=1e-3)
    assert by_tokens == pytest.approx(1.0 + 3.0 / 2, rel=1e-3)
    # in SMC: with segments of up to 3 tokens and horizon 4, the bridge reaches α by step 2
    from llmppl.models.toy import EXACTNESS

    setup = EXACTNESS["fork"]
    lm, prompt, T = setup.lm(), setup.prompt, setup.max_new_tokens
    target = pp.Target(lm, pp.Power(4.0))
    res = pp.SMC(64, step=pp.steps.Until(1, max_tokens=3), schedule=sched).run(target, prompt, T, seed=0)
    lengths = res.steps["segment_length"]
    assert lengths[0] == 3 and len(res.steps["exponent"]) >= 2
    # after step 1 at most one token is left for the longest particles: a_2 jumps to α
    assert res.steps["exponent"][1] == pytest.approx(4.0)
