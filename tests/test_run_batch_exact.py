"""``run_batch`` against exact enumeration: many ragged prompts, each with its own target.

The ``"prompts"`` setup (``llmppl.models.toy.EXACTNESS``): a ``ForkingLM`` whose first
tokens depend on the last three prompt tokens, and eight ragged prompts (lengths 2, 3
and 5) with effective supports 10-22 under ``p^2``.  For P ∈ {1, 3, 8} prompts, each
prompt's pooled weighted particles must lie within TV 0.03 of *its own* exact target,
while the mode, low temperature, the base LM and the other prompts' targets lie
farther — so particles mixed up between prompts fail.  These tests hold the contract
of ``engine.run_batch`` (one ``Result`` per prompt, in order), whatever its
implementation (per-prompt loop or one batched decoding state).
"""

import functools
import math

import numpy as np
import pytest

import llmppl as pp
from llmppl.exact import enumerate_target, tv_distance
from llmppl.inference.common import AllParticlesDied
from llmppl.models.toy import EXACTNESS, ForkingLM

from _exactness import check, impostors

SETUP = EXACTNESS["prompts"]
LM = SETUP.lm()
PROMPTS = [list(p) for p in SETUP.prompts]
T = SETUP.max_new_tokens
ALPHA = 2.0
TARGET = pp.Target(LM, pp.Power(ALPHA))
THRESHOLD = 0.03


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def exact(k, alpha=ALPHA):
    return enumerate_target(pp.Target(LM, pp.Power(alpha)), PROMPTS[k], T)


@functools.cache
def others(k, P, alpha=ALPHA):
    """Impostors of prompt k: low temperature, base LM, and the targets of the other prompts
    of the batch that differ from its own."""
    out = impostors(LM, PROMPTS[k], T, alpha)
    for j in range(P):
        d = exact(j, alpha).as_dict()
        if j != k and tv_distance(exact(k, alpha).as_dict(), d) > 0.1:
            out[f"prompt {j}'s target"] = d
    return out


def pooled_batch(run, P, seeds):
    """Per prompt: samples and weights of ``run(seed)`` (a list of P Results), pooled over seeds."""
    out = [([], []) for _ in range(P)]
    for seed in seeds:
        results = run(seed)
        assert len(results) == P
        for k, res in enumerate(results):
            assert res.error is None and res.prompt_ids == PROMPTS[k]
            out[k][0].extend(res.samples)
            out[k][1].extend(res.weights / len(seeds))
    return out


def check_batch(run, P, seeds, label, alpha=ALPHA):
    per_prompt = pooled_batch(run, P, seeds)
    tvs = [check(exact(k, alpha), s, w, THRESHOLD, others(k, P, alpha), f"{label} prompt {k}")
           for k, (s, w) in enumerate(per_prompt)]
    print(f"{label}: TV per prompt {np.round(tvs, 4).tolist()}")


SMC_CASES = [  # (P, resampling, schedule); every step resamples (ess_threshold=1), per prompt
    (8, "systematic", pp.schedules.Constant()),
    (3, "multinomial", pp.schedules.Linear(1.0, 3)),
    (3, "stratified", pp.schedules.Geometric(1.0, 3)),
    (1, "residual", pp.schedules.AdaptiveESS(0.5)),
]


@pytest.mark.parametrize("P,scheme,schedule", SMC_CASES, ids=[f"P{c[0]}-{c[1]}" for c in SMC_CASES])
def test_smc_run_batch_matches_each_prompts_target(P, scheme, schedule):
    smc = pp.SMC(2500, resampling=scheme, ess_threshold=1.0, schedule=schedule)
    check_batch(lambda seed: smc.run_batch(TARGET, PROMPTS[:P], T, seed=seed), P, range(8),
                f"SMC {scheme} {schedule!r} P={P}")


def test_mh_run_batch_matches_each_prompts_target():
    mh = pp.MH(block_size=2, n_mcmc=5)
    check_batch(lambda seed: mh.run_batch(TARGET, PROMPTS[:3], T, chains=6000, seed=seed), 3, range(2),
                "MH P=3")


def test_plain_run_batch_matches_the_base_lm():
    plain = pp.baselines.Plain(n=9000)
    check_batch(lambda seed: plain.run_batch(TARGET, PROMPTS[:3], T, seed=seed), 3, range(4),
                "Plain P=3", alpha=1.0)


def test_evidence_per_prompt_is_unbiased():
    """Mean Ẑ per prompt within 4 SE of its exact Z (and 4 SE < 10 % of Z: a 10 % bias fails)."""
    smc = pp.SMC(4, resampling="systematic")
    Z = np.array([[math.exp(r.log_evidence) for r in smc.run_batch(TARGET, PROMPTS[:3], T, seed=s)]
                  for s in range(200)])
    se = Z.std(axis=0, ddof=1) / math.sqrt(len(Z))
    for k in range(3):
        z = exact(k).Z
        print(f"prompt {k}: Zhat {Z[:, k].mean():.5g} ± {se[k]:.3g}, exact {z:.5g}")
        assert 4 * se[k] < 0.1 * z
        assert abs(Z[:, k].mean() - z) < 4 * se[k]
    # prompt 0's evidence differs from the others' by more than 4 SE: a mix-up would fail
    assert all(abs(exact(j).Z - exact(0).Z) > 4 * se[0] for j in (1, 2))


ENGINES = {
    "smc": lambda: pp.SMC(16, ess_threshold=1.0),
    "mh": lambda: pp.MH(block_size=2, n_mcmc=2),
    "plain": lambda: pp.baselines.Plain(n=8),
}


def _batch(name, engine, prompts, seed):
    kw = {"chains": 4} if name == "mh" else {}
    return engine.run_batch(TARGET, prompts, T, seed=seed, **kw)


def _run(name, engine, prompt, seed):
    kw = {"chains": 4} if name == "mh" else {}
    return engine.run(TARGET, prompt, T, seed=seed, **kw)


@pytest.mark.parametrize("name", sorted(ENGINES))
def test_same_seed_same_results_and_one_prompt_equals_run(name):
    engine = ENGINES[name]()
    a, b = _batch(name, engine, PROMPTS, 5), _batch(name, engine, PROMPTS, 5)
    assert [r.samples for r in a] == [r.samples for r in b]
    assert [r.log_weights for r in a] == [r.log_weights for r in b]
    assert [r.log_evidence for r in a] == [r.log_evidence for r in b]
    assert [r.prompt_ids for r in a] == PROMPTS
    c = _batch(name, engine, PROMPTS, 6)
    assert [r.samples for r in a] != [r.samples for r in c]
    for k in (0, 2):
        one = _batch(name, engine, [PROMPTS[k]], 11)[0]
        ref = _run(name, engine, PROMPTS[k], 11)
        assert one.samples == ref.samples
        assert one.log_weights == pytest.approx(ref.log_weights)
        assert one.finished == ref.finished and one.prompt_ids == ref.prompt_ids
        if ref.log_evidence is not None:
            assert one.log_evidence == pytest.approx(ref.log_evidence)


class DoomedLM(ForkingLM):
    """The prompts setup's LM, except that after a prompt starting ``1 1 1`` only EOS can follow."""

    def next_logprobs(self, sequences):
        out = super().next_logprobs(sequences)
        for i, s in enumerate(sequences):
            if s[:3] == [1, 1, 1]:
                out[i] = -math.inf
                out[i, self.eos_token_id] = 0.0
        return out


@pytest.mark.parametrize("name", ["smc", "mh"])
def test_a_prompt_whose_particles_all_die_gets_an_error(name):
    """(Plain ignores the target's density: it has no particles to lose.)"""
    lm = DoomedLM(seed=SETUP.seed, eos_profile=SETUP.eos_profile)
    non_empty = pp.Constraint(lambda c: len(c.token_ids) > 0, name="non_empty")
    target = pp.Target(lm, pp.Power(ALPHA) * non_empty)
    prompts = [PROMPTS[0], [1, 1, 1, 4], PROMPTS[1]]
    engine = ENGINES[name]()
    kw = {"chains": 4} if name == "mh" else {}
    results = engine.run_batch(target, prompts, T, seed=0, **kw)
    assert [r.prompt_ids for r in results] == prompts
    assert isinstance(results[1].error, str) and results[1].error
    for k in (0, 2):
        assert results[k].error is None and results[k].n > 0
        assert all(len(s) > 0 for s in results[k].samples)
    with pytest.raises(AllParticlesDied):
        engine.run(target, prompts[1], T, seed=0, **kw)


@pytest.mark.parametrize("name", sorted(ENGINES))
def test_bad_input_names_the_prompt(name):
    engine = ENGINES[name]()
    with pytest.raises(ValueError, match="prompts must be a non-empty list"):
        _batch(name, engine, [], 0)
    with pytest.raises(ValueError, match="prompt 2: .*out of range"):
        _batch(name, engine, [PROMPTS[0], PROMPTS[1], [0, LM.vocab_size, 4]], 0)
    with pytest.raises(ValueError, match="prompt 1: "):
        _batch(name, engine, [PROMPTS[0], [], PROMPTS[1]], 0)


@pytest.mark.parametrize("compact_below", [0.0, 1.0], ids=["never-compact", "always-compact"])
def test_smc_drawing_on_live_rows_only_is_exact(monkeypatch, compact_below):
    """Draws restricted to the live rows (``draw.COMPACT_BELOW``: from the first step, or never) give
    each prompt its own target, with one host sync per step either way."""
    from llmppl.inference import draw as smc_module

    monkeypatch.setattr(smc_module, "COMPACT_BELOW", compact_below)
    smc = pp.SMC(2500, ess_threshold=0.5)
    check_batch(lambda seed: smc.run_batch(TARGET, PROMPTS[:3], T, seed=seed), 3, range(6),
                f"SMC compact_below={compact_below}")
    res = smc.run_batch(TARGET, PROMPTS[:3], T, seed=0)
    assert res[0].stats["host_syncs"] == res[0].stats["n_steps"]
