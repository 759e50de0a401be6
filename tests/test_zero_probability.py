"""Engines on an LM with probabilities exactly 0 (issue 22): ``0 · log 0``, one exponent rule,
one definition of a stateful proposal — each against ``llmppl.exact`` enumeration.

The ``"zeros"`` setup (``llmppl.models.toy.EXACTNESS``) is a ``ZeroForkingLM``: SEP is never
generated, EOS is impossible before two tokens and forced after three, and a padded id has
probability 0 everywhere; its targets have effective supports 17-30.
"""

import functools
import math

import numpy as np
import pytest
import torch

import llmppl as pp
from llmppl.inference.native import needs
from llmppl.exact import enumerate_target, tv_distance
from llmppl.models.toy import EXACTNESS, ZeroForkingLM
from llmppl.targets.base import scaled

from _exactness import check, impostors, pooled

SETUP = EXACTNESS["zeros"]
LM = SETUP.lm()
PROMPT, T = SETUP.prompt, SETUP.max_new_tokens
THRESHOLD = 0.04
TEMPERED = pp.Target(LM, pp.Tempered(0.25))     # base exponent 0: Tempered replaces p


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def exact(alpha=None):
    """The exact law of ``Tempered(0.25)`` (alpha None) or of ``p^alpha``."""
    target = TEMPERED if alpha is None else pp.Target(LM, pp.Power(alpha))
    return enumerate_target(target, PROMPT, T)


def tempered_impostors() -> dict[str, dict]:
    """What a wrong sampler of the Tempered target would give: the base LM and p^4 (= Power(1/τ))."""
    return {"base LM": exact(1.0).as_dict(), "p^4": exact(4.0).as_dict()}


def test_the_toy_has_exact_zeros():
    lp = LM.next_logprobs([PROMPT, PROMPT + [0, 1, 2]])
    p = lp.exp()
    sep, eos, pad = LM.sep_token_id, LM.eos_token_id, LM.vocab_size - 1
    assert LM.vocab_size == 7 and pad == eos + 1
    assert float(p[0, sep]) == 0.0 and float(p[0, eos]) == 0.0 and float(p[0, pad]) == 0.0
    assert float(p[1, eos]) == 1.0 and bool((p[1, :eos] == 0).all())      # forced EOS
    assert torch.allclose(p.sum(-1), torch.ones(2))
    # a · log p at a = 0 is 0 where p = 0 (not 0 · -inf = NaN); for a > 0 it stays -inf
    assert bool((scaled(0.0, lp) == 0).all())
    assert bool((scaled(torch.zeros(2, 1), lp) == 0).all())
    assert bool(torch.isneginf(scaled(2.0, lp)[0, sep]))
    out = TEMPERED.log_next(TEMPERED.batch(PROMPT, [[], [0, 1, 2]], lp))
    assert not bool(torch.isnan(out).any()) and bool(torch.isneginf(out[1, :eos]).all())
    ex = exact()
    assert ex.effective_support > 20 and ex.truncated_mass == 0.0 and ex.Z == pytest.approx(1.0, abs=1e-6)


def test_smc_samples_a_tempered_only_target():
    """Target(lm, Tempered(τ)) has base exponent 0: SMC's particles used to die at the first
    impossible token (0 · -inf = NaN); now TV to the exact law < 0.04 and Ẑ = Z."""
    smc = pp.SMC(1000)
    runs = []
    s, w = pooled(lambda seed: runs.append(smc.run(TEMPERED, PROMPT, T, seed=seed)) or runs[-1], range(8))
    check(exact(), s, w, THRESHOLD, tempered_impostors(), "SMC Tempered(0.25) on zeros")
    # the locally optimal proposal is the target's own token law: every weight is 1, Ẑ = Z = 1
    assert all(r.log_evidence == pytest.approx(0.0, abs=1e-5) for r in runs)


@pytest.mark.parametrize("schedule", [pp.schedules.Linear(1.0, 3), pp.schedules.AdaptiveESS(0.5)],
                         ids=["linear", "adaptive"])
def test_smc_bridges_on_exact_zeros(schedule):
    """Retroactive terms (a_t − a_{t−1}) log p and promotion (α − a_t) log p meet log 0."""
    target = pp.Target(LM, pp.Power(4.0))
    smc = pp.SMC(1000, ess_threshold=1.0, schedule=schedule)
    s, w = pooled(lambda seed: smc.run(target, PROMPT, T, seed=seed), range(6))
    check(exact(4.0), s, w, THRESHOLD, impostors(LM, PROMPT, T, 4.0), f"SMC p^4 {schedule!r} on zeros")


def test_mh_runs_a_tempered_only_target_like_smc():
    """MH used to refuse base exponent 0 ('the proposal needs a positive exponent'); it now
    picks its default proposal by SMC's rule and matches the exact law."""
    assert repr(pp.proposals.default_proposal(TEMPERED)) == "LocallyOptimal()"
    assert repr(pp.proposals.default_proposal(pp.Target(LM, pp.Power(2.0)))).startswith("Temperature")
    mh = pp.MH(block_size=2, n_mcmc=2)
    res = mh.run(TEMPERED, PROMPT, T, chains=4000, seed=0)
    assert res.config["proposal"] == "LocallyOptimal()"
    check(exact(), res.samples, None, 0.05, tempered_impostors(), "MH Tempered(0.25) on zeros")
    # the same exponent rule as SMC's (a_t >= 0): an explicit Temperature() at a = 0 is the
    # uniform proposal, accepted by both engines; the chains that MH keeps (finite weight)
    # only hold completions of positive target density
    res = pp.MH(block_size=2, n_mcmc=2, proposal=pp.proposals.Temperature()).run(
        TEMPERED, PROMPT, T, chains=200, seed=1)
    support = set(exact().as_dict())
    kept = [tuple(x) for x, lw in zip(res.samples, res.log_weights) if math.isfinite(lw)]
    assert kept and all(x in support for x in kept)
    smc = pp.SMC(200, proposal=pp.proposals.Temperature()).run(TEMPERED, PROMPT, T, seed=1)
    assert all(tuple(x) in support for x, w in zip(smc.samples, smc.weights) if w > 0)


def test_mh_power_on_exact_zeros():
    target = pp.Target(LM, pp.Power(4.0))
    res = pp.MH(block_size=2, n_mcmc=8).run(target, PROMPT, T, chains=4000, seed=0)
    check(exact(4.0), res.samples, None, 0.05, impostors(LM, PROMPT, T, 4.0), "MH p^4 on zeros")


def test_one_definition_of_stateful():
    """TopK / TopP forward their inner proposal's state: stateless around Temperature, stateful
    around FromLM — for SMC and MH alike."""
    P = pp.proposals

    def own_state(p):
        return needs(p).own_state

    assert not own_state(P.TopK(2)) and not own_state(P.TopP(0.9)) and not own_state(P.Temperature())
    assert own_state(P.FromLM(ZeroForkingLM(seed=9))) and own_state(P.TopK(2, P.FromLM(ZeroForkingLM(seed=9))))
    assert own_state(P.TopK(2, P.TopP(0.9, P.FromLM(ZeroForkingLM(seed=9)))))
    with pytest.raises(ValueError, match="stateless"):
        pp.MH(2, 1, proposal=P.TopK(2, P.FromLM(ZeroForkingLM(seed=9))))
    with pytest.raises(ValueError, match="own decoding state"):
        pp.SMC(8, proposal=P.TopK(2, P.FromLM(ZeroForkingLM(seed=9))), rejuvenate=pp.MH(1, 1)).run(
            pp.Target(LM, pp.Power(2.0)), PROMPT, T, seed=0)
    pp.MH(2, 1, proposal=P.TopK(2))      # accepted, as by SMC below


def test_smc_rejuvenates_with_topk_and_stays_exact():
    """SMC used to refuse rejuvenation with TopK (and sync the host every token for it)."""
    target = pp.Target(LM, pp.Power(4.0))
    prop = pp.proposals.TopK(2, epsilon=0.2)
    smc = pp.SMC(600, proposal=prop, ess_threshold=0.5, rejuvenate=pp.MH(block_size=1, n_mcmc=1))
    s, w = pooled(lambda seed: smc.run(target, PROMPT, T, seed=seed), range(8))
    check(exact(4.0), s, w, 0.05, impostors(LM, PROMPT, T, 4.0), "SMC TopK + rejuvenate on zeros")
    plain = pp.SMC(64).run(target, PROMPT, T, seed=0).stats["host_syncs"]
    topk = pp.SMC(64, proposal=prop).run(target, PROMPT, T, seed=0).stats["host_syncs"]
    assert topk == plain          # no per-token sync for the (stateless) restriction


def test_evidence_is_unbiased_on_exact_zeros():
    """Mean Ẑ over seeds within 4 SE of Z (4 SE < 10 % of Z, so a 10 % bias fails), for a
    bridged p^4 that meets log 0 in its retroactive terms."""
    target = pp.Target(LM, pp.Power(4.0))
    smc = pp.SMC(4, schedule=pp.schedules.Linear(1.0, 3))
    Z = np.array([math.exp(smc.run_batch(target, [PROMPT], T, seed=s)[0].log_evidence) for s in range(300)])
    se = Z.std(ddof=1) / math.sqrt(len(Z))
    z = exact(4.0).Z
    print(f"Zhat {Z.mean():.5g} ± {se:.3g}, exact {z:.5g}")
    assert 4 * se < 0.1 * z and abs(Z.mean() - z) < 4 * se
    # the impostor: the evidence of p^2 is far away at this resolution
    assert abs(exact(2.0).Z - z) > 4 * se
    assert tv_distance(exact(4.0).as_dict(), exact(2.0).as_dict()) > 0.05
