"""Look-ahead proposal (Scalable Power Sampling) alone and inside SMC."""

import pytest
import torch

import llmppl as pp
from llmppl.exact import enumerate_target, tv_distance
from llmppl.inference.proposals import ProposalContext
from llmppl.models import NGramLM, pivotal_lm
from llmppl.models.toy import EXACTNESS

from _exactness import check, impostors, pooled

SETUP = EXACTNESS["fork"]
FORK, PROMPT, T = SETUP.lm(), SETUP.prompt, SETUP.max_new_tokens


pytestmark = pytest.mark.usefixtures("one_thread")


def _context(lm, target, prompt, prefixes, exponent, seed=0):
    state = lm.start(prompt, len(prefixes))
    if any(prefixes):
        state.extend(prefixes)
    lp = state.logprobs()
    batch = target.batch(prompt, [list(p) for p in prefixes], lp)
    gen = torch.Generator().manual_seed(seed)
    return ProposalContext(target, batch, state, torch.arange(len(prefixes)), exponent, gen)


@pytest.mark.parametrize("name,lm,prompt,T", [("pivotal", pivotal_lm(), [0], 3),
                                              ("fork", FORK, PROMPT, T)])
def test_scalable_power_is_closer_to_power_than_low_temperature(name, lm, prompt, T):
    alpha = 4.0
    target = pp.Target(lm, pp.Power(alpha))
    exact = enumerate_target(target, prompt, T)
    low = enumerate_target(pp.Target(lm, pp.Tempered(1 / alpha)), prompt, T)   # exact low-temp law
    tv_low = tv_distance(exact.as_dict(), low.as_dict())
    # top_k = 4 covers the fork LM's generated tokens (with 3, flat contexts lose one: TV 0.29)
    res = pp.samplers.ScalablePower(top_k=4, rollouts=4, horizon=T, n=2000).run(target, prompt, T, seed=0)
    tv_sp = exact.tv(res.samples)
    print(f"{name}: TV(ScalablePower, p^4) = {tv_sp:.3f}   TV(low temperature 1/4, p^4) = {tv_low:.3f}"
          f"   support {exact.effective_support:.1f}")
    assert tv_sp < tv_low / 3
    assert res.stats["rollout_tokens"] > 0 and res.stats["tokens_decoded"] > res.stats["rollout_tokens"]


def test_jackknife_runs_and_stays_close():
    """Stand-alone look-ahead is approximate: within 0.1 of p^4, where the impostors are not."""
    target = pp.Target(FORK, pp.Power(4.0))
    exact = enumerate_target(target, PROMPT, T)
    res = pp.samplers.ScalablePower(top_k=4, rollouts=4, horizon=4, n=2000, jackknife=True).run(
        target, PROMPT, T, seed=0)
    check(exact, res.samples, None, 0.1, impostors(FORK, PROMPT, T, 4.0), "jackknife look-ahead")


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


@pytest.mark.parametrize("alpha", [4.0])
def test_lookahead_inside_smc_is_exact(alpha):
    """SMC weights correct ζ̂'s bias (and the horizon's): TV to p^α < 0.04, pooled over runs."""
    target = pp.Target(FORK, pp.Power(alpha))
    n = {2.0: 1500, 4.0: 800}[alpha]          # p^2 is the broader target (and costs twice as much)
    smc = pp.SMC(n, proposal=pp.proposals.Lookahead(top_k=3, rollouts=4, horizon=3))
    s, w = pooled(lambda seed: smc.run(target, PROMPT, T, seed=seed), range(6))
    check(enumerate_target(target, PROMPT, T), s, w, 0.04, impostors(FORK, PROMPT, T, alpha),
          f"SMC with Lookahead, p^{alpha:g}")
