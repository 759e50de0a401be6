"""``MH.move``: the resample-move kernel (fixed length, no EOS) leaves γ_t invariant."""

import math

import pytest
import torch

import llmppl as pp
from llmppl.exact import enumerate_target
from llmppl.inference.moves import MoveContext
from llmppl.inference.proposals import Proposal
from llmppl.models import NGramLM

LM = NGramLM(vocab_size=4, order=2, seed=4)
T = 4


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
    d = enumerate_target(pp.Target(LM, pp.Power(a) * pp.Constraint(mask=no_two_after_zero)), [0], T)
    seqs = [s for s in d.sequences if len(s) == T]
    lg = torch.tensor([float(d.log_gamma[d.sequences.index(s)]) for s in seqs], dtype=torch.float64)
    lg += TARGET.log_twist(TARGET.batch([0], [list(s) for s in seqs]))
    w = torch.softmax(lg, 0)
    return {s: float(p) for s, p in zip(seqs, w)}


def particles(prefixes, a):
    state = LM.start([0], len(prefixes))
    lp = state.extend(prefixes).sum(1)
    other = torch.tensor([0.0 if all(not (x == 0 and y == 2) for x, y in zip(s, s[1:])) else -math.inf
                          for s in prefixes], dtype=torch.float64)
    twist = TARGET.log_twist(TARGET.batch([0], prefixes))
    return state, lp, other, twist


def _tv(exact, tokens):
    emp = {}
    for t in tokens:
        emp[tuple(t)] = emp.get(tuple(t), 0.0) + 1 / len(tokens)
    return 0.5 * sum(abs(exact.get(k, 0.0) - emp.get(k, 0.0)) for k in set(exact) | set(emp)), len(emp)


def test_move_keeps_gamma_t_and_rejuvenates_duplicates():
    """Like after resampling: 50 exact draws from γ_t, each duplicated 30 times.  Moves keep
    γ_t invariant, so the duplicates spread out towards γ_t; the bookkeeping stays exact."""
    a, N = 2.0, 1500
    exact = gamma_t(a)
    keys = list(exact)
    gen = torch.Generator().manual_seed(0)
    draws = torch.multinomial(torch.tensor([exact[k] for k in keys]), N // 30, True, generator=gen)
    start = [list(keys[i]) for i in draws.tolist() for _ in range(30)]
    tv0, distinct0 = _tv(exact, start)
    state, lp, other, twist = particles(start, a)
    ctx = MoveContext(TARGET, state, torch.arange(N), a, lp, other, twist, gen)
    accepted = pp.MH(block_size=1, n_mcmc=8).move(ctx)
    assert 0 < accepted <= 8 * N and state.n == N
    assert all(len(t) == T for t in state.tokens)
    tv, distinct = _tv(exact, state.tokens)
    print(f"TV to γ_t before {tv0:.3f} after {tv:.3f}; acceptance {accepted / (8 * N):.2f}; "
          f"distinct {distinct0} -> {distinct} of {len(exact)}")
    assert tv < 0.05 and tv < tv0
    # the per-particle arrays were updated in place and match the new tokens
    _, ref_lp, ref_other, ref_twist = particles([list(t) for t in state.tokens], a)
    assert torch.allclose(ctx.log_p, ref_lp, atol=1e-4)
    assert torch.equal(ctx.log_other, ref_other)
    assert torch.allclose(ctx.log_twist, ref_twist)


def test_move_only_touches_the_given_rows():
    N = 6
    state, lp, other, twist = particles([[1, 1, 0, 0]] * N, 2.0)
    rows = torch.tensor([1, 4])
    ctx = MoveContext(TARGET, state, rows, 2.0, lp, other, twist, torch.Generator().manual_seed(1))
    pp.MH(block_size=1, n_mcmc=5).move(ctx)
    assert all(state.tokens[i] == [1, 1, 0, 0] for i in (0, 2, 3, 5))
    assert state.n == N


class NoZero(Proposal):
    """A proposal that never draws token 0."""

    def log_probs(self, ctx):
        lp = ctx.batch.base_logprobs.double().clone()
        lp[:, 0] = -math.inf
        return torch.log_softmax(lp, -1)


def test_zero_reverse_probability_is_an_error():
    state, lp, other, twist = particles([[0, 0, 0, 0]] * 3, 2.0)
    ctx = MoveContext(pp.Target(LM, pp.Power(2.0)), state, torch.arange(3), 2.0, lp, other,
                      twist, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="zero probability"):
        pp.MH(block_size=1, n_mcmc=1, proposal=NoZero()).move(ctx)
