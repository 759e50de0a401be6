"""``MH.move``: the resample-move kernel (fixed length, no EOS) leaves γ_t invariant."""

import math

import pytest
import torch

import llmppl as pp
from llmppl.exact import enumerate_target
from llmppl.inference.moves import MoveContext
from llmppl.inference.proposals import Proposal
from llmppl.models import NGramLM
from llmppl.models.toy import EXACTNESS

from _exactness import check, impostors, pooled

SETUP = EXACTNESS["fork"]
LM = SETUP.lm()
PROMPT = SETUP.prompt
T = 3          # the moves act on unfinished prefixes of this length


pytestmark = pytest.mark.usefixtures("one_thread")


def no_two_after_zero(batch):
    """A token mask (a factorising potential that is not Power): never ``0 2``."""
    m = torch.ones(len(batch), LM.vocab_size, dtype=torch.bool)
    for i, toks in enumerate(batch.tokens):
        if toks and toks[-1] == 0:
            m[i, 2] = False
    return m


def prm(completions):
    return [0.1 * c.token_ids.count(1) for c in completions]


TARGET = pp.Target(LM, pp.Power(3.0) * pp.Constraint(mask=no_two_after_zero)
                   * pp.RewardTilt(lambda cs: [0.0] * len(cs), 0.5, process_reward=prm))


def gamma_t(a):
    """Exact γ_t ∝ p^a · mask · ψ over unfinished prefixes of length T."""
    d = enumerate_target(pp.Target(LM, pp.Power(a) * pp.Constraint(mask=no_two_after_zero)), PROMPT, T)
    seqs = [s for s in d.sequences if len(s) == T and LM.sep_token_id not in s]
    lg = torch.tensor([float(d.log_gamma[d.sequences.index(s)]) for s in seqs], dtype=torch.float64)
    lg += TARGET.log_twist(TARGET.batch(PROMPT, [list(s) for s in seqs]))
    w = torch.softmax(lg, 0)
    return {s: float(p) for s, p in zip(seqs, w)}


def particles(prefixes, a):
    state = LM.start(PROMPT, len(prefixes))
    lp = state.extend(prefixes).sum(1)
    other = torch.tensor([0.0 if all(not (x == 0 and y == 2) for x, y in zip(s, s[1:])) else -math.inf
                          for s in prefixes], dtype=torch.float64)
    twist = TARGET.log_twist(TARGET.batch(PROMPT, prefixes))
    return state, lp, other, twist


def _tv(exact, tokens):
    emp = {}
    for t in tokens:
        emp[tuple(t)] = emp.get(tuple(t), 0.0) + 1 / len(tokens)
    return 0.5 * sum(abs(exact.get(k, 0.0) - emp.get(k, 0.0)) for k in set(exact) | set(emp)), len(emp)


def test_move_keeps_gamma_t_and_rejuvenates_duplicates():
    """Like after resampling: 80 exact draws from γ_t, each duplicated 60 times.  Moves keep
    γ_t invariant, so the duplicates spread out towards γ_t; the bookkeeping stays exact."""
    a, N, K = 2.0, 4800, 5
    exact = gamma_t(a)
    p = torch.tensor(list(exact.values()))
    assert 1 / float((p**2).sum()) >= 10          # γ_t is spread: duplicates are far from it
    keys = list(exact)
    gen = torch.Generator().manual_seed(0)
    draws = torch.multinomial(torch.tensor([exact[k] for k in keys]), N // 60, True, generator=gen)
    start = [list(keys[i]) for i in draws.tolist() for _ in range(60)]
    tv0, distinct0 = _tv(exact, start)
    state, lp, other, twist = particles(start, a)
    ctx = MoveContext(TARGET, state, torch.arange(N), a, lp, other, twist, gen)
    accepted = pp.MH(block_size=1, n_mcmc=K).move(ctx)
    assert 0 < accepted <= K * N and state.n == N
    assert all(len(t) == T for t in state.tokens)
    tv, distinct = _tv(exact, state.tokens)
    print(f"TV to γ_t before {tv0:.3f} after {tv:.3f}; acceptance {accepted / (K * N):.2f}; "
          f"distinct {distinct0} -> {distinct} of {len(exact)}")
    assert tv < 0.05 and tv0 > 0.1
    # the per-particle arrays were updated in place and match the new tokens
    _, ref_lp, ref_other, ref_twist = particles([list(t) for t in state.tokens], a)
    assert torch.allclose(ctx.log_p, ref_lp, atol=1e-4)
    assert torch.equal(ctx.log_other, ref_other)
    assert torch.allclose(ctx.log_twist, ref_twist)


def test_move_only_touches_the_given_rows():
    N = 6
    state, lp, other, twist = particles([[1, 1, 0]] * N, 2.0)
    rows = torch.tensor([1, 4])
    ctx = MoveContext(TARGET, state, rows, 2.0, lp, other, twist, torch.Generator().manual_seed(1))
    pp.MH(block_size=1, n_mcmc=5).move(ctx)
    assert all(state.tokens[i] == [1, 1, 0] for i in (0, 2, 3, 5))
    assert state.n == N


class NoZero(Proposal):
    """A proposal that never draws token 0."""

    def log_probs(self, ctx):
        lp = ctx.batch.base_logprobs.double().clone()
        lp[:, 0] = -math.inf
        return torch.log_softmax(lp, -1)


def test_zero_reverse_probability_is_an_error():
    state, lp, other, twist = particles([[0, 0, 0]] * 3, 2.0)
    ctx = MoveContext(pp.Target(LM, pp.Power(2.0)), state, torch.arange(3), 2.0, lp, other,
                      twist, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="zero probability"):
        pp.MH(block_size=1, n_mcmc=1, proposal=NoZero()).move(ctx)


# ----------------------------------------------------------------- inside SMC
class Counting:
    """Wraps a kernel; records the number of distinct particles before and after each move."""

    def __init__(self, inner):
        self.inner, self.before, self.after = inner, [], []

    def move(self, ctx):
        distinct = lambda: len({tuple(ctx.state.tokens[r]) for r in ctx.rows.tolist()})  # noqa: E731
        self.before.append(distinct())
        accepted = self.inner.move(ctx)
        self.after.append(distinct())
        return accepted


def test_resample_move_keeps_smc_exact():
    target = pp.Target(LM, pp.Power(4.0))
    exact = enumerate_target(target, PROMPT, SETUP.max_new_tokens)
    runs = []
    smc = pp.SMC(1000, ess_threshold=1.0, rejuvenate=pp.MH(block_size=1, n_mcmc=2))
    s, w = pooled(lambda seed: runs.append(smc.run(target, PROMPT, SETUP.max_new_tokens, seed=seed)) or runs[-1],
                  range(6))
    check(exact, s, w, 0.04, impostors(LM, PROMPT, SETUP.max_new_tokens, 4.0), "SMC + MH moves")
    res = runs[-1]
    assert res.stats["moves_accepted"] > 0 and sum(res.steps["moves_accepted"]) == res.stats["moves_accepted"]


def test_resample_move_raises_the_number_of_distinct_particles():
    """Base proposal for p^4 on a 32-token vocabulary: weights degenerate, resampling duplicates;
    the moves spread the copies out (distinct prefixes counted right before and after each move)."""
    target = pp.Target(NGramLM(vocab_size=32, order=2, seed=1, concentration=3.0, eos_boost=0.0), pp.Power(4.0))
    kernel = Counting(pp.MH(block_size=1, n_mcmc=2))
    smc = pp.SMC(32, proposal=pp.proposals.Base(), rejuvenate=kernel)
    for r in range(3):
        smc.run(target, [0], 8, seed=r)
    before, after = sum(kernel.before), sum(kernel.after)
    print(f"{len(kernel.before)} resampling steps: distinct particles {before} after resampling, "
          f"{after} after the moves")
    assert after > 1.3 * before


def test_result_records_distinct_particles_after_moves():
    target = pp.Target(NGramLM(vocab_size=32, order=2, seed=1, concentration=3.0, eos_boost=0.0), pp.Power(4.0))
    res = pp.SMC(32, proposal=pp.proposals.Base(), ess_threshold=1.0,
                 rejuvenate=pp.MH(block_size=1, n_mcmc=2)).run(target, [0], 8, seed=0)
    ancestors = sum(res.steps["unique"][:-1])
    moved = sum(res.steps["unique_after_move"][:-1])
    assert moved > ancestors


def test_rejuvenate_refuses_a_stateful_proposal():
    lm = NGramLM(vocab_size=4, seed=0)
    smc = pp.SMC(4, proposal=pp.proposals.FromLM(NGramLM(vocab_size=4, seed=1)), rejuvenate=pp.MH(1, 1))
    with pytest.raises(ValueError, match="own decoding state"):
        smc.run(pp.Target(lm, pp.Power(2.0)), [0], 3, seed=0)
