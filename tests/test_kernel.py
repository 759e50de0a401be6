"""Engines as kernels: re-entrant runs, and parts that plug in from outside the package.

* **Re-entrant.** Two states of ONE engine, stepped alternately (init A, init B, step A, step B,
  …), each equal its run alone — samples, weights, ``log Ẑ``, every trace and every stat but
  wall time and memory — for SMC with each proposal (the default, ``Lookahead``, ``FromLM``,
  ``TopK``), with segment steps and a bridge, for MH, ``ScalablePower``, ``Reweight`` and the
  baselines.  Before the kernel, a proposal kept its run on itself: ``FromLM`` crashed,
  ``Lookahead`` counted both runs' work, ``ScalablePower`` with two horizons drew different
  samples.
* **A new step kind with its own weight term**, defined here (outside ``llmppl``): a token step
  whose particles carry a twist ``ψ(y) = c · #{tokens of y in a set}``, added while a particle
  runs and removed when it ends.  A twist changes the path, never the target: SMC with it is
  exact against ``llmppl.exact`` (an impostor fails the same check), and ``Ẑ`` stays unbiased.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import llmppl as pp
from llmppl.exact import enumerate_target
from llmppl.inference.terms import WeightTerm
from llmppl.models.toy import EXACTNESS, ForkingLM

from _exactness import check, impostors

pytestmark = pytest.mark.usefixtures("one_thread")

SETUP = EXACTNESS["prompts"]
LM = SETUP.lm()
PROMPTS = [list(p) for p in SETUP.prompts[:2]]
T = SETUP.max_new_tokens
TARGET = pp.Target(LM, pp.Power(2.0))
#: stats that measure the machine, not the run
MACHINE = ("wall_time", "peak_memory")


def _same(a: pp.Result, b: pp.Result) -> None:
    assert a.samples == b.samples
    np.testing.assert_array_equal(np.asarray(a.log_weights), np.asarray(b.log_weights))
    assert a.log_p == b.log_p
    assert (a.log_evidence is None and b.log_evidence is None) or a.log_evidence == b.log_evidence
    assert a.steps.keys() == b.steps.keys()
    for k in a.steps:
        np.testing.assert_array_equal(np.asarray(a.steps[k], dtype=object), np.asarray(b.steps[k], dtype=object))
    sa = {k: v for k, v in a.stats.items() if k not in MACHINE}
    sb = {k: v for k, v in b.stats.items() if k not in MACHINE}
    assert sa == sb


def _interleaved(engine, target, runs: list[tuple[list, int, dict]]) -> list[list[pp.Result]]:
    """Init every run, then step them round-robin until all are done; results of each."""
    states = [engine.init(target, prompts, T, seed=seed, **kw) for prompts, seed, kw in runs]
    while not all(s.done for s in states):
        for i, s in enumerate(states):
            if not s.done:
                states[i], _ = engine.step(s)
    return [engine.results(s) for s in states]


def _alone(engine, target, prompts, seed, kw) -> list[pp.Result]:
    return engine.run_batch(target, prompts, T, seed=seed, **kw)


DRAFT = ForkingLM(seed=3, eos_profile=SETUP.eos_profile)   # another LM, same vocabulary: a draft

ENGINES = {
    "smc-default": pp.SMC(8, ess_threshold=0.9),
    "smc-lookahead": pp.SMC(6, proposal=pp.proposals.Lookahead(top_k=2, rollouts=2, horizon=2)),
    "smc-fromlm": pp.SMC(6, proposal=pp.proposals.FromLM(DRAFT), ess_threshold=0.9),
    "smc-topk": pp.SMC(6, proposal=pp.proposals.TopK(2)),
    "smc-segments-bridge": pp.SMC(6, step=pp.steps.Until(3, max_tokens=2, slope=True),
                                  schedule=pp.schedules.Linear(1.0, steps=3), ess_threshold=0.9),
    "smc-blocks": pp.SMC(6, step=pp.steps.Tokens(2), ess_threshold=0.9),
    "mh": pp.MH(block_size=2, n_mcmc=2),
    "reweight": pp.baselines.Reweight(6),
    "plain": pp.baselines.Plain(5),
    "bestofn": pp.baselines.BestOfN(4),
    "lowtemp": pp.baselines.LowTemperature(0.5, 4),
}


@pytest.mark.parametrize("name", list(ENGINES))
def test_two_interleaved_states_equal_their_runs_alone(name):
    engine = ENGINES[name]
    kw = {"chains": 3} if name == "mh" else {}
    runs = [(PROMPTS, 1, kw), (PROMPTS[::-1], 2, kw)]
    together = _interleaved(engine, TARGET, runs)
    for (prompts, seed, kw_), mine in zip(runs, together):
        for a, b in zip(mine, _alone(engine, TARGET, prompts, seed, kw_)):
            _same(a, b)


def test_scalable_power_with_two_horizons_side_by_side():
    """Two look-ahead samplers with different horizons, runs interleaved with one another and with
    a second run of the same sampler: each equals its run alone (nothing of a run lives on the part)."""
    short, long_ = pp.samplers.ScalablePower(2, 2, horizon=1, n=4), pp.samplers.ScalablePower(2, 2, horizon=3, n=4)
    states = [short.init(TARGET, PROMPTS, T, seed=5), long_.init(TARGET, PROMPTS, T, seed=6),
              short.init(TARGET, PROMPTS[::-1], T, seed=7)]
    engines = [short, long_, short]
    for i, (e, s) in enumerate(zip(engines, states)):
        states[i], _ = e.step(s)
    for e, s, (p, seed) in zip(engines, states, [(PROMPTS, 5), (PROMPTS, 6), (PROMPTS[::-1], 7)]):
        for a, b in zip(e.results(s), e.run_batch(TARGET, p, T, seed=seed)):
            _same(a, b)


def test_fromlm_keeps_configuration_only():
    """The proposal object carries nothing of a run: each run's draft decoding state is its own."""
    prop = pp.proposals.FromLM(DRAFT)
    before = dict(vars(prop))
    smc = pp.SMC(4, proposal=prop)
    a, b = smc.init(TARGET, PROMPTS, T, seed=0), smc.init(TARGET, PROMPTS, T, seed=1)
    assert a.proposal_run is not b.proposal_run and a.proposal_run.state is not b.proposal_run.state
    assert dict(vars(prop)) == before


# ----------------------------------------------------------------- a step kind defined outside the package
class CountTwist(WeightTerm):
    """``log ψ(y) = c · #{t : y_t ∈ tokens}`` for a running particle; removed when it ends.

    Chosen before the step draws?  ``ψ_t`` is a function of the prefix ``y_≤t`` alone, the
    twist of the particle after its draw, which is what every twist is (the weight of step
    ``t+1`` divides by it), so ``Ẑ`` stays unbiased."""

    name = "count_twist"

    def __init__(self, tokens: tuple[int, ...], c: float) -> None:
        self.tokens, self.c = torch.tensor(tokens), float(c)

    def start(self, plan, state) -> None:
        P = state.particles
        P.extra[self.name] = torch.zeros(P.R, dtype=torch.float64, device=P.device)

    def increment(self, plan, state, drawn) -> torch.Tensor:
        P = state.particles
        prev = P.extra[self.name]
        toks = [list(t) for t in state.decoding.tokens]
        counts = torch.tensor([sum(int(x) in set(self.tokens.tolist()) for x in t) for t in toks],
                              dtype=torch.float64, device=P.device)
        new = torch.where(P.done, torch.zeros_like(prev), self.c * counts)
        P.extra[self.name] = new
        return torch.where(drawn.active, new - prev, torch.zeros_like(prev))


class TwistedTokens(pp.steps.Tokens):
    """One-token steps that add :class:`CountTwist` to every step's weight."""

    def __init__(self, tokens: tuple[int, ...], c: float) -> None:
        super().__init__(1)
        self.twist = CountTwist(tokens, c)

    def terms(self):
        return (self.twist,)

    def __repr__(self) -> str:
        return f"TwistedTokens(c={self.twist.c:g})"


def test_a_step_kind_with_its_own_weight_term_is_exact():
    setup = EXACTNESS["truncating"]
    lm, prompt, T_ = setup.lm(), list(setup.prompts[0]), setup.max_new_tokens
    alpha = 2.0
    target = pp.Target(lm, pp.Power(alpha))
    exact = enumerate_target(target, prompt, T_)

    def twisted(n: int) -> pp.SMC:      # resample at every step: the twist decides who is copied
        return pp.SMC(n, step=TwistedTokens((1, 2), c=0.5), ess_threshold=1.0)

    runs = [twisted(3000).run(target, prompt, T_, seed=s) for s in range(6)]
    samples = [y for r in runs for y in r.samples]
    weights = [w / len(runs) for r in runs for w in r.weights]
    check(exact, samples, weights, 0.04, impostors(lm, prompt, T_, alpha), "SMC + CountTwist, pooled")
    # the evidence stays unbiased: Ẑ/Z averaged over seeds at a small N
    z = [math.exp(twisted(64).run(target, prompt, T_, seed=s).log_evidence - exact.log_Z) for s in range(200)]
    mean, se = float(np.mean(z)), float(np.std(z) / math.sqrt(len(z)))
    assert abs(mean - 1.0) < 4 * se + 0.01, (mean, se)
    # and the twist is not a no-op: without it the same seeds resample other particles
    plain = pp.SMC(3000, ess_threshold=1.0).run(target, prompt, T_, seed=0)
    assert plain.steps["ancestors"] != runs[0].steps["ancestors"]
