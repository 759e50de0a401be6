"""Exponent schedules and step kinds."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llmppl as pp
from llmppl.inference.schedules import ScheduleContext, conditional_ess


def ctx(t, prev, final, predict=None, n=4):
    return ScheduleContext(step=t, previous=prev, final=final,
                           log_weights=torch.zeros(n, dtype=torch.float64), predict=predict)


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


def test_adaptive_hits_the_target_conditional_ess():
    logp = torch.tensor([-1.0, -3.0, -6.0, -10.0], dtype=torch.float64)

    def predict(a):                    # tempering increments (a − 1)·log p
        return (a - 1.0) * logp

    s = pp.schedules.AdaptiveESS(target_ess=0.5, tol=1e-6)
    a = s.exponent(ctx(1, 1.0, 8.0, predict))
    assert 1.0 < a < 8.0
    assert conditional_ess(torch.zeros(4, dtype=torch.float64), predict(a)) == pytest.approx(2.0, rel=1e-3)
    # flat increments: jump straight to the final exponent
    assert s.exponent(ctx(1, 1.0, 8.0, lambda a: torch.zeros(4, dtype=torch.float64))) == 8.0


def test_conditional_ess_bounds():
    lw = torch.tensor([0.0, -1.0, -math.inf], dtype=torch.float64)
    assert conditional_ess(lw, torch.zeros(3, dtype=torch.float64)) == pytest.approx(3.0)
    assert conditional_ess(lw, torch.tensor([0.0, -50.0, 0.0], dtype=torch.float64)) < 3.0


@pytest.mark.parametrize("bad", [lambda: pp.schedules.Linear(0.0, 5), lambda: pp.schedules.Linear(1.0, 0),
                                 lambda: pp.schedules.AdaptiveESS(1.5), lambda: pp.steps.Tokens(0),
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
