"""Look-ahead proposal (Scalable Power Sampling) alone and inside SMC."""

import pytest
import torch

import llmppl as pp
from llmppl.exact import enumerate_target, tv_distance
from llmppl.inference.proposals import ProposalContext
from llmppl.models import NGramLM, pivotal_lm
from llmppl.models.toy import EXACTNESS, ZeroForkingLM

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
    n = {2.0: 1500, 4.0: 1000}[alpha]         # p^2 is the broader target (and costs twice as much)
    smc = pp.SMC(n, proposal=pp.proposals.Lookahead(top_k=3, rollouts=4, horizon=3))
    s, w = pooled(lambda seed: smc.run(target, PROMPT, T, seed=seed), range(6))
    check(enumerate_target(target, PROMPT, T), s, w, 0.04, impostors(FORK, PROMPT, T, alpha),
          f"SMC with Lookahead, p^{alpha:g}")


class CountingLM(ZeroForkingLM):
    """The zero-probability toy, counting its own work: calls and rows of ``next_logprobs``
    and the longest completion it was ever asked to continue."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls = self.rows = self.longest = 0

    def next_logprobs(self, sequences):
        self.calls += 1
        self.rows += len(sequences)
        self.longest = max([self.longest] + [self.completion_length(s) for s in sequences])
        return super().next_logprobs(sequences)


ZEROS = EXACTNESS["zeros"]
BATCH = EXACTNESS["prompts"]
BATCH_PROMPTS = [list(p) for p in BATCH.prompts[:3]]


@pytest.mark.parametrize("proposal", ["base", "lookahead", "fromlm"])
def test_stats_count_all_lm_work(proposal):
    """``Result.stats`` against the LM's own counters: every row the LM evaluated is a prompt
    row's prefill or a token in ``tokens_decoded`` (rollouts and the proposal LM included), and
    ``forward_passes`` is the number of LM calls; rollouts never look past max_new_tokens."""
    lm, other = CountingLM(seed=9), CountingLM(seed=9)
    prop = {"base": None,
            "lookahead": pp.proposals.Lookahead(top_k=3, rollouts=2, horizon=8),   # horizon > T
            "fromlm": pp.proposals.FromLM(other, tau=1.5)}[proposal]
    N, T = 40, ZEROS.max_new_tokens
    out = pp.SMC(N, proposal=prop).run_batch(pp.Target(lm, pp.Power(2.0)), BATCH_PROMPTS, T, seed=0)
    rows = len(BATCH_PROMPTS) * N                      # the first call evaluates every row's prompt
    decoded = sum(r.stats["tokens_decoded"] for r in out)
    assert lm.rows + other.rows == 2 * rows * (proposal == "fromlm") + rows * (proposal != "fromlm") + decoded
    assert lm.calls + other.calls == out[0].stats["forward_passes"]
    assert lm.longest <= T - 1            # a completion has at most T tokens, EOS included
    if proposal == "lookahead":
        la = [r.stats["lookahead_tokens_decoded"] for r in out]
        assert lm.rows == rows + decoded and min(la) > 0
        # the hidden cost: rollouts (shared by the particles of one prefix, so fewer than K·M per token)
        assert all(r.stats["tokens_decoded"] > r.stats["tokens_sampled"] for r in out)
        assert out[0].stats["lookahead_forward_passes"] == lm.calls - 4   # 4 engine steps
    if proposal == "fromlm":
        assert other.rows == rows + sum(r.stats["proposal_tokens_decoded"] for r in out)
        assert other.calls == out[0].stats["proposal_forward_passes"]


def test_scalable_power_counts_its_rollouts():
    lm = CountingLM(seed=9)
    res = pp.samplers.ScalablePower(top_k=3, rollouts=2, horizon=8, n=30).run(
        pp.Target(lm, pp.Power(4.0)), ZEROS.prompt, ZEROS.max_new_tokens, seed=0)
    assert lm.rows == 30 + res.stats["tokens_decoded"] and lm.calls == res.stats["forward_passes"]
    assert res.stats["rollout_tokens"] == res.stats["lookahead_tokens_decoded"] > 0
    assert lm.longest <= ZEROS.max_new_tokens - 1


def test_lookahead_in_smc_on_exact_zeros():
    lm, prompt, T = ZEROS.lm(), ZEROS.prompt, ZEROS.max_new_tokens
    target = pp.Target(lm, pp.Power(4.0))
    smc = pp.SMC(800, proposal=pp.proposals.Lookahead(top_k=3, rollouts=2, horizon=2))
    s, w = pooled(lambda seed: smc.run(target, prompt, T, seed=seed), range(6))
    check(enumerate_target(target, prompt, T), s, w, 0.04, impostors(lm, prompt, T, 4.0),
          "SMC with Lookahead on zeros, p^4")


def test_lookahead_run_batch_with_per_prompt_exponents():
    """run_batch with AdaptiveESS gives each prompt its own exponent a_t (a (B, 1) tensor), which
    look-ahead used to refuse (float() of a tensor); each prompt matches its own exact p^2."""
    lm, T = BATCH.lm(), BATCH.max_new_tokens
    target = pp.Target(lm, pp.Power(2.0))
    smc = pp.SMC(500, proposal=pp.proposals.Lookahead(top_k=3, rollouts=2, horizon=2),
                 schedule=pp.schedules.AdaptiveESS(0.5), ess_threshold=1.0)
    exact = [enumerate_target(target, p, T) for p in BATCH_PROMPTS]
    per = [([], []) for _ in BATCH_PROMPTS]
    seeds = range(10)
    first = None
    for seed in seeds:
        out = smc.run_batch(target, BATCH_PROMPTS, T, seed=seed)
        first = first or [r.steps["exponent"][0] for r in out]
        for k, r in enumerate(out):
            assert r.error is None
            per[k][0].extend(r.samples)
            per[k][1].extend(r.weights / len(seeds))
    assert len({round(a, 9) for a in first}) > 1          # the prompts' exponents differ
    for k, (s, w) in enumerate(per):
        others = impostors(lm, BATCH_PROMPTS[k], T, 2.0)
        others.update({f"prompt {j}'s target": exact[j].as_dict() for j in range(len(exact))
                       if j != k and tv_distance(exact[j].as_dict(), exact[k].as_dict()) > 0.1})
        check(exact[k], s, w, 0.04, others, f"batched Lookahead + AdaptiveESS, prompt {k}")


@pytest.mark.parametrize("horizon, budget", [(3, None), (2, None), (8, 4)])
def test_rollouts_stay_within_horizon_and_budget_and_count_what_they_feed(horizon, budget):
    """The rollouts (one ``sample_block`` of the fork) against the LM's own counters: every row the
    LM evaluates during ``log_probs`` is a token the rollouts fed (the candidate, then every drawn
    token but the last), one call per forward pass; a future has at most ``horizon`` tokens (its
    last never fed) and the completion at most ``max_new_tokens`` (EOS included)."""
    lm = CountingLM(seed=9)
    prompt = ZEROS.prompt
    mode = int(lm.next_logprobs([list(prompt)])[0].argmax())
    prefixes = [[], [mode], [mode]]
    target = pp.Target(lm, pp.Power(4.0))
    ctx = _context(lm, target, prompt, prefixes, exponent=4.0, seed=1)
    ctx.max_new_tokens = budget
    la = pp.proposals.Lookahead(top_k=3, rollouts=5, horizon=horizon)
    ctx.run = run = la.start(target, [list(prompt)], len(prefixes), budget)
    rows, calls = lm.rows, lm.calls
    lm.longest = 0
    lq = la.log_probs(ctx)
    assert torch.isfinite(lq.logsumexp(-1)).all()
    assert run.tokens_decoded > 0 and lm.rows - rows == run.tokens_decoded
    assert lm.calls - calls == run.forward_passes <= horizon
    assert la.work(run) == (run.forward_passes, {0: run.tokens_decoded})
    # a prefix of t tokens continues to at most t + 1 + (horizon − 1) tokens when queried
    assert lm.longest <= 1 + horizon if budget is None else lm.longest <= budget - 1
    assert ctx.state.tokens == prefixes          # the engine's state is left alone
