"""SMC against exact enumeration on toy LMs: weighted particles and the evidence Ẑ."""

import math

import numpy as np
import pytest
import torch

import llmppl as pp
from llmppl.exact import enumerate_target, tv_distance
from llmppl.models import NGramLM

PROMPT = [0]
T = 5
# (vocab, seed, concentration, eos_boost): toy LMs where p^α is not a point mass
LMS = {"a": (4, 0, 1.0, 1.0), "b": (4, 4, 1.0, 2.0), "c": (4, 5, 2.0, 2.0), "d": (5, 3, 1.0, 3.0)}


pytestmark = pytest.mark.usefixtures("one_thread")


def lm_of(key):
    V, seed, conc, boost = LMS[key]
    return NGramLM(vocab_size=V, order=2, seed=seed, concentration=conc, eos_boost=boost)


def pooled(smc, target, runs=6, seed0=0):
    samples, weights = [], []
    for r in range(runs):
        res = smc.run(target, PROMPT, T, seed=seed0 + r)
        samples += res.samples
        weights += list(res.weights / runs)
    return samples, weights


def smc_tv(smc, target, runs=6):
    """TV between the exact target and the weighted particles pooled over ``runs`` seeds."""
    ex = enumerate_target(target, PROMPT, T)
    s, w = pooled(smc, target, runs)
    return ex.tv(s, w), ex


CASES = [  # (lm, alpha, resampling, schedule, proposal)
    ("b", 1.0, "systematic", None, None),
    ("a", 2.0, "multinomial", None, None),
    ("d", 2.0, "residual", None, None),
    ("d", 4.0, "systematic", pp.schedules.AdaptiveESS(0.5), None),
    ("a", 4.0, "stratified", None, None),
    ("b", 4.0, "residual", None, None),
    ("b", 2.0, "systematic", pp.schedules.Linear(1.0, 3), None),
    ("c", 4.0, "residual", pp.schedules.Linear(1.0, 3), pp.proposals.Base()),
    ("c", 4.0, "systematic", pp.schedules.AdaptiveESS(0.5), None),
    ("c", 2.0, "multinomial", pp.schedules.Geometric(1.0, 2), pp.proposals.Base()),
    ("d", 1.0, "stratified", None, pp.proposals.Base()),
    ("a", 4.0, "systematic", None, pp.proposals.Tempered(0.5)),
]


@pytest.mark.parametrize("key,alpha,scheme,schedule,proposal", CASES)
def test_power_targets_match_exact(key, alpha, scheme, schedule, proposal):
    lm = lm_of(key)
    target = pp.Target(lm, pp.Power(alpha))
    # p^1 spreads its mass over many sequences: more particles to beat Monte Carlo noise
    smc = pp.SMC(1000 if alpha == 1 else 500, proposal=proposal, resampling=scheme, schedule=schedule)
    tv, ex = smc_tv(smc, target, runs=8 if alpha == 1 else 6)
    low = enumerate_target(pp.Target(lm, pp.Tempered(1.0 / alpha)), PROMPT, T)
    tv_low = tv_distance(ex.as_dict(), low.as_dict())
    print(f"{key} alpha={alpha} {scheme} {schedule} {proposal}: TV(SMC)={tv:.4f}  TV(low temp)={tv_low:.4f}")
    assert tv < 0.04
    if alpha > 1:   # plain low-temperature sampling targets something else
        assert tv_low > tv + 0.1


@pytest.mark.parametrize("kappa", [0.0, 1.0])
def test_never_and_always_resample(kappa):
    target = pp.Target(lm_of("c"), pp.Power(2.0))
    smc = pp.SMC(400, ess_threshold=kappa, resampling="systematic")
    tv, _ = smc_tv(smc, target, runs=4)
    res = smc.run(target, PROMPT, T, seed=0)
    assert all(res.steps["resampled"][:-1]) if kappa == 1.0 else not any(res.steps["resampled"])
    assert tv < 0.04


def mask(batch):
    """Token 1 is never allowed right after token 2 (a prefix-dependent mask)."""
    m = torch.ones(len(batch), batch.base_logprobs.shape[-1], dtype=torch.bool)
    for i, toks in enumerate(batch.tokens):
        if toks and toks[-1] == 2:
            m[i, 1] = False
    return m


def test_locally_optimal_on_tempered_constraint():
    target = pp.Target(lm_of("d"), pp.Tempered(0.5) * pp.Constraint(mask=mask))
    smc = pp.SMC(500)                                   # default proposal: LocallyOptimal
    tv, ex = smc_tv(smc, target, runs=5)
    assert tv < 0.04
    res = smc.run(target, PROMPT, T, seed=1)
    assert "LocallyOptimal" in res.config["proposal"]
    for s in res.samples:
        assert all(not (x == 2 and y == 1) for x, y in zip(s, s[1:]))


def test_segment_steps_match_exact():
    lm = lm_of("b")
    target = pp.Target(lm, pp.Power(2.0))
    for step in (pp.steps.Tokens(2), pp.steps.Until(1, max_tokens=3)):
        smc = pp.SMC(400, step=step, schedule=pp.schedules.Linear(1.0, 2))
        tv, _ = smc_tv(smc, target, runs=4)
        assert tv < 0.04, step


Z_CASES = [
    ("a", 2.0, "multinomial", 0.5, None, None),
    ("b", 4.0, "systematic", 1.0, pp.schedules.Linear(1.0, 3), None),
    ("c", 4.0, "residual", 0.5, None, pp.proposals.Base()),
    ("c", 2.0, "stratified", 0.5, pp.schedules.AdaptiveESS(0.7), None),
]


@pytest.mark.parametrize("key,alpha,scheme,kappa,schedule,proposal", Z_CASES)
def test_evidence_is_unbiased(key, alpha, scheme, kappa, schedule, proposal):
    target = pp.Target(lm_of(key), pp.Power(alpha))
    ex = enumerate_target(target, PROMPT, T)
    smc = pp.SMC(4, proposal=proposal, resampling=scheme, ess_threshold=kappa, schedule=schedule)
    Z = np.array([math.exp(smc.run(target, PROMPT, T, seed=s).log_evidence) for s in range(250)])
    se = Z.std(ddof=1) / math.sqrt(len(Z))
    print(f"Zhat mean {Z.mean():.5f} ± {se:.5f}  exact {ex.Z:.5f}")
    assert abs(Z.mean() - ex.Z) < 4 * se + 1e-12


def test_evidence_with_constraint_is_unbiased():
    target = pp.Target(lm_of("a"), pp.Power(2.0) * pp.Constraint(mask=mask))
    ex = enumerate_target(target, PROMPT, T)
    smc = pp.SMC(4, proposal=pp.proposals.Tempered(0.5))
    Z = np.array([math.exp(smc.run(target, PROMPT, T, seed=s).log_evidence) for s in range(250)])
    se = Z.std(ddof=1) / math.sqrt(len(Z))
    assert abs(Z.mean() - ex.Z) < 4 * se


class ExactGibbsKernel:
    """An exact independent MH kernel for ``γ_t`` on unfinished prefixes of the same length:
    propose a whole prefix from the base LM (no EOS), accept with the γ_t/q ratio."""

    def __init__(self):
        self.calls = 0

    def move(self, ctx):
        self.calls += 1
        lm, state, eos = ctx.target.lm, ctx.state, ctx.target.lm.eos_token_id
        accepted = 0
        for i in ctx.rows.tolist():
            L = len(state.tokens[i])
            prop, logq, logp = [], 0.0, 0.0
            for _ in range(L):
                lp = lm.next_logprobs([state.prompt + prop])[0].double()
                lp_noeos = lp.clone()
                lp_noeos[eos] = -math.inf
                q = torch.log_softmax(lp_noeos, 0)
                v = int(torch.multinomial(q.exp(), 1, generator=ctx.generator))
                logq += float(q[v])
                logp += float(lp[v])
                prop.append(v)
            # q(y) for the current prefix
            cur, logq_cur = state.tokens[i], 0.0
            for t in range(L):
                lp = lm.next_logprobs([state.prompt + cur[:t]])[0].double()
                lp[eos] = -math.inf
                logq_cur += float(torch.log_softmax(lp, 0)[cur[t]])
            log_a = ctx.exponent * (logp - float(ctx.log_p[i])) + logq_cur - logq
            if math.log(float(torch.rand(1, generator=ctx.generator, dtype=torch.float64))) < log_a:
                state.truncate([i], [0])
                if prop:
                    state.extend([prop], [i])
                ctx.log_p[i] = logp
                accepted += 1
        return accepted


def test_rejuvenation_hook_keeps_the_target():
    target = pp.Target(lm_of("c"), pp.Power(4.0))
    kernel = ExactGibbsKernel()
    smc = pp.SMC(300, ess_threshold=1.0, rejuvenate=kernel)
    tv, _ = smc_tv(smc, target, runs=4)
    res = smc.run(target, PROMPT, T, seed=9)
    assert kernel.calls > 0 and res.stats["moves_accepted"] > 0
    assert len(res.steps["moves_accepted"]) == len(res.steps["ess"])
    assert tv < 0.04


def test_determinism_and_result_fields():
    target = pp.Target(lm_of("a"), pp.Power(2.0))
    smc = pp.SMC(16, resampling="residual")
    r1, r2 = smc.run(target, PROMPT, T, seed=3), smc.run(target, PROMPT, T, seed=3)
    assert r1.samples == r2.samples and r1.log_weights == r2.log_weights
    assert r1.log_evidence == r2.log_evidence
    keys = {"ess", "conditional_ess", "resampled", "ancestors", "log_weights", "exponent",
            "log_evidence_increment", "alive", "unique"}
    assert keys <= set(r1.steps)
    n = len(r1.steps["ess"])
    assert all(len(r1.steps[k]) == n for k in keys) and r1.stats["n_steps"] == n
    assert {"forward_passes", "tokens_decoded", "wall_time", "peak_memory", "resampling_count"} <= set(r1.stats)
    assert all(f or t for f, t in zip(r1.finished, r1.truncated))
    assert all(len(s) == T for s, t in zip(r1.samples, r1.truncated) if t)
    lw = torch.tensor(r1.log_weights)
    assert float(torch.logsumexp(lw, 0)) - math.log(16) == pytest.approx(r1.log_evidence)
    back = pp.Result.from_json(r1.to_json())
    assert back.samples == r1.samples
    import pickle
    assert pickle.loads(pickle.dumps(r1)).log_evidence == r1.log_evidence


def test_bad_input():
    target = pp.Target(lm_of("a"), pp.Power(2.0))
    for kw in ({"n_particles": 0}, {"n_particles": 2, "ess_threshold": 1.5},
               {"n_particles": 2, "resampling": "nope"}, {"n_particles": 2, "ess_threshold": -0.1}):
        with pytest.raises(ValueError):
            pp.SMC(**kw)
    impossible = pp.Target(lm_of("a"), pp.Power(2.0) * pp.Constraint(lambda c: False))
    with pytest.raises(ValueError, match="step .*every particle has weight zero.*log_complete"):
        pp.SMC(8).run(impossible, PROMPT, T, seed=0)


class NaNLM(NGramLM):
    def next_logprobs(self, sequences):
        out = super().next_logprobs(sequences)
        out[[len(s) > 1 for s in sequences]] = float("nan")
        return out


def test_nan_from_the_lm_names_the_step():
    target = pp.Target(NaNLM(vocab_size=4, seed=0, eos_boost=1e-3), pp.Power(2.0))
    with pytest.raises(ValueError, match="NaN.*row|particle"):
        pp.SMC(4).run(target, PROMPT, T, seed=0)


@pytest.mark.parametrize("proposal", [pp.proposals.TopK(1, epsilon=0.2), pp.proposals.TopP(0.5, epsilon=0.2)])
def test_restricted_proposals_stay_exact(proposal):
    target = pp.Target(lm_of("d"), pp.Power(2.0))
    tv, _ = smc_tv(pp.SMC(500, proposal=proposal), target, runs=5)
    assert tv < 0.04
