"""Engines as ``init`` / ``step`` / ``results`` over a state of tensors (SMC, MH), and SMC's pure pieces.

* Driving ``smc.init`` → ``smc.step`` until ``state.done`` → ``smc.results`` by hand is
  ``run_batch`` (same seed, same particles), and its pooled particles match exact enumeration
  on three ragged prompts (impostors fail the same check).
* ``weights.reweight`` against a direct computation of ``log Σ_i W̄_i w_i`` and the ESS, for
  any weights (hypothesis), zeros included; failed groups stay failed; inputs are not written.
* ``resampling.draw_ancestors``: offspring counts unbiased (``E[c_i] = N·w̄_i``) where a group
  resamples, the identity where it does not, survivors in their own slot.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llmppl as pp
from llmppl.exact import enumerate_target
from llmppl.inference.resampling import RESAMPLERS, draw_ancestors, needs_resampling
from llmppl.inference.weights import reweight
from llmppl.models.toy import EXACTNESS

from _exactness import check, impostors

pytestmark = pytest.mark.usefixtures("one_thread")

SETUP = EXACTNESS["prompts"]
LM = SETUP.lm()
PROMPTS = [list(p) for p in SETUP.prompts[:3]]
T = SETUP.max_new_tokens
TARGET = pp.Target(LM, pp.Power(2.0))


def by_hand(smc, prompts, seed, max_new_tokens=T):
    state = smc.init(TARGET, prompts, max_new_tokens, seed=seed)
    steps = 0
    while not state.done:
        new, info = smc.step(state)
        assert new is state and info.step == state.t
        assert info.ess.shape == (len(prompts),) and info.ancestors.shape == (len(prompts), smc.n_particles)
        steps += 1
        assert state.t == steps
    return smc.results(state), state


def test_init_step_results_is_run_batch():
    smc = pp.SMC(16, ess_threshold=0.7)
    mine, state = by_hand(smc, PROMPTS, seed=3)
    theirs = smc.run_batch(TARGET, PROMPTS, T, seed=3)
    assert state.particles.G == 3 and state.particles.N == 16
    for a, b in zip(mine, theirs):
        assert a.samples == b.samples
        np.testing.assert_array_equal(a.log_weights, b.log_weights)
        assert a.log_evidence == b.log_evidence
        assert a.steps["resampled"] == b.steps["resampled"]
    with pytest.raises(ValueError, match="has ended"):
        smc.step(state)


def test_results_before_a_step_is_an_error():
    smc = pp.SMC(4)
    with pytest.raises(ValueError, match="no SMC step"):
        smc.results(smc.init(TARGET, PROMPTS[:1], T, seed=0))


def test_step_by_step_matches_exact_enumeration():
    smc = pp.SMC(2500, ess_threshold=0.5)
    pooled = [([], []) for _ in PROMPTS]
    seeds = range(8)
    for seed in seeds:
        for k, res in enumerate(by_hand(smc, PROMPTS, seed)[0]):
            pooled[k][0].extend(res.samples)
            pooled[k][1].extend(list(res.weights / len(seeds)))
    for k, prompt in enumerate(PROMPTS):
        exact = enumerate_target(TARGET, prompt, T)
        check(exact, *pooled[k], 0.03, impostors(LM, prompt, T, 2.0), f"init/step prompt {k}")


def _log_p(prompt, seq, finished):
    """``log p(y | x)`` from the LM's own uncached forward (EOS included when finished)."""
    full = list(seq) + ([LM.eos_token_id] if finished else [])
    rows = LM.next_logprobs([list(prompt) + full[:t] for t in range(len(full))]).double()
    return float(rows[torch.arange(len(full)), torch.tensor(full)].sum()) if full else 0.0


@pytest.mark.parametrize("engine", [
    pp.SMC(24, ess_threshold=0.9),
    pp.SMC(24, ess_threshold=0.9, step=pp.steps.Tokens(2)),
    pp.SMC(24, ess_threshold=0.9, rejuvenate=pp.MH(1, 2)),
], ids=["tokens", "blocks", "moves"])
def test_tokens_have_one_home_the_decoding_state(engine):
    """The particles keep no token buffer: a completion is the decoding state's fed tokens plus
    the cut token that was never fed (``particles.unfed``), and it is the sequence whose
    ``log p`` the run accumulated (checked against the LM's own forward)."""
    short = T - 1    # short enough that some rows are cut (the toy LM always ends by T)
    results, state = by_hand(engine, PROMPTS, seed=5, max_new_tokens=short)
    P, fed = state.particles, state.decoding.tokens
    assert not hasattr(P, "tokens")
    unfed, length = P.unfed.tolist(), P.length.tolist()
    cut = 0
    for g, res in enumerate(results):
        for i, (seq, fin, trunc) in enumerate(zip(res.samples, res.finished, res.truncated)):
            r = g * P.N + i
            assert len(seq) == length[r]
            if trunc:
                cut += 1
                assert len(seq) == short and fed[r] == seq[:-1] and unfed[r] == seq[-1]
            else:
                assert fed[r] == seq and unfed[r] == -1
            assert res.log_p[i] == pytest.approx(_log_p(PROMPTS[g], seq, fin), abs=1e-9)
    assert cut and cut < P.R        # both kinds of rows were checked


# --------------------------------------------------------------------------- pure pieces
log_weight = st.one_of(st.just(-math.inf), st.floats(-30, 30))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 6), st.data())
def test_reweight_against_direct_computation(G, N, data):
    lw = torch.tensor(data.draw(st.lists(log_weight, min_size=G * N, max_size=G * N)),
                      dtype=torch.float64).view(G, N)
    inc = torch.tensor(data.draw(st.lists(log_weight, min_size=G * N, max_size=G * N)),
                       dtype=torch.float64).view(G, N)
    failed = ~torch.isfinite(torch.logsumexp(lw, 1))        # a group with no weight has failed
    log_Z = torch.where(failed, -math.inf, torch.tensor(data.draw(st.floats(-5, 5))))
    before = (lw.clone(), inc.clone(), log_Z.clone(), failed.clone())
    rw = reweight(lw, inc, log_Z, failed)
    for x, y in zip((lw, inc, log_Z, failed), before):
        assert torch.equal(x, y)                             # pure: nothing written
    for g in range(G):
        W, w = lw[g].exp().numpy(), inc[g].exp().numpy()
        new = W * w
        if failed[g] or new.sum() == 0:
            assert rw.log_Z[g] == -math.inf and rw.increment[g] == 0 and rw.ess[g] == 0
            assert bool(rw.newly_failed[g]) == (not bool(failed[g]))
            continue
        direct = math.log((W / W.sum() * w).sum())           # log Σ_i W̄_i w_i
        assert rw.increment[g].item() == pytest.approx(direct, abs=1e-9)
        assert rw.log_Z[g].item() == pytest.approx(log_Z[g].item() + direct, abs=1e-9)
        assert rw.ess[g].item() == pytest.approx(new.sum() ** 2 / (new ** 2).sum(), rel=1e-9)
        assert 1.0 - 1e-9 <= rw.ess[g].item() <= N + 1e-9


@pytest.mark.parametrize("scheme", sorted(RESAMPLERS))
def test_draw_ancestors_unbiased_and_in_place(scheme):
    gen = torch.Generator().manual_seed(0)
    w = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2]], dtype=torch.float64)
    need = torch.tensor([True, False])
    reps, counts = 4000, torch.zeros(5, dtype=torch.float64)
    for _ in range(reps):
        anc = draw_ancestors(RESAMPLERS[scheme], gen, w.log(), need)
        assert torch.equal(anc[1], torch.arange(5))                 # no resampling: the identity
        c = torch.bincount(anc[0], minlength=5)
        survived = c > 0
        assert torch.equal(anc[0][survived], torch.arange(5)[survived])   # survivors keep their slot
        counts += c
    np.testing.assert_allclose(counts / reps, 5 * w[0], atol=0.05)   # E[c_i] = N w_i


def test_needs_resampling_threshold():
    ess = torch.tensor([1.0, 3.0, 5.0], dtype=torch.float64)
    live = torch.tensor([True, True, False])
    assert needs_resampling(ess, live, 0.5, 8).tolist() == [True, True, False]
    assert needs_resampling(ess, live, 1.0, 8).tolist() == [True, True, False]
    assert needs_resampling(ess, live, 0.0, 8).tolist() == [False, False, False]
    assert needs_resampling(ess, live, 0.25, 8).tolist() == [True, False, False]


# --------------------------------------------------------------------------- MH
def test_mh_init_step_results_is_run_batch():
    mh = pp.MH(block_size=2, n_mcmc=3)
    state = mh.init(TARGET, PROMPTS, T, chains=5, seed=7)
    assert state.n_stages == math.ceil(T / 2)
    while not state.done:
        new, info = mh.step(state)
        assert new is state and info.step == state.stage and info.acceptance.shape == (len(PROMPTS),)
        assert len(state.stage_length) == state.stage
    mine = mh.results(state)
    theirs = mh.run_batch(TARGET, PROMPTS, T, chains=5, seed=7)
    for a, b in zip(mine, theirs):
        assert a.samples == b.samples
        assert a.log_p == b.log_p
        assert a.chains["acceptance"] == b.chains["acceptance"]
    with pytest.raises(ValueError, match="has ended"):
        mh.step(state)
    with pytest.raises(ValueError, match="no MH stage"):
        mh.results(mh.init(TARGET, PROMPTS, T, chains=2, seed=0))


# --------------------------------------------------------------------------- decoding baselines
@pytest.mark.parametrize("engine", [pp.baselines.Plain(6), pp.baselines.LowTemperature(0.5, 6), pp.baselines.Greedy(),
                                    pp.baselines.BestOfN(6), pp.samplers.ScalablePower(2, 2, 2, n=3)], ids=repr)
def test_baselines_init_step_results_is_run_batch(engine):
    """The baselines have the engines' shape too: their one step decodes every row (one block)."""
    state = engine.init(TARGET, PROMPTS, T, seed=11)
    assert not state.done
    with pytest.raises(ValueError, match="call step"):
        engine.results(state)
    new, info = engine.step(state)
    assert new is state and state.done and info.tokens.shape == (len(PROMPTS),)
    with pytest.raises(ValueError, match="has been decoded"):
        engine.step(state)
    mine, theirs = engine.results(state), engine.run_batch(TARGET, PROMPTS, T, seed=11)
    for a, b in zip(mine, theirs):
        assert a.samples == b.samples and a.log_weights == b.log_weights and a.log_p == b.log_p
        assert a.method == b.method and a.stats["tokens_decoded"] == b.stats["tokens_decoded"]
