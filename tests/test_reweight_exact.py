"""The re-weighting baseline against exact enumeration: SNIS of ``p^α`` from plain samples.

``Reweight(n)`` draws ``n`` samples from ``p`` and weights them ``∝ p(y)^(α−1)``.  Its
weighted samples must match ``p^α`` in total variation at large ``n`` (the bias of a
self-normalised estimate is O(1/n)), its ``Ẑ`` must be unbiased, and it must draw *the
same samples* as ``Plain`` with the same seed (compute-matched).  The impostor — the very
same plain samples left unweighted — must fail the TV check.
"""

import argparse
import functools

import numpy as np
import pytest

import llmppl as pp
from llmppl.exact import enumerate_target
from llmppl.inference.reweight import Reweight
from llmppl.methods import build_method
from llmppl.models.toy import EXACTNESS

from _exactness import IMPOSTOR_MARGIN, check, impostors, pooled

pytestmark = pytest.mark.usefixtures("one_thread")

THRESHOLD = 0.04


@functools.cache
def setup(name, alpha, truncation):
    s = EXACTNESS[name]
    lm = s.lm()
    target = pp.Target(lm, pp.Power(alpha), truncation=truncation)
    return s, lm, target, enumerate_target(target, s.prompt, s.max_new_tokens)


@pytest.mark.parametrize("name,alpha,truncation,n,runs", [
    ("fork", 2.0, "keep", 3000, 4),
    ("fork", 4.0, "keep", 4000, 4),
    ("truncating", 2.0, "zero", 3000, 4),
])
def test_reweighted_plain_samples_match_exact_power_target(name, alpha, truncation, n, runs):
    s, lm, target, exact = setup(name, alpha, truncation)
    T = s.max_new_tokens
    samples, weights = pooled(lambda seed: Reweight(n).run(target, s.prompt, T, seed=seed), range(runs))
    others = impostors(lm, s.prompt, T, alpha, truncation=truncation)
    check(exact, samples, weights, THRESHOLD, others, f"reweight {name} alpha={alpha} {truncation}")
    # the impostor: the same plain samples, unweighted, estimate p (not p^alpha) and fail
    unweighted = exact.tv(samples, None)
    print(f"unweighted plain samples: TV = {unweighted:.3f}")
    assert unweighted > IMPOSTOR_MARGIN * THRESHOLD


def test_evidence_is_unbiased():
    s, lm, target, exact = setup("fork", 2.0, "keep")
    runs = [Reweight(20).run(target, s.prompt, s.max_new_tokens, seed=i) for i in range(400)]
    z = np.exp([r.log_evidence for r in runs])
    se = z.std(ddof=1) / np.sqrt(len(z))
    print(f"mean Ẑ {z.mean():.5f} ± {se:.5f}, exact Z {exact.Z:.5f}")
    assert abs(z.mean() - exact.Z) < 4 * se
    # the impostor: weights that forget the proposal (p(y)^alpha, not p(y)^(alpha-1)) on the same samples
    wrong = np.array([np.mean(np.exp(2.0 * np.asarray(r.log_p))) for r in runs])
    print(f"impostor mean {wrong.mean():.5f}")
    assert abs(wrong.mean() - exact.Z) > 4 * max(se, wrong.std(ddof=1) / np.sqrt(len(wrong)))


@pytest.mark.parametrize("truncation", ["keep", "zero"])
def test_same_samples_as_plain_with_the_same_seed(truncation):
    s = EXACTNESS["prompts"]
    lm = s.lm()
    prompts = [list(p) for p in s.prompts]
    T = s.max_new_tokens
    plain = pp.baselines.Plain(n=16).run_batch(pp.Target(lm), prompts, T, seed=7)
    rew = Reweight(16).run_batch(pp.Target(lm, pp.Power(3.0), truncation=truncation), prompts, T, seed=7)
    for a, b in zip(plain, rew):
        assert a.samples == b.samples and a.finished == b.finished
        assert b.method == "reweight"
        lw = np.asarray(b.log_weights)
        expected = 2.0 * np.asarray(a.log_p)  # log p(y)^(alpha - 1)
        if truncation == "zero":
            expected[np.asarray(b.truncated, dtype=bool)] = -np.inf
        if b.error is None:
            ok = np.isfinite(expected)
            # q = log_softmax(log p) recomputed from the LM's float32 log-probs: equal to float32 rounding
            np.testing.assert_allclose(lw[ok], expected[ok], rtol=1e-6, atol=1e-6)
            assert np.all(np.isneginf(lw[~ok]))
        assert a.stats["tokens_decoded"] == b.stats["tokens_decoded"]


def test_registered_as_a_sharpened_method():
    ns = argparse.Namespace(particles=8, alpha=4.0, quiet=True)
    m = build_method("reweight", ns)
    assert m.sharpened and isinstance(m.engine, Reweight) and m.engine.n_particles == 8
    assert m.config == {"method": "reweight", "particles": 8, "alpha": 4.0}
    assert m.engine.smc.ess_threshold == 0.0 and isinstance(m.engine.smc.proposal, pp.proposals.Base)
