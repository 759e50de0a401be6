"""``llmppl.exact`` against values computed by hand."""

import math

import pytest
import torch

import llmppl as pp
from llmppl.exact import enumerate_target, tv_distance
from llmppl.models import NGramLM, TabularLM, pivotal_lm
from llmppl.models.toy import EXACTNESS, ForkingLM

EPS = 1e-9  # pivotal_lm's smoothing


def test_pivotal_base_and_power_by_hand():
    lm = pivotal_lm()
    base = enumerate_target(pp.Target(lm), [0], 3)
    # p(0 2 EOS) = .4 * .9, p(0 EOS) = .4 * .1, p(1 v EOS) = .6 * .25 each
    assert base.prob((0, 2)) == pytest.approx(0.36, abs=1e-6)
    assert base.prob((0,)) == pytest.approx(0.04, abs=1e-6)
    for v in range(4):
        assert base.prob((1, v)) == pytest.approx(0.15, abs=1e-6)
    assert base.log_Z == pytest.approx(0.0, abs=1e-6)

    sharp = enumerate_target(pp.Target(lm, pp.Power(4.0)), [0], 3)
    z = 0.36**4 + 0.04**4 + 4 * 0.15**4
    assert sharp.log_Z == pytest.approx(math.log(z), abs=1e-5)
    assert sharp.prob((0, 2)) == pytest.approx(0.36**4 / z, abs=1e-5)
    # p^4 prefers the pivotal token 0; low temperature prefers 1
    low = enumerate_target(pp.Target(lm, pp.Tempered(0.25)), [0], 3)
    first0_sharp = sum(p for s, p in sharp.as_dict().items() if s and s[0] == 0)
    first0_low = sum(p for s, p in low.as_dict().items() if s and s[0] == 0)
    assert first0_sharp > 0.8 and first0_low < 0.2


def test_truncated_sequences_carry_prefix_mass():
    table = {(0,): [0.5, 0.5, 0.0]}
    lm = TabularLM(vocab_size=3, eos_token_id=2, table=table, default=[0.3, 0.3, 0.4])
    d = enumerate_target(pp.Target(lm), [0], 2)
    # completions: (v, EOS) with v in {0,1}: .5*.4 ; (v, w) truncated: .5*.3 each
    assert d.prob((0,)) == pytest.approx(0.2)
    assert d.prob((0, 1)) == pytest.approx(0.15)
    assert d.log_Z == pytest.approx(0.0, abs=1e-6)
    assert len(d.sequences) == 2 + 4


def test_reward_and_constraint_by_hand():
    lm = pivotal_lm()
    r = lambda cs: [float(len(c.token_ids)) for c in cs]  # noqa: E731
    d = enumerate_target(pp.Target(lm, pp.Power(2.0) * pp.RewardTilt(r, 0.5)), [0], 3)
    # log γ = 2 log p + 2 len
    expect = {(0, 2): 0.36**2 * math.exp(4), (0,): 0.04**2 * math.exp(2)}
    expect.update({(1, v): 0.15**2 * math.exp(4) for v in range(4)})
    z = sum(expect.values())
    for s, g in expect.items():
        assert d.prob(s) == pytest.approx(g / z, abs=1e-6)
    c = enumerate_target(pp.Target(lm, pp.Constraint(lambda comp: comp.token_ids[:1] == [1])), [0], 3)
    assert c.log_Z == pytest.approx(math.log(0.6), abs=1e-6)
    with pytest.raises(ValueError, match="zero mass"):
        enumerate_target(pp.Target(lm, pp.Constraint(lambda comp: False)), [0], 3)


def test_tv_and_empirical():
    d = enumerate_target(pp.Target(NGramLM(vocab_size=3, seed=1)), [0], 4)
    assert abs(sum(d.as_dict().values()) - 1) < 1e-9
    assert d.tv(d.sequences, d.probs.tolist()) < 1e-12
    assert tv_distance({"a": 1.0}, {"b": 1.0}) == 1.0


def test_enumeration_limits():
    with pytest.raises(ValueError, match="max_new_tokens"):
        enumerate_target(pp.Target(NGramLM()), [0], 0)
    with pytest.raises(ValueError, match="smaller vocabulary"):
        enumerate_target(pp.Target(NGramLM(vocab_size=60, seed=0)), [0], 5)


# ------------------------------------------------ the toy targets of the exactness tests
@pytest.mark.parametrize("name", sorted(EXACTNESS))
def test_exactness_setups_are_not_degenerate(name):
    """Each setup's ``p^α`` is spread (1/Σπ² ≥ 10), keeps its truncated mass, and is far
    (TV > 0.1) from the mode, from low temperature τ = 1/α and from the base LM."""
    setup = EXACTNESS[name]
    lm, T = setup.lm(), setup.max_new_tokens
    targets = []
    for prompt in setup.prompts:
        base = enumerate_target(pp.Target(lm), list(prompt), T)
        for alpha in setup.alphas:
            ex = enumerate_target(pp.Target(lm, pp.Power(alpha)), list(prompt), T)
            low = enumerate_target(pp.Target(lm, pp.Tempered(1 / alpha)), list(prompt), T)
            tv_low, tv_base = tv_distance(ex.as_dict(), low.as_dict()), tv_distance(ex.as_dict(), base.as_dict())
            print(f"{name} {prompt} alpha={alpha:g}: support {ex.effective_support:.1f}, truncated "
                  f"{ex.truncated_mass:.3f}, mode {ex.probs.max():.3f}, TV low {tv_low:.3f}, base {tv_base:.3f}")
            assert ex.effective_support >= setup.min_support
            assert ex.truncated_mass >= setup.min_truncated
            assert 1 - float(ex.probs.max()) > 0.1
            if alpha != 1:
                assert tv_low > 0.1 and tv_base > 0.1
            if alpha == 2:
                targets.append(ex.as_dict())
    # ragged prompts condition the target: the first three prompts' targets differ pairwise
    for i in range(min(3, len(targets))):
        for j in range(i):
            assert tv_distance(targets[i], targets[j]) > 0.1
    assert sorted({len(p) for p in setup.prompts}) == ([2] if len(setup.prompts) == 1 else [2, 3, 5])
    assert len(setup.prompts) == 1 or len({len(p) for p in setup.prompts[:3]}) > 1   # ragged
    if name != "truncating":    # completions end after 2 or 3 tokens: particles finish at different steps
        lengths = {len(s) for s, p in ex.as_dict().items() if p > 0.1 / len(ex.sequences)}
        assert {2, 3} <= lengths


def test_forking_lm_contract():
    lm = ForkingLM(seed=3)
    sep, eos = lm.sep_token_id, lm.eos_token_id
    assert (sep, eos) == (4, 5)
    lp = lm.next_logprobs([[0, sep], [1, 2, sep, 0, 1, 2], [0, 1, 2, 3]])
    assert torch.allclose(lp.double().exp().sum(1), torch.ones(3, dtype=torch.float64), atol=1e-6)
    assert float(lp[0, eos].exp()) < 1e-8                     # no EOS before 3 completion tokens
    assert float(lp[1, eos].exp()) == pytest.approx(0.9)      # n = 3 after the last SEP
    assert float(lp[2, eos].exp()) == pytest.approx(0.9)      # no SEP: n counts from the start
    assert ForkingLM(seed=3, eos_profile=(0.0, 0.0, 0.35, 0.85)).next_logprobs(
        [[0, sep, 1, 2]])[0, eos].exp() == pytest.approx(0.35)
    assert float(lp[:, sep].exp().max()) < 1e-8               # SEP is never generated
    assert torch.equal(ForkingLM(seed=3).next_logprobs([[0, sep]]), lp[:1])   # seeded
    assert torch.isfinite(ForkingLM(spill=(0.0, 0.0)).next_logprobs([[0, sep], [1, 2, 3]])).all()
    for kw in ({"vocab_size": 4}, {"fork": (0.0, 1.0)}, {"spill": (0.5, 1.0)}, {"flat": 1.5},
               {"eos_profile": ()}, {"eos_profile": (0.0, 1.0)}, {"order": 0}):
        with pytest.raises(ValueError):
            ForkingLM(**kw)


# ----------------------------------------------------------------- truncation options
def test_truncation_zero_by_hand():
    """Same LM as above: 'zero' keeps only (v, EOS), renormalised; log Z = log 0.4."""
    table = {(0,): [0.5, 0.5, 0.0]}
    lm = TabularLM(vocab_size=3, eos_token_id=2, table=table, default=[0.3, 0.3, 0.4])
    d = enumerate_target(pp.Target(lm, truncation="zero"), [0], 2)
    assert d.as_dict() == pytest.approx({(0,): 0.5, (1,): 0.5})
    assert d.log_Z == pytest.approx(math.log(0.4))
    assert d.truncated_mass == 0.0
    keep = enumerate_target(pp.Target(lm, pp.Power(2.0)), [0], 2)
    zero = enumerate_target(pp.Target(lm, pp.Power(2.0), truncation="zero"), [0], 2)
    assert keep.truncated_mass == pytest.approx(4 * 0.15**2 / (2 * 0.2**2 + 4 * 0.15**2))
    assert zero.log_Z == pytest.approx(math.log(2 * 0.2**2))


@pytest.mark.parametrize("alpha", [1.0, 2.0, 4.0])
def test_truncation_options_on_the_truncating_setup(alpha):
    """'zero' is 'keep' conditioned on finishing: π_zero(y) = π_keep(y) / (1 − π_keep(cut))."""
    setup = EXACTNESS["truncating"]
    lm, prompt, T = setup.lm(), setup.prompt, setup.max_new_tokens
    keep = enumerate_target(pp.Target(lm, pp.Power(alpha)), prompt, T)
    zero = enumerate_target(pp.Target(lm, pp.Power(alpha), truncation="zero"), prompt, T)
    assert keep.truncated_mass >= 0.05 and zero.truncated_mass == 0.0
    assert zero.effective_support >= 10
    assert all(len(s) < T for s in zero.sequences)
    assert zero.log_Z == pytest.approx(keep.log_Z + math.log1p(-keep.truncated_mass), abs=1e-9)
    for s, p in zero.as_dict().items():
        assert p == pytest.approx(keep.prob(s) / (1 - keep.truncated_mass), rel=1e-9)
    assert tv_distance(keep.as_dict(), zero.as_dict()) == pytest.approx(keep.truncated_mass)
    # the density agrees with the enumeration, and a truncated sequence has none under 'zero'
    t_zero = pp.Target(lm, pp.Power(alpha), truncation="zero")
    fin = [list(s) + [lm.eos_token_id] for s in zero.sequences[:5]]
    assert torch.allclose(t_zero.log_density(prompt, fin, T), zero.log_gamma[:5], atol=1e-4)
    cut = [s for s in keep.sequences if len(s) == T][0]
    assert float(t_zero.log_density(prompt, [list(cut)], T)[0]) == -math.inf
    assert math.isfinite(float(pp.Target(lm, pp.Power(alpha)).log_density(prompt, [list(cut)], T)[0]))


def test_truncation_zero_with_nothing_finishing_says_so():
    lm = NGramLM(vocab_size=3, seed=0, eos_boost=0.0)          # never ends
    assert enumerate_target(pp.Target(lm), [0], 3).truncated_mass == pytest.approx(1.0)
    with pytest.raises(ValueError, match="truncation='zero'.*raise max_new_tokens"):
        enumerate_target(pp.Target(lm, truncation="zero"), [0], 3)
    with pytest.raises(ValueError, match="truncation must be one of"):
        pp.Target(lm, truncation="drop")
