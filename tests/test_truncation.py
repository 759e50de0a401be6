"""Truncation as a choice of the target: ``Target(..., truncation="keep" | "zero")``.

On the ``"truncating"`` setup the target ``p^2`` puts 0.29 of its mass on completions
cut at ``max_new_tokens`` under ``"keep"``; ``"zero"`` is the same target conditioned on
finishing.  SMC and MH must sample each option's own exact target (the other option is
one of the impostors), and ``Result.truncated_share`` must report the cut weight.
"""

import math

import numpy as np
import pytest

import llmppl as pp
from llmppl.exact import enumerate_target
from llmppl.inference.common import AllParticlesDied
from llmppl.models.toy import EXACTNESS

from _exactness import check, impostors, pooled

SETUP = EXACTNESS["truncating"]
LM = SETUP.lm()
PROMPT = SETUP.prompt
T = SETUP.max_new_tokens
ALPHA = 2.0
OTHER = {"keep": "zero", "zero": "keep"}


pytestmark = pytest.mark.usefixtures("one_thread")


def setup_for(truncation):
    target = pp.Target(LM, pp.Power(ALPHA), truncation=truncation)
    ex = enumerate_target(target, PROMPT, T)
    other = enumerate_target(pp.Target(LM, pp.Power(ALPHA), truncation=OTHER[truncation]), PROMPT, T)
    imp = impostors(LM, PROMPT, T, ALPHA, truncation=truncation)
    imp[f"truncation={OTHER[truncation]!r}"] = other.as_dict()
    return target, ex, imp


@pytest.mark.parametrize("truncation", ["keep", "zero"])
def test_smc_samples_each_truncation_option(truncation):
    target, ex, imp = setup_for(truncation)
    smc = pp.SMC(2500)
    results = [smc.run(target, PROMPT, T, seed=s) for s in range(8)]
    s, w = pooled(lambda seed: results[seed], range(8))
    check(ex, s, w, 0.04, imp, f"SMC truncation={truncation!r}")
    share = float(np.mean([r.truncated_share for r in results]))
    print(f"truncated weight share {share:.4f}, exact truncated mass {ex.truncated_mass:.4f} "
          f"(keep: {enumerate_target(pp.Target(LM, pp.Power(ALPHA)), PROMPT, T).truncated_mass:.4f})")
    if truncation == "keep":
        assert abs(share - ex.truncated_mass) < 0.02
        assert "weight share" in results[0].summary()
    else:
        assert share == 0.0
        # cut particles are still returned, with weight zero
        assert any(any(r.truncated) for r in results)
        for r in results:
            assert all(lw == -math.inf for lw, t in zip(r.log_weights, r.truncated) if t)


@pytest.mark.parametrize("truncation", ["keep", "zero"])
def test_mh_samples_each_truncation_option(truncation):
    target, ex, imp = setup_for(truncation)
    # under "zero" the chains cut at the last stage weigh nothing until a move ends them:
    # MH needs about 10 moves per stage to forget its start there
    mh = pp.MH(block_size=2, n_mcmc=10)
    s, w = pooled(lambda seed: mh.run(target, PROMPT, T, chains=5000, seed=seed), range(2))
    check(ex, s, w, 0.05, imp, f"MH truncation={truncation!r}")


def test_run_batch_honours_the_option():
    target = pp.Target(LM, pp.Power(ALPHA), truncation="zero")
    results = pp.SMC(64).run_batch(target, [PROMPT, [1, 4]], T, seed=0)
    assert all(r.truncated_share == 0.0 for r in results)
    assert "truncation='zero'" in results[0].config["target"]


def test_smc_says_when_every_particle_is_cut():
    """No completion of the truncating setup ends within 2 tokens (EOS has probability 1e-9)."""
    target = pp.Target(LM, pp.Power(ALPHA), truncation="zero")
    with pytest.raises(AllParticlesDied, match="max_new_tokens"):
        pp.SMC(16).run(target, PROMPT, 2, seed=0)


def test_target_explains_an_all_cut_population():
    """What an engine can put in its error when every particle is cut under 'zero'."""
    zero = pp.Target(LM, pp.Power(ALPHA), truncation="zero")
    assert "raise max_new_tokens" in zero.explain_zero_weight([True, True], 2)
    assert "max_new_tokens=2" in zero.explain_zero_weight([True, True], 2)
    assert zero.explain_zero_weight([True, False], 2) is None
    assert pp.Target(LM, pp.Power(ALPHA)).explain_zero_weight([True, True], 2) is None


def test_truncated_share_and_summary():
    res = pp.Result(method="x", prompt_ids=[0], samples=[[1], [2, 3], [3, 3]],
                    log_weights=[math.log(0.2), math.log(0.3), math.log(0.5)],
                    finished=[True, False, False], truncated=[False, True, True])
    assert res.truncated_share == pytest.approx(0.8)
    assert "truncated=2/3 (weight share 0.800)" in res.summary()
    res.log_weights = [0.0, -math.inf, -math.inf]
    assert res.truncated_share == 0.0
    res.truncated = [False, False, False]
    assert res.truncated_share == 0.0 and "truncated" not in res.summary()
    res.truncated = [True, False, False]
    res.log_weights = [-math.inf] * 3
    assert math.isnan(res.truncated_share)
