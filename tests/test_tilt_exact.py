"""Reward-tilted targets and PRM twists under SMC, against exact enumeration on toy LMs.

Twists only guide: a good twist (the exact future value, by enumeration) and a
deliberately bad one must both give the exact target ``p^α · exp(r/β)``; the good one
with a higher ESS, and with a final untwist that moves less weight.
"""

import math
import zlib
from collections import defaultdict

import numpy as np
import pytest
import torch

import llmppl as pp
from llmppl.diagnostics import twist as twd
from llmppl.exact import enumerate_target
from llmppl.models.toy import EXACTNESS

from _exactness import check as check_exact

SETUP = EXACTNESS["fork"]
LM = SETUP.lm()
PROMPT = SETUP.prompt
T = SETUP.max_new_tokens
DELIM = 1  # the segment delimiter token of the segment-step tests


pytestmark = pytest.mark.usefixtures("one_thread")


def reward(cs):
    """``r(y)``: twos are good, zeros are bad, truncation costs."""
    return [c.token_ids.count(2) - 0.5 * c.token_ids.count(0) - (1.0 if c.truncated else 0.0) for c in cs]


def log_p(prefix):
    seqs = [PROMPT + list(prefix[:k]) for k in range(len(prefix))]
    if not seqs:
        return 0.0
    lp = LM.next_logprobs(seqs).double()
    return float(sum(lp[k, prefix[k]] for k in range(len(prefix))))


def future_value(alpha, beta):
    """The exact twist: ``V(y_≤t) = β [log Σ_{y ⊒ y_≤t} γ(y) − α log p(y_≤t)]``, so that
    ``p(y_≤t)^α ψ(y_≤t)`` is the target's marginal of the prefix."""
    ex = enumerate_target(pp.Target(LM, pp.Power(alpha) * pp.RewardTilt(reward, beta)), PROMPT, T)
    mass = defaultdict(list)
    for s, lg in zip(ex.sequences, ex.log_gamma.tolist()):
        for k in range(min(len(s), T - 1) + 1):
            mass[s[:k]].append(lg)
    table = {pre: beta * (float(torch.logsumexp(torch.tensor(v), 0)) - alpha * log_p(pre))
             for pre, v in mass.items()}
    return lambda cs: [table[tuple(c.token_ids)] for c in cs]


def noise(cs):
    """A deliberately bad process reward: values in [-1, 1] unrelated to the reward."""
    return [(zlib.crc32(bytes(c.token_ids)) % 1000 / 500 - 1) for c in cs]


def pooled(smc, target, runs):
    """Weighted particles pooled over ``runs`` seeds, the mean final ESS and untwist shift."""
    samples, weights, ess, shift = [], [], [], []
    for seed in range(runs):
        res = smc.run(target, PROMPT, T, seed=seed)
        samples += res.samples
        weights += list(res.weights / runs)
        ess.append(res.final_ess)
        if target.has_twist:
            shift.append(twd.untwist_shift(res))
    return samples, weights, float(np.mean(ess)), float(np.mean(shift)) if shift else math.nan


def check(target, step="token", n=2000, runs=6, label="", **kw):
    """TV < 0.04 to the exact tilted target, which is far from the untilted one (its base
    factor alone) and from the base LM."""
    ex = enumerate_target(target, PROMPT, T)
    untilted = pp.Target(LM, pp.Power(target.base_exponent)) if target.base_exponent != 1 else None
    others = {"base LM": enumerate_target(pp.Target(LM), PROMPT, T).as_dict()}
    if untilted is not None:
        others["without the tilt"] = enumerate_target(untilted, PROMPT, T).as_dict()
    smc = pp.SMC(n, step=step, **kw)
    s, w, ess, shift = pooled(smc, target, runs)
    check_exact(ex, s, w, 0.04, others, f"{label} {smc.step_kind!r}")
    print(f"   final ESS={ess:6.1f}/{n}  untwist moved {shift:.3f}")
    return ess, shift


STEPS = ["token", pp.steps.Until(DELIM, max_tokens=3)]


@pytest.mark.parametrize("step", STEPS, ids=["token", "until"])
def test_power_times_reward_tilt(step):
    check(pp.Target(LM, pp.Power(2.0) * pp.RewardTilt(reward, 1.0)), step, n=2000, label="Power(2)*RewardTilt")


@pytest.mark.parametrize("step", STEPS, ids=["token", "until"])
def test_good_and_bad_twists_are_exact(step):
    beta = 1.0
    good = pp.Target(LM, pp.RewardTilt(reward, beta, process_reward=future_value(1.0, beta)))
    bad = pp.Target(LM, pp.RewardTilt(reward, beta, process_reward=noise))
    # resampling at every step lets the twists shape the particle population
    # (resampling every step duplicates particles: 4000 of them for the same Monte Carlo error)
    ess_good, shift_good = check(good, step, n=4000, label="RewardTilt + exact twist", ess_threshold=1.0)
    ess_bad, shift_bad = check(bad, step, n=4000, label="RewardTilt + noise twist", ess_threshold=1.0)
    print(f"final ESS: good twist {ess_good / 4000:.3f} N, bad twist {ess_bad / 4000:.3f} N; "
          f"untwist moved {shift_good:.3f} vs {shift_bad:.3f}")
    assert ess_good / 4000 > ess_bad / 4000
    assert shift_good < shift_bad


def test_twist_trace_follows_the_lineages():
    beta = 1.0
    value = future_value(1.0, beta)
    target = pp.Target(LM, pp.RewardTilt(reward, beta, process_reward=value))
    res = pp.SMC(64, ess_threshold=1.0).run(target, PROMPT, T, seed=3)
    trace = twd.twist_trace(res, along_lineages=True)
    assert trace.shape == (len(res.steps["ess"]), 64)
    for i, y in enumerate(res.samples):
        body = len(y) if res.finished[i] else len(y) - 1   # prefixes that were twisted
        want = [v / beta for v in value([pp.targets.Completion(y[:t], None, False) for t in range(1, body + 1)])]
        assert trace[:body, i] == pytest.approx(want)
        assert trace[body, i] == 0.0                       # promoted: the twist is removed


def test_recorded_untwist_matches_the_target():
    """``steps["untwist"]`` (recorded by SMC) equals ``log φ_complete − log ψ`` recomputed from the target."""
    target = pp.Target(LM, pp.Power(2.0) * pp.RewardTilt(reward, 0.5, process_reward=noise))
    res = pp.SMC(64, ess_threshold=1.0).run(target, PROMPT, T, seed=5)
    assert len(res.steps["untwist"]) == len(res.steps["twist"]) == len(res.steps["ess"])
    recorded = twd.untwist_increments(res)
    assert 0.0 < twd.untwist_shift(res) < 1.0
    del res.steps["untwist"]
    assert recorded == pytest.approx(twd.untwist_increments(res, target))


# ------------------------------------------------------- runs fail loudly
def test_a_raising_process_reward_fails_the_run():
    def prm(cs):
        if any(len(c.token_ids) >= 2 for c in cs):
            raise RuntimeError("PRM crashed on a long prefix")
        return [0.0] * len(cs)

    target = pp.Target(LM, pp.RewardTilt(reward, 1.0, process_reward=prm))
    with pytest.raises(pp.targets.RewardError, match="process_reward raised RuntimeError: PRM crashed"):
        pp.SMC(8).run(target, PROMPT, T, seed=0)


def test_non_finite_rewards_fail_the_run_naming_the_completion():
    target = pp.Target(LM, pp.Power(2.0) * pp.RewardTilt(lambda cs: [math.nan] * len(cs), 1.0))
    with pytest.raises(pp.targets.RewardError, match=r"reward returned nan for completion 0 \(\["):
        pp.SMC(8).run(target, PROMPT, T, seed=0)


def test_an_unsatisfiable_constraint_is_a_clear_error():
    target = pp.Target(LM, pp.Power(2.0) * pp.Constraint(lambda c: len(c.token_ids) > T))
    with pytest.raises(ValueError, match="zero mass"):
        enumerate_target(target, PROMPT, T)
    with pytest.raises(ValueError, match="every particle has weight zero"):
        pp.SMC(16).run(target, PROMPT, T, seed=0)


def test_constraints_with_rewards_match_exact():
    no_zero = pp.Constraint(lambda c: 0 not in c.token_ids, prefix=lambda c: 0 not in c.token_ids,
                            name="no_zero")
    target = pp.Target(LM, pp.Power(2.0) * pp.RewardTilt(reward, 2.0) * no_zero)
    check(target, n=2000, label="Power(2)*RewardTilt*Constraint")
