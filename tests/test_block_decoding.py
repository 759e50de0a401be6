"""Block decoding (``state.sample_block``) and the engines on it, against exact answers.

``NativeOnlyLM`` is a toy backend like vLLM: its decoding state only draws blocks and never
hands out ``(rows, V)`` log-probabilities, so every engine that runs on it decodes through
``sample_block`` alone — and what needs the full vocabulary must say so.
"""

import itertools
import math

import numpy as np
import pytest
import torch

import llmppl as pp
from llmppl.exact import enumerate_target, tv_distance
from llmppl.models.base import UncachedState
from llmppl.models.block import BlockSpec, NotNative, sample_tokenwise
from llmppl.models.toy import EXACTNESS, ForkingLM

from _exactness import check, impostors, pooled

pytestmark = pytest.mark.usefixtures("one_thread")

SETUP = EXACTNESS["fork"]
PROMPT, T = SETUP.prompt, SETUP.max_new_tokens
THRESHOLD = 0.04


class NativeOnlyState(UncachedState):
    """An uncached state that decodes in blocks only (``full_vocabulary = False``)."""

    full_vocabulary = False
    _inside = False

    def sample_block(self, rows, spec, generator):
        self._inside = True
        try:
            return sample_tokenwise(self, rows, spec, generator)
        finally:
            self._inside = False

    def logprobs(self, rows=None):
        if not self._inside:
            raise NotNative("NativeOnlyState gives no full-vocabulary log-probabilities")
        return super().logprobs(rows)


class NativeOnlyLM(ForkingLM):
    def start(self, prompts, n=1, max_new_tokens=None):
        return NativeOnlyState(self, self.check_prompts(prompts, max_new_tokens), n)


LM = SETUP.lm()
NATIVE = NativeOnlyLM(seed=SETUP.seed, eos_profile=SETUP.eos_profile)


def block_law(lm, prompt, width, tau):
    """Exact law of one block of ``width`` tokens (stopping at EOS) under ``q ∝ p^{1/τ}``,
    by enumeration over ``lm.next_logprobs`` (independent of any decoding state)."""
    law = {}
    eos = lm.eos_token_id

    def walk(prefix, logq):
        if len(prefix) == width or (prefix and prefix[-1] == eos):
            law[tuple(prefix)] = law.get(tuple(prefix), 0.0) + math.exp(logq)
            return
        lq = torch.log_softmax(lm.next_logprobs([prompt + prefix])[0].double() / tau, -1)
        for v in range(lm.vocab_size):
            if lq[v] > -math.inf:
                walk(prefix + [v], logq + float(lq[v]))

    walk([], 0.0)
    return law


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_sample_block_has_the_law_of_q_and_records_exact_log_p_and_log_q(tau):
    n, width = 6000, 3
    state = LM.start(PROMPT, n, max_new_tokens=T)
    spec = BlockSpec.make(n, width, tau, LM.eos_token_ids)
    blk = state.sample_block(torch.arange(n), spec, torch.Generator().manual_seed(0))
    rows = [tuple(t for t in r if t >= 0) for r in blk.tokens.tolist()]
    law = block_law(LM, PROMPT, width, tau)
    emp = {}
    for r in rows:
        emp[r] = emp.get(r, 0.0) + 1.0 / n
    other = block_law(LM, PROMPT, width, tau / 4)
    assert tv_distance(law, emp) < 0.03
    assert tv_distance(law, other) > 0.1          # the impostor (another temperature) is far
    # log p / log q of each drawn token: the LM's own next_logprobs, position by position
    for k in range(0, n, 997):
        for j, tok in enumerate(rows[k]):
            lp = LM.next_logprobs([PROMPT + list(rows[k][:j])])[0].double()
            assert blk.log_p[k, j].item() == pytest.approx(float(lp[tok]), abs=1e-6)
            assert blk.log_q[k, j].item() == pytest.approx(float(torch.log_softmax(lp / tau, -1)[tok]), abs=1e-6)
    # the state holds the drawn tokens, EOS excluded; ended rows drew EOS
    for k in range(0, n, 511):
        assert state.tokens[k] == [t for t in rows[k] if t != LM.eos_token_id]
        assert bool(blk.ended[k]) == (LM.eos_token_id in rows[k])


def test_sample_block_budget_feed_last_allow_stop_and_greedy():
    n = 400
    state = LM.start(PROMPT, n, max_new_tokens=T)
    budget = torch.tensor([1, 2] * (n // 2))
    spec = BlockSpec(budget=budget, width=2, temperature=torch.ones(n, dtype=torch.float64),
                     stop_ids=LM.eos_token_ids, allow_stop=False, feed_last=budget < 2)
    blk = state.sample_block(torch.arange(n), spec, torch.Generator().manual_seed(1))
    assert blk.length.tolist() == budget.tolist()                 # no stop allowed: every row uses its budget
    assert not bool(blk.ended.any()) and not bool((blk.tokens == LM.eos_token_id).any())
    # q renormalised without EOS: log q of the first token
    lp = LM.next_logprobs([PROMPT])[0].double()
    no_eos = lp.clone()
    no_eos[LM.eos_token_id] = -math.inf
    lq = torch.log_softmax(no_eos, -1)
    assert torch.allclose(blk.log_q[:, 0], lq[blk.tokens[:, 0]], atol=1e-6)
    # feed_last false on the rows with budget 2: their second token is drawn but not fed
    lens = [len(state.tokens[k]) for k in range(n)]
    assert lens == [1] * n
    g = LM.start(PROMPT, 1, max_new_tokens=T)
    out = g.sample_block(torch.arange(1), BlockSpec.make(1, T, 0.0, LM.eos_token_ids, greedy=True), None)
    mode = []
    for _ in range(T):
        v = int(LM.next_logprobs([PROMPT + mode])[0].argmax())
        mode.append(v)
        if v == LM.eos_token_id:
            break
    assert [t for t in out.tokens[0].tolist() if t >= 0] == mode
    assert float(out.log_q[0, 0]) == 0.0


@pytest.mark.parametrize("k, schedule", [(1, None), (2, None), (1, pp.schedules.Linear(1.0, 3))])
def test_smc_on_a_block_only_backend_matches_exact(k, schedule):
    """Power-SMC with native blocks of k tokens (weighed at block boundaries) on a backend that has
    only ``sample_block``, with and without an exponent bridge; impostors (mode, low temperature,
    base LM) fail the same check."""
    alpha = 4.0
    target = pp.Target(NATIVE, pp.Power(alpha))
    exact = enumerate_target(pp.Target(LM, pp.Power(alpha)), PROMPT, T)
    smc = pp.SMC(1000, step=pp.steps.Tokens(k), ess_threshold=0.5, schedule=schedule)
    s, w = pooled(lambda seed: smc.run(target, PROMPT, T, seed=seed), range(6))
    check(exact, s, w, THRESHOLD, impostors(LM, PROMPT, T, alpha), f"native SMC k={k}")


def test_smc_blocks_evidence_is_unbiased():
    target = pp.Target(NATIVE, pp.Power(2.0))
    Z = enumerate_target(pp.Target(LM, pp.Power(2.0)), PROMPT, T).Z
    smc = pp.SMC(4, step=pp.steps.Tokens(2), ess_threshold=1.0)
    est = np.array([math.exp(smc.run_batch(target, [PROMPT], T, seed=s)[0].log_evidence) for s in range(300)])
    se = est.std(ddof=1) / math.sqrt(len(est))
    assert 4 * se < 0.1 * Z
    assert abs(est.mean() - Z) < 4 * se


def test_mh_and_baselines_on_a_block_only_backend_match_exact():
    alpha = 4.0
    exact = enumerate_target(pp.Target(LM, pp.Power(alpha)), PROMPT, T)
    res = pp.MH(block_size=2, n_mcmc=6).run(pp.Target(NATIVE, pp.Power(alpha)), PROMPT, T, chains=3000, seed=0)
    check(exact, res.samples, None, 0.05, impostors(LM, PROMPT, T, alpha), "native MH")
    plain = pp.baselines.Plain(16000).run(pp.Target(NATIVE), PROMPT, T, seed=0)
    assert enumerate_target(pp.Target(LM), PROMPT, T).tv(plain.samples) < 0.04
    low = pp.baselines.LowTemperature(0.25, 16000).run(pp.Target(NATIVE), PROMPT, T, seed=0)
    assert enumerate_target(pp.Target(LM, pp.Tempered(0.25)), PROMPT, T).tv(low.samples) < 0.04
    assert exact.tv(low.samples) > 0.06                                  # low temperature is not p^4
    greedy = pp.baselines.Greedy().run(pp.Target(NATIVE), PROMPT, T)
    assert greedy.samples == pp.baselines.Greedy().run(pp.Target(LM), PROMPT, T).samples


def _mask(batch):
    out = torch.zeros(len(batch), NATIVE.vocab_size, dtype=torch.bool)
    out[:, :3] = True
    out[:, NATIVE.eos_token_id] = True
    return out


@pytest.mark.parametrize("engine, target, needle", [
    (pp.SMC(4, proposal=pp.proposals.TopK(2)), pp.Target(NATIVE, pp.Power(2.0)), "TopK"),
    (pp.SMC(4), pp.Target(NATIVE, pp.Power(2.0) * pp.Constraint(mask=_mask)), "Constraint"),
    (pp.SMC(4, schedule=pp.schedules.AdaptiveESS()), pp.Target(NATIVE, pp.Power(2.0)), "AdaptiveESS"),
    (pp.SMC(4, step=pp.steps.Until(1)), pp.Target(NATIVE, pp.Power(2.0)), "Until"),
    (pp.SMC(4, rejuvenate=pp.MH(1, 1)), pp.Target(NATIVE, pp.Power(2.0)), "rejuvenate"),
])
def test_what_needs_the_full_vocabulary_is_refused_by_name(engine, target, needle):
    with pytest.raises(NotNative, match=needle) as err:
        engine.run(target, PROMPT, T, seed=0)
    assert "HFLM" in str(err.value) or "Constant" in str(err.value) or "without moves" in str(err.value)


def test_block_steps_count_tokens_and_one_sync_per_token_step():
    res = pp.SMC(8).run(pp.Target(LM, pp.Power(2.0)), PROMPT, T, seed=0)
    assert res.stats["tokens_sampled"] == sum(len(s) + int(f) for s, f in zip(res.samples, res.finished))
    assert res.stats["host_syncs"] == res.stats["n_steps"]
    blocks = pp.SMC(8, step=pp.steps.Tokens(2)).run(pp.Target(LM, pp.Power(2.0)), PROMPT, T, seed=0)
    assert blocks.stats["n_steps"] <= math.ceil(T / 2)
    assert all(len(s) <= T for s in blocks.samples)
    assert list(itertools.chain(*blocks.samples))     # something was drawn
