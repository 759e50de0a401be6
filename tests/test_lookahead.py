"""Look-ahead proposal (Scalable Power Sampling) alone and inside SMC."""

import pytest
import torch

import llmppl as pp
from llmppl.exact import enumerate_target, tv_distance
from llmppl.inference.proposals import ProposalContext
from llmppl.models import NGramLM, pivotal_lm


pytestmark = pytest.mark.usefixtures("one_thread")


def _context(lm, target, prompt, prefixes, exponent, seed=0):
    state = lm.start(prompt, len(prefixes))
    if any(prefixes):
        state.extend(prefixes)
    lp = state.logprobs()
    batch = target.batch(prompt, [list(p) for p in prefixes], lp)
    gen = torch.Generator().manual_seed(seed)
    return ProposalContext(target, batch, state, torch.arange(len(prefixes)), exponent, gen)


@pytest.mark.parametrize("name,lm,T", [("pivotal", pivotal_lm(), 3),
                                       ("ngram", NGramLM(vocab_size=3, order=2, seed=3), 4)])
def test_scalable_power_is_closer_to_power_than_low_temperature(name, lm, T):
    alpha = 4.0
    target = pp.Target(lm, pp.Power(alpha))
    exact = enumerate_target(target, [0], T)
    low = enumerate_target(pp.Target(lm, pp.Tempered(1 / alpha)), [0], T)   # exact low-temp law
    tv_low = tv_distance(exact.as_dict(), low.as_dict())
    res = pp.samplers.ScalablePower(top_k=3, rollouts=4, horizon=T, n=1000).run(target, [0], T, seed=0)
    tv_sp = exact.tv(res.samples)
    print(f"{name}: TV(ScalablePower, p^4) = {tv_sp:.3f}   TV(low temperature 1/4, p^4) = {tv_low:.3f}")
    assert tv_sp < tv_low / 4
    assert res.stats["rollout_tokens"] > 0 and res.stats["tokens_decoded"] > res.stats["rollout_tokens"]


def test_jackknife_runs_and_stays_close():
    lm = NGramLM(vocab_size=3, order=2, seed=3)
    target = pp.Target(lm, pp.Power(4.0))
    exact = enumerate_target(target, [0], 4)
    res = pp.samplers.ScalablePower(top_k=3, rollouts=4, horizon=4, n=1000, jackknife=True).run(
        target, [0], 4, seed=0)
    print(f"jackknife: TV = {exact.tv(res.samples):.3f}")
    assert exact.tv(res.samples) < 0.1


def test_alpha_one_gives_the_base_lm_and_support_is_full():
    lm = NGramLM(vocab_size=5, order=2, seed=1)
    la = pp.proposals.Lookahead(top_k=2, rollouts=3, horizon=3)
    ctx = _context(lm, pp.Target(lm), [0], [[1], [2, 3]], exponent=1.0)
    assert torch.allclose(la.log_probs(ctx), ctx.batch.base_logprobs.double(), atol=1e-5)
    ctx = _context(lm, pp.Target(lm, pp.Power(4.0)), [0], [[1], [2, 3]], exponent=4.0)
    lq = la.log_probs(ctx)
    assert torch.isfinite(lq).all() and torch.allclose(lq.exp().sum(-1), torch.ones(2, dtype=torch.float64))
    assert ctx.state.tokens == [[1], [2, 3]]     # the engine's state is left alone


def test_deterministic_future_gives_exact_conditional():
    """On the pivotal LM every future after the first token is short: with horizon 2 and
    enough rollouts, q(first token) approaches π_4(first token) = Σ_f p(v f)^4 / Z."""
    lm = pivotal_lm()
    target = pp.Target(lm, pp.Power(4.0))
    exact = enumerate_target(target, [0], 3)
    first0 = sum(p for s, p in exact.as_dict().items() if s[:1] == (0,))
    la = pp.proposals.Lookahead(top_k=2, rollouts=400, horizon=2, floor=0.0)
    q = la.log_probs(_context(lm, target, [0], [[]], exponent=4.0)).exp()[0]
    assert float(q[0]) == pytest.approx(first0, abs=0.03)


def test_bad_input():
    for kw in ({"top_k": 0}, {"rollouts": 0}, {"horizon": 0}):
        with pytest.raises(ValueError):
            pp.proposals.Lookahead(**{"top_k": 2, "rollouts": 2, "horizon": 2, **kw})
    with pytest.raises(ValueError, match="floor"):
        pp.proposals.Lookahead(2, 2, 2, floor=1.5)
    with pytest.raises(ValueError, match="jackknife"):
        pp.proposals.Lookahead(2, 1, 2, jackknife=True)
    with pytest.raises(ValueError):
        pp.samplers.ScalablePower(top_k=2, rollouts=2, horizon=2, n=0)


@pytest.mark.parametrize("alpha", [2.0, 4.0])
def test_lookahead_inside_smc_is_exact(alpha):
    """SMC weights correct ζ̂'s bias (and the horizon's): TV to p^α ≤ 0.04, pooled over runs."""
    lm = NGramLM(vocab_size=4, order=2, seed=5, concentration=2.0, eos_boost=2.0)
    target = pp.Target(lm, pp.Power(alpha))
    exact = enumerate_target(target, [0], 5)
    smc = pp.SMC(300, proposal=pp.proposals.Lookahead(top_k=3, rollouts=4, horizon=3))
    samples, weights, runs = [], [], 12
    for r in range(runs):
        res = smc.run(target, [0], 5, seed=r)
        samples += res.samples
        weights += list(res.weights / runs)
    tv = exact.tv(samples, weights)
    print(f"TV(SMC with Lookahead, p^{alpha:g}) = {tv:.4f}")
    assert tv < 0.04
