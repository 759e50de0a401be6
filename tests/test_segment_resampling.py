"""Segment steps that resample must not be worse than not resampling (issue 39, item 3).

On the ``"truncating"`` toy at α = 4 with ``Until(3, max_tokens=3)``, resampling among *all*
particles after a segment (the rule before ``Until(resample=...)``) copies the short prefix
``(3,)``: its one-token look-ahead twist does not know the cost of the tokens it has still to
draw, so it gets ~97 % of the first step's weight although its final mass is 0.33, and a run is
2.5× farther from the target than plain importance sampling.  The default rule resamples
within position classes (:func:`llmppl.inference.steps.position_classes`); these tests check
that it is no worse than not resampling, exact against ``llmppl.exact`` with impostors, that
``Ẑ`` stays unbiased, and the pure resampling function itself
(:func:`llmppl.inference.resampling.draw_ancestors_within`).  ``benchmarks/segment_steps.py``
has the full measurement (N = 2000, every delimiter).
"""

from __future__ import annotations

import math
import statistics
import warnings

import numpy as np
import pytest
import torch

import llmppl as pp
from llmppl.exact import enumerate_target
from llmppl.inference.resampling import (RESAMPLERS, class_log_means, draw_ancestors, draw_ancestors_within,
                                         within_class_ess)
from llmppl.models.toy import EXACTNESS

from _exactness import check, impostors

SETUP = EXACTNESS["truncating"]
LM, PROMPT, T = SETUP.lm(), SETUP.prompt, SETUP.max_new_tokens
TARGET = pp.Target(LM, pp.Power(4.0))
EXACT = enumerate_target(TARGET, PROMPT, T)
DELIM = 3


def until(**kw) -> pp.steps.Until:
    return pp.steps.Until(DELIM, max_tokens=3, **kw)


def tvs(smc: pp.SMC, runs: int, seed: int = 0) -> list[float]:
    """The TV of ``runs`` independent runs (the prompts of one batch: each prompt's particles are
    distributed as in its own run)."""
    return [EXACT.tv(r.samples, r.weights) for r in smc.run_batch(TARGET, [PROMPT] * runs, T, seed=seed)]


# ----------------------------------------------------------------------------- the pure function
def _weights_and_classes(G: int = 2, N: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    log_w = torch.randn((G, N), generator=g, dtype=torch.float64) * 1.5
    classes = torch.tensor([[0, 0, 1, 1, 1, 2, 0, 1, -1, -2, 2, 0],
                            [5, 5, 5, 5, 7, 7, 7, -3, 5, 7, 7, 5]])[:G, :N]
    return log_w, classes


@pytest.mark.parametrize("scheme", sorted(RESAMPLERS))
def test_each_class_keeps_its_count_and_its_weight(scheme):
    log_w, classes = _weights_and_classes()
    need = torch.tensor([True, True])
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        anc, after = draw_ancestors_within(RESAMPLERS[scheme], gen, log_w, need, classes)
        # N_c offspring drawn from each class (in any slots: survivors keep theirs)
        assert torch.equal(classes.gather(1, anc).sort(1).values, classes.sort(1).values)
        single = (classes < 0)
        assert torch.equal(anc[single], torch.arange(12).expand(2, 12)[single])   # a class of one keeps its particle
        assert torch.allclose(after, class_log_means(log_w, classes).gather(1, anc))   # its class's mean weight
        assert torch.allclose(torch.logsumexp(after, 1), torch.logsumexp(log_w, 1))


def test_one_class_is_ordinary_resampling_and_no_need_is_the_identity():
    log_w, _ = _weights_and_classes()
    one = torch.zeros_like(log_w, dtype=torch.long)
    need = torch.tensor([True, False])
    r = RESAMPLERS["systematic"]
    a1 = draw_ancestors(r, torch.Generator().manual_seed(3), log_w, need)
    a2, after = draw_ancestors_within(r, torch.Generator().manual_seed(3), log_w, need, one)
    assert torch.equal(a1, a2)
    assert torch.allclose(after[0], torch.logsumexp(log_w[0], 0) - math.log(12))
    assert torch.equal(after[1], log_w[1]) and torch.equal(a2[1], torch.arange(12))
    assert torch.allclose(within_class_ess(log_w, one), torch.exp(2 * torch.logsumexp(log_w, 1)
                                                                  - torch.logsumexp(2 * log_w, 1)))


def test_resampling_within_classes_is_unbiased():
    """E[Σ_j w'_j f(x'_j)] = Σ_i w_i f(x_i) (multinomial within classes, 4000 draws as 4000 groups,
    4 SE); the impostor — offspring with equal weights, as ordinary resampling gives them — is far off."""
    log_w, classes = _weights_and_classes(G=1)
    M = 4000
    f = torch.linspace(-1.0, 2.0, 12, dtype=torch.float64)
    w = torch.exp(log_w[0])
    want = float((w * f).sum())
    anc, after = draw_ancestors_within(RESAMPLERS["multinomial"], torch.Generator().manual_seed(5),
                                       log_w.expand(M, 12), torch.ones(M, dtype=torch.bool), classes.expand(M, 12))
    got = (torch.exp(after) * f[anc]).sum(1)
    naive = w.sum() / 12 * f[anc].sum(1)
    se = float(got.std() / math.sqrt(M))
    assert abs(float(got.mean()) - want) < 4 * se + 1e-9
    assert abs(float(naive.mean()) - want) > 10 * max(se, 1e-3)


# ----------------------------------------------------------------------------- the engine
def test_until_resample_option():
    assert until().resample == "position" and "resample" not in repr(until())
    assert "resample='all'" in repr(until(resample="all"))
    with pytest.raises(ValueError, match="resample"):
        until(resample="nearby")


def test_at_exponent_one_every_particle_competes():
    """At a_t = 1 tokens cost nothing in expectation: the default rule is the old one, draw for draw."""
    target = pp.Target(LM)
    a = pp.SMC(64, step=until(), ess_threshold=1.0).run(target, PROMPT, T, seed=2)
    b = pp.SMC(64, step=until(resample="all"), ess_threshold=1.0).run(target, PROMPT, T, seed=2)
    assert a.samples == b.samples and a.log_weights == b.log_weights and sum(a.steps["resampled"]) >= 2


def test_segment_resampling_is_no_worse_than_none_on_the_truncating_setup():
    """Single runs (N = 500, 8 seeds, resampling after every segment): resampling among all
    particles is > 2× farther from the target than not resampling; within positions it is within
    0.02 of it (measured: all 0.50, none 0.195, position 0.200)."""
    N, runs = 500, 8
    none = tvs(pp.SMC(N, step=until(), ess_threshold=0.0), runs)
    old = tvs(pp.SMC(N, step=until(resample="all"), ess_threshold=1.0), runs)
    new = tvs(pp.SMC(N, step=until(), ess_threshold=1.0), runs)
    m_none, m_old, m_new = (statistics.fmean(x) for x in (none, old, new))
    print(f"mean TV: none {m_none:.3f}, all {m_old:.3f}, position {m_new:.3f}")
    assert m_old > 2 * m_none                       # the trap this fixes
    assert m_new < m_none + 0.02
    # with the default threshold the within-position ESS rarely asks for it: no worse either
    half = tvs(pp.SMC(N, step=until()), runs)
    assert statistics.fmean(half) < m_none + 0.02


def test_segment_resampling_within_positions_is_exact_and_unbiased():
    """Pooled 12 × 1000 particles, κ = 1: TV < 0.05 with the impostors (mode, low temperature,
    base LM) farther than 1.5 × that, where resampling among all particles is > 0.1 off; and the
    mean of Ẑ/Z over 300 runs of 8 particles within 4 SE of 1."""
    def pooled(smc: pp.SMC, runs: int) -> tuple[list, list]:
        res = smc.run_batch(TARGET, [PROMPT] * runs, T, seed=100)
        return [s for r in res for s in r.samples], [w / runs for r in res for w in r.weights]

    s, w = pooled(pp.SMC(1000, step=until(), ess_threshold=1.0), 12)
    check(EXACT, s, w, 0.05, impostors(LM, PROMPT, T, 4.0), "Until(3) within positions, kappa=1")
    s, w = pooled(pp.SMC(1000, step=until(resample="all"), ess_threshold=1.0), 4)
    assert EXACT.tv(s, w) > 0.1
    small = pp.SMC(8, step=until(), ess_threshold=1.0)     # 300 prompts: 300 independent runs
    Z = np.array([math.exp(r.log_evidence) for r in small.run_batch(TARGET, [PROMPT] * 300, T, seed=0)]) / EXACT.Z
    se = Z.std(ddof=1) / math.sqrt(len(Z))
    print(f"mean Zhat/Z {Z.mean():.4f} ± {se:.4f}")
    assert 4 * se < 0.15 and abs(Z.mean() - 1.0) < 4 * se
    assert abs(enumerate_target(pp.Target(LM, pp.Power(2.0)), PROMPT, T).Z / EXACT.Z - 1.0) > 4 * se


def test_a_warning_when_positions_are_scattered():
    """Long segments on a 50-token LM at α = 4: the live particles are mostly alone at their
    position, so resampling within positions does little, and the engine says so; the toy
    (three positions) does not warn."""
    lm = pp.models.NGramLM(vocab_size=50, seed=1, eos_boost=0.0)
    with pytest.warns(UserWarning, match="alone at their position"):
        pp.SMC(64, step=pp.steps.Until(7, max_tokens=30), ess_threshold=1.0).run(pp.Target(lm, pp.Power(4.0)),
                                                                                  [0], 60, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pp.SMC(64, step=until(), ess_threshold=1.0).run(TARGET, PROMPT, T, seed=0)
