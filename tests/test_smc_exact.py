"""SMC against exact enumeration on toy LMs: weighted particles and the evidence Ẑ.

The target is ``p^α`` on the ``"fork"`` setup (``llmppl.models.toy.EXACTNESS``): its
effective support is 26, 15 and 12 sequences at α = 1, 2, 4, and each check also
asserts that the mode, low-temperature decoding at τ = 1/α and the base LM are
farther from the target than the threshold (``tests/_exactness.py``).
"""

import functools
import math

import numpy as np
import pytest
import torch

import llmppl as pp
from llmppl.exact import enumerate_target
from llmppl.models import NGramLM
from llmppl.models.toy import EXACTNESS

from _exactness import check, impostors, pooled

SETUP = EXACTNESS["fork"]
LM = SETUP.lm()
PROMPT = SETUP.prompt
T = SETUP.max_new_tokens
THRESHOLD = 0.04
#: particles × runs per α: p^1 spreads over more sequences, so it needs more samples
BUDGET = {1.0: (2000, 8), 2.0: (1500, 6), 4.0: (1000, 6)}


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def exact_power(alpha):
    return enumerate_target(pp.Target(LM, pp.Power(alpha)), PROMPT, T)


@functools.cache
def power_impostors(alpha):
    return impostors(LM, PROMPT, T, alpha)


def check_smc(smc, target, alpha, runs, label, others=None, exact=None):
    exact = exact or enumerate_target(target, PROMPT, T)
    s, w = pooled(lambda seed: smc.run(target, PROMPT, T, seed=seed), range(runs))
    return check(exact, s, w, THRESHOLD, power_impostors(alpha) if others is None else others, label)


CASES = [  # (alpha, resampling, ess_threshold, schedule, proposal); κ = 1 resamples every step
    (1.0, "systematic", 0.5, None, None),
    (2.0, "residual", 0.5, None, None),
    (4.0, "multinomial", 1.0, None, None),
    (4.0, "stratified", 1.0, None, None),
    (4.0, "systematic", 1.0, None, None),
    (4.0, "residual", 1.0, None, None),
    (4.0, "systematic", 0.5, pp.schedules.AdaptiveESS(0.5), None),
    (2.0, "systematic", 0.5, pp.schedules.Linear(1.0, 3), None),
    (4.0, "residual", 0.5, pp.schedules.Linear(1.0, 3), pp.proposals.Base()),
    (4.0, "multinomial", 0.5, pp.schedules.Geometric(1.0, 3), None),
    (2.0, "stratified", 0.5, pp.schedules.Geometric(1.0, 2), pp.proposals.Base()),
    (4.0, "systematic", 0.5, None, pp.proposals.Tempered(0.5)),
]


@pytest.mark.parametrize("alpha,scheme,kappa,schedule,proposal", CASES)
def test_power_targets_match_exact(alpha, scheme, kappa, schedule, proposal):
    n, runs = BUDGET[alpha]
    if scheme == "multinomial" and kappa == 1.0:
        n *= 2      # the noisiest scheme, applied at every step
    smc = pp.SMC(n, proposal=proposal, resampling=scheme, ess_threshold=kappa, schedule=schedule)
    check_smc(smc, pp.Target(LM, pp.Power(alpha)), alpha, runs,
              f"alpha={alpha} {scheme} kappa={kappa} {schedule} {proposal}", exact=exact_power(alpha))


def test_never_and_always_resample():
    target = pp.Target(LM, pp.Power(4.0))
    never = pp.SMC(BUDGET[4.0][0], ess_threshold=0.0)
    check_smc(never, target, 4.0, BUDGET[4.0][1], "kappa=0", exact=exact_power(4.0))
    assert not any(never.run(target, PROMPT, T, seed=0).steps["resampled"])
    assert all(pp.SMC(16, ess_threshold=1.0).run(target, PROMPT, T, seed=0).steps["resampled"][:-1])


def mask(batch):
    """Token 1 is never allowed right after token 1 (a prefix-dependent mask; it moves
    about 0.2 of the mass of ``Tempered(0.5)`` and of ``p^2``)."""
    m = torch.ones(len(batch), batch.base_logprobs.shape[-1], dtype=torch.bool)
    for i, toks in enumerate(batch.tokens):
        if toks and toks[-1] == 1:
            m[i, 1] = False
    return m


def test_locally_optimal_on_tempered_constraint():
    target = pp.Target(LM, pp.Tempered(0.5) * pp.Constraint(mask=mask))
    unmasked = enumerate_target(pp.Target(LM, pp.Tempered(0.5)), PROMPT, T).as_dict()
    others = {"low temperature without the mask": unmasked,
              "base LM": enumerate_target(pp.Target(LM), PROMPT, T).as_dict()}
    smc = pp.SMC(BUDGET[2.0][0])                       # default proposal: LocallyOptimal
    check_smc(smc, target, 2.0, 6, "Tempered(0.5) * mask", others)
    res = smc.run(target, PROMPT, T, seed=1)
    assert "LocallyOptimal" in res.config["proposal"]
    for s in res.samples:
        assert all(not (x == 1 and y == 1) for x, y in zip(s, s[1:]))


@pytest.mark.parametrize("step", [
    pp.steps.Tokens(2),
    pp.steps.Until(1, max_tokens=3),
], ids=["tokens2", "until"])
def test_segment_steps_match_exact(step):
    target = pp.Target(LM, pp.Power(4.0))
    smc = pp.SMC(BUDGET[4.0][0], step=step, schedule=pp.schedules.Linear(1.0, 2))
    check_smc(smc, target, 4.0, BUDGET[4.0][1], repr(step), exact=exact_power(4.0))


def test_segment_steps_without_resampling_match_exact():
    """The Until segments themselves are right: without resampling the weights are exact."""
    smc = pp.SMC(BUDGET[4.0][0], step=pp.steps.Until(1, max_tokens=3), ess_threshold=0.0)
    check_smc(smc, pp.Target(LM, pp.Power(4.0)), 4.0, BUDGET[4.0][1], "Until, no resampling",
              exact=exact_power(4.0))


ZEROS = EXACTNESS["zeros"]
SEGMENT_CASES = [  # (setup, step); every case resamples at every step (ess_threshold = 1)
    ("fork", pp.steps.Until(1, max_tokens=3)),
    ("fork", pp.steps.Until(1, max_tokens=3, slope=True)),
    ("zeros", pp.steps.Until(1, max_tokens=3)),
]


@pytest.mark.parametrize("name,step", SEGMENT_CASES, ids=["fork", "fork-slope", "zeros"])
def test_segment_steps_that_resample_every_step(name, step):
    """Segments of 1-3 tokens (ending at token 1), resampled after every segment: TV < 0.04
    (pooled 12 × 1000 particles; a single run's TV is about 0.08), and the evidence unbiased.
    The twist is chosen before each step draws (predictable), so E[Ẑ] = Z."""
    setup = EXACTNESS[name]
    lm, prompt, T = setup.lm(), setup.prompt, setup.max_new_tokens
    target = pp.Target(lm, pp.Power(4.0))
    exact = enumerate_target(target, prompt, T)
    smc = pp.SMC(1000, step=step, ess_threshold=1.0)
    runs = []
    s, w = pooled(lambda seed: runs.append(smc.run(target, prompt, T, seed=seed)) or runs[-1], range(12))
    assert all(sum(r.steps["resampled"]) >= 2 for r in runs)
    assert max(max(r.steps["segment_length"]) for r in runs) == 3
    check(exact, s, w, THRESHOLD, impostors(lm, prompt, T, 4.0), f"{step!r} kappa=1 on {name}")
    # evidence: mean Ẑ/Z over 300 seeds of 8 particles within 4 SE of 1, 4 SE < 10 %
    small = pp.SMC(8, step=step, ess_threshold=1.0)
    Z = np.array([math.exp(small.run_batch(target, [prompt], T, seed=k)[0].log_evidence)
                  for k in range(300)]) / exact.Z
    se = Z.std(ddof=1) / math.sqrt(len(Z))
    print(f"{step!r} on {name}: mean Zhat/Z {Z.mean():.4f} ± {se:.4f}")
    assert 4 * se < 0.1 and abs(Z.mean() - 1.0) < 4 * se
    # the impostor: an estimator of p^2's evidence is far off at this resolution
    assert abs(enumerate_target(pp.Target(lm, pp.Power(2.0)), prompt, T).Z / exact.Z - 1.0) > 4 * se


@pytest.mark.parametrize("alpha,kappa,schedule", [(4.0, 1.0, None), (2.0, 0.5, pp.schedules.Linear(1.0, 3))])
def test_power_targets_on_exact_zeros(alpha, kappa, schedule):
    """The zero-probability toy (SEP masked, forced EOS, padded id) against exact enumeration."""
    lm, prompt, T = ZEROS.lm(), ZEROS.prompt, ZEROS.max_new_tokens
    target = pp.Target(lm, pp.Power(alpha))
    smc = pp.SMC(1000, ess_threshold=kappa, schedule=schedule)
    s, w = pooled(lambda seed: smc.run(target, prompt, T, seed=seed), range(6))
    check(enumerate_target(target, prompt, T), s, w, THRESHOLD, impostors(lm, prompt, T, alpha),
          f"zeros alpha={alpha} kappa={kappa} {schedule!r}")


def evidence_check(smc, target, runs=200):
    """Mean Ẑ over ``runs`` seeds within 4 SE of the exact Z, and 4 SE small enough
    (< 10 % of Z) that an estimator biased by 10 % would fail."""
    ex = enumerate_target(target, PROMPT, T)
    # through run_batch: a run whose particles all die is an estimate Ẑ = 0 (log Ẑ = -inf), which
    # the mean must include to be unbiased (run() raises instead)
    Z = np.array([math.exp(smc.run_batch(target, [PROMPT], T, seed=s)[0].log_evidence) for s in range(runs)])
    se = Z.std(ddof=1) / math.sqrt(len(Z))
    print(f"Zhat mean {Z.mean():.6g} ± {se:.3g}  exact {ex.Z:.6g}  (4 SE = {4 * se / ex.Z:.1%} of Z)")
    assert 4 * se < 0.1 * ex.Z
    assert abs(Z.mean() - ex.Z) < 4 * se


Z_CASES = [
    (2.0, "multinomial", 0.5, None, None),
    (4.0, "systematic", 1.0, pp.schedules.Linear(1.0, 3), None),
    (4.0, "residual", 0.5, None, pp.proposals.Base()),
    (2.0, "stratified", 0.5, pp.schedules.AdaptiveESS(0.7), None),
]


@pytest.mark.parametrize("alpha,scheme,kappa,schedule,proposal", Z_CASES)
def test_evidence_is_unbiased(alpha, scheme, kappa, schedule, proposal):
    n = 8 if isinstance(proposal, pp.proposals.Base) else 4    # q = p: noisier weights
    smc = pp.SMC(n, proposal=proposal, resampling=scheme, ess_threshold=kappa, schedule=schedule)
    evidence_check(smc, pp.Target(LM, pp.Power(alpha)))


def test_evidence_with_constraint_is_unbiased():
    evidence_check(pp.SMC(4, proposal=pp.proposals.Tempered(0.5)),
                   pp.Target(LM, pp.Power(2.0) * pp.Constraint(mask=mask)))


class ExactGibbsKernel:
    """An exact independent MH kernel for ``γ_t ∝ p^{a_t}`` on unfinished prefixes: propose a
    whole prefix of the same length from the base LM without EOS (one batched forward per
    position for all rows), accept with the ``γ_t/q`` ratio."""

    def __init__(self):
        self.calls = 0

    def move(self, ctx):
        self.calls += 1
        lm, state, eos, gen = ctx.target.lm, ctx.state, ctx.target.lm.eos_token_id, ctx.generator
        rows = ctx.rows.tolist()
        cur = [list(state.tokens[i]) for i in rows]
        L = len(cur[0])
        assert all(len(c) == L for c in cur) and L > 0
        prompts = [seq[:len(seq) - L] for seq in state.sequences(ctx.rows)]
        prop = [[] for _ in rows]
        logq = torch.zeros(len(rows), dtype=torch.float64)
        logp, logq_cur = logq.clone(), logq.clone()
        for t in range(L):
            lp = lm.next_logprobs([p + y for p, y in zip(prompts, prop)]).double()
            q = lp.clone()
            q[:, eos] = -math.inf
            q = torch.log_softmax(q, -1)
            v = torch.multinomial(q.exp(), 1, generator=gen).squeeze(1)
            logq += q.gather(1, v[:, None]).squeeze(1)
            logp += lp.gather(1, v[:, None]).squeeze(1)
            for y, x in zip(prop, v.tolist()):
                y.append(x)
            lc = lm.next_logprobs([p + c[:t] for p, c in zip(prompts, cur)]).double()
            lc[:, eos] = -math.inf
            logq_cur += torch.log_softmax(lc, -1)[torch.arange(len(rows)), [c[t] for c in cur]]
        log_a = ctx.exponent * (logp - ctx.log_p[ctx.rows]) + logq_cur - logq
        acc = torch.rand(len(rows), generator=gen, dtype=torch.float64).log() < log_a
        moved = [rows[k] for k in acc.nonzero().flatten().tolist()]
        if moved:
            state.truncate(moved, [0] * len(moved))
            state.extend([prop[k] for k in acc.nonzero().flatten().tolist()], moved)
            ctx.log_p[moved] = logp[acc]
        return len(moved)


def test_rejuvenation_hook_keeps_the_target():
    target = pp.Target(LM, pp.Power(4.0))
    kernel = ExactGibbsKernel()
    smc = pp.SMC(BUDGET[4.0][0], ess_threshold=1.0, rejuvenate=kernel)
    check_smc(smc, target, 4.0, 6, "SMC + exact independent MH moves", exact=exact_power(4.0))
    res = smc.run(target, PROMPT, T, seed=9)
    assert kernel.calls > 0 and res.stats["moves_accepted"] > 0
    assert len(res.steps["moves_accepted"]) == len(res.steps["ess"])


def test_determinism_and_result_fields():
    target = pp.Target(LM, pp.Power(2.0))
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
    for kw in ({"n_particles": 0}, {"n_particles": 2, "ess_threshold": 1.5},
               {"n_particles": 2, "resampling": "nope"}, {"n_particles": 2, "ess_threshold": -0.1}):
        with pytest.raises(ValueError):
            pp.SMC(**kw)
    impossible = pp.Target(LM, pp.Power(2.0) * pp.Constraint(lambda c: False))
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
        pp.SMC(4).run(target, [0], T, seed=0)


@pytest.mark.parametrize("proposal", [pp.proposals.TopK(1, epsilon=0.5), pp.proposals.TopP(0.5, epsilon=0.5)])
def test_restricted_proposals_stay_exact(proposal):
    """Weight-corrected top-k/top-p: p^4 splits its mass between the two fork tokens, so the
    second one comes from the defensive mixture (ε) with a large weight: more particles."""
    check_smc(pp.SMC(2500, proposal=proposal), pp.Target(LM, pp.Power(4.0)), 4.0, 6, repr(proposal),
              exact=exact_power(4.0))
