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

    def extend(self, tokens, rows=None):
        """Scoring given tokens is native too (vLLM forces them through its engine)."""
        inside, self._inside = self._inside, True
        try:
            return super().extend(tokens, rows)
        finally:
            self._inside = inside

    def logprobs(self, rows=None):
        if not self._inside:
            raise NotNative("NativeOnlyState gives no full-vocabulary log-probabilities")
        return super().logprobs(rows)


class NativeOnlyLM(ForkingLM):
    def start(self, prompts, n=1, max_new_tokens=None):
        return NativeOnlyState(self, self.check_prompts(prompts, max_new_tokens), n)


LM = SETUP.lm()
NATIVE = NativeOnlyLM(seed=SETUP.seed, eos_profile=SETUP.eos_profile)


def block_law(lm, prompt, width, tau, log_w=None):
    """Exact law of one block of ``width`` tokens (stopping at EOS) under ``q ∝ p^{1/τ}``
    (times ``exp(log_w)`` when given, a ``(V,)`` tilt), by enumeration over ``lm.next_logprobs``
    (independent of any decoding state)."""
    law = {}
    eos = lm.eos_token_id

    def walk(prefix, logq):
        if len(prefix) == width or (prefix and prefix[-1] == eos):
            law[tuple(prefix)] = law.get(tuple(prefix), 0.0) + math.exp(logq)
            return
        lq = torch.log_softmax(lm.next_logprobs([prompt + prefix])[0].double() / tau
                               + (0.0 if log_w is None else log_w), -1)
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


#: a full-vocabulary proposal that no temperature gives: q(v) ∝ p(v) · (v + 1)
TILT = torch.log(torch.arange(1, LM.vocab_size + 1, dtype=torch.float64))


class TiltHook:
    """``spec.propose`` for the tests: ``log q = log_softmax(log p + TILT)``, ``log_inc = 2 log p``;
    records the block rows it was asked about at each call."""

    def __init__(self):
        self.calls = []

    def __call__(self, k, lp):
        self.calls.append(k.tolist())
        return torch.log_softmax(lp.double() + TILT, -1), 2.0 * lp.double()


def test_a_full_vocabulary_hook_draws_from_its_q_and_records_log_q_and_log_inc():
    """``spec.propose``: the block has the law of the hook's ``q`` (enumerated), its ``log q`` and
    ``log_inc`` are the hook's at the drawn token, ``log p`` the LM's, and the hook sees only the
    rows still drawing."""
    n, width = 40000, 3          # the tilt spreads q over ~100 blocks: TV noise ≈ 0.015
    state = LM.start(PROMPT, n, max_new_tokens=T)
    hook = TiltHook()
    spec = BlockSpec.make(n, width, 1.0, LM.eos_token_ids, propose=hook)
    blk = state.sample_block(torch.arange(n), spec, torch.Generator().manual_seed(0))
    rows = [tuple(t for t in r if t >= 0) for r in blk.tokens.tolist()]
    emp = {}
    for r in rows:
        emp[r] = emp.get(r, 0.0) + 1.0 / n
    assert tv_distance(block_law(LM, PROMPT, width, 1.0, TILT), emp) < 0.03
    assert tv_distance(block_law(LM, PROMPT, width, 1.0), emp) > 0.1       # not the base LM's law
    for k in range(0, n, 3997):
        for j, tok in enumerate(rows[k]):
            lp = LM.next_logprobs([PROMPT + list(rows[k][:j])])[0].double()
            assert blk.log_p[k, j].item() == pytest.approx(float(lp[tok]), abs=1e-6)
            assert blk.log_q[k, j].item() == pytest.approx(float(torch.log_softmax(lp + TILT, -1)[tok]), abs=1e-6)
            assert blk.log_inc[k, j].item() == pytest.approx(2 * float(lp[tok]), abs=1e-6)
    assert torch.allclose(blk.total("log_inc"), 2 * blk.total("log_p"))
    # call j sees exactly the rows that have not drawn EOS in columns < j
    for j, seen in enumerate(hook.calls):
        assert seen == [k for k in range(n) if LM.eos_token_id not in rows[k][:j]]
    for k in range(0, n, 2011):
        assert state.tokens[k] == [t for t in rows[k] if t != LM.eos_token_id]


def test_forced_tokens_are_replayed_with_their_log_q_and_the_rest_is_drawn():
    """``spec.forced``: rows 0-2 replay given suffixes (one ends in EOS), with the hook's ``log q``,
    ``log_inc`` and the LM's ``log p`` of each given token, computed here by hand; row 3 draws;
    ``allow_stop=False`` renormalises the hook's q without EOS; ``feed_last`` false leaves the
    last token of a row at its budget unfed."""
    eos = LM.eos_token_id
    given = [[0, 1, 2], [2, eos], [1], None]
    n, W = len(given), 3
    forced = torch.full((n, W), -1, dtype=torch.long)
    for k, g in enumerate(given):
        if g is not None:
            forced[k, :len(g)] = torch.tensor(g)
    budget = torch.tensor([len(g) if g is not None else W for g in given])
    for allow_stop in (True, False):
        state = LM.start(PROMPT, n, max_new_tokens=T)
        spec = BlockSpec(budget=budget, width=W, temperature=torch.ones(n, dtype=torch.float64),
                         stop_ids=LM.eos_token_ids, allow_stop=allow_stop, propose=TiltHook(), forced=forced,
                         feed_last=torch.tensor([True, True, False, False]))
        blk = state.sample_block(torch.arange(n), spec, torch.Generator().manual_seed(3))
        for k, g in enumerate(given):
            toks = [t for t in blk.tokens[k].tolist() if t >= 0]
            if g is not None:
                assert toks == g
            else:
                assert len(toks) == W or (allow_stop and toks[-1] == eos)
                assert allow_stop or eos not in toks
            for j, tok in enumerate(toks):
                lp = LM.next_logprobs([PROMPT + toks[:j]])[0].double()
                w = lp + TILT
                if not allow_stop:
                    w[eos] = -math.inf
                assert blk.log_p[k, j].item() == pytest.approx(float(lp[tok]), abs=1e-6)
                assert blk.log_q[k, j].item() == pytest.approx(float(torch.log_softmax(w, -1)[tok]), abs=1e-6)
                assert blk.log_inc[k, j].item() == pytest.approx(2 * float(lp[tok]), abs=1e-6)
        drawn = [t for t in blk.tokens[3].tolist() if t >= 0]
        assert blk.ended.tolist() == [False, True, False, eos in drawn]
        assert blk.length.tolist() == [3, 2, 1, len(drawn)]
        # a given EOS has log q = -inf when q has no stop: a reverse move the proposal cannot make
        assert math.isinf(blk.log_q[1, 1].item()) == (not allow_stop)
        # fed: all of row 0 (feed_last), row 1 but its EOS, nothing of row 2 (its last token at
        # its budget), row 3 but its last token (EOS, or the budget's end without feed_last)
        assert state.tokens == [[0, 1, 2], [2], [], drawn[:-1]]


def test_forced_tokens_without_a_hook_use_the_temperature_q():
    """Forced tokens under the native ``q ∝ p^{1/τ}``: their ``log q`` is that q's, by hand."""
    state = LM.start(PROMPT, 2, max_new_tokens=T)
    spec = BlockSpec.make(2, 2, 0.5, LM.eos_token_ids, forced=torch.tensor([[1, 0], [-1, -1]]))
    blk = state.sample_block(None, spec, torch.Generator().manual_seed(0))
    assert blk.tokens[0].tolist() == [1, 0] and blk.log_inc is None
    for j, prefix in enumerate([[], [1]]):
        lp = LM.next_logprobs([PROMPT + prefix])[0].double()
        assert blk.log_q[0, j].item() == pytest.approx(float(torch.log_softmax(lp / 0.5, -1)[[1, 0][j]]), abs=1e-6)
    with pytest.raises(ValueError, match="forced"):
        state.sample_block(None, BlockSpec.make(2, 2, 1.0, LM.eos_token_ids, forced=torch.zeros(2, 3).long()), None)


@pytest.mark.parametrize("k, schedule, moves", [
    (1, None, None), (2, None, None), (1, pp.schedules.Linear(1.0, 3), None),
    (1, pp.schedules.AdaptiveESS(0.5, alpha_from=0.5), None), (2, pp.schedules.AdaptiveESS(0.5, alpha_from=0.5), None),
    (1, None, pp.MH(1, 2))], ids=["k1", "k2", "linear", "adaptive-k1", "adaptive-k2", "rejuvenate"])
def test_smc_on_a_block_only_backend_matches_exact(k, schedule, moves):
    """Power-SMC with native blocks of k tokens (weighed at block boundaries) on a backend that has
    only ``sample_block``, with and without an exponent bridge (fixed, or adaptive from the variance
    per token the last step realised), and with MH moves that redraw suffixes in blocks and replay
    the current ones as forced tokens; impostors (mode, low temperature, base LM) fail the same check."""
    alpha = 4.0
    target = pp.Target(NATIVE, pp.Power(alpha))
    exact = enumerate_target(pp.Target(LM, pp.Power(alpha)), PROMPT, T)
    smc = pp.SMC(1000, step=pp.steps.Tokens(k), ess_threshold=0.5 if moves is None else 1.0, schedule=schedule,
                 rejuvenate=moves)
    s, w = pooled(lambda seed: smc.run(target, PROMPT, T, seed=seed), range(6))
    check(exact, s, w, THRESHOLD, impostors(LM, PROMPT, T, alpha), f"native SMC k={k}")
    res = smc.run(target, PROMPT, T, seed=0)
    if isinstance(schedule, pp.schedules.AdaptiveESS):   # the linear pace first, then the realised variance's
        a = res.steps["exponent"]
        assert a[0] == pytest.approx(0.5 + (alpha - 0.5) / T) and a[1] > a[0]
        state = smc.init(target, [PROMPT], T, seed=0)
        smc.step(state)
        assert bool(torch.isfinite(state.term_data["token_var"]).all())
    if moves is not None:
        assert sum(res.steps["moves_accepted"]) > 0


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
    (pp.SMC(4), pp.Target(NATIVE, pp.Power(2.0) * pp.Tempered(0.5)), "Tempered"),
    (pp.SMC(4, step=pp.steps.Until(1), proposal=pp.proposals.FromLM(LM)), pp.Target(NATIVE, pp.Power(2.0)), "FromLM"),
    (pp.SMC(4, rejuvenate=pp.MH(1, 1, proposal=pp.proposals.TopK(2))), pp.Target(NATIVE, pp.Power(2.0)), "rejuvenate"),
    (pp.MH(2, 2, proposal=pp.proposals.TopK(2)), pp.Target(NATIVE, pp.Power(2.0)), "TopK"),
    (pp.samplers.ScalablePower(2, 2, 2, n=4, jackknife=True), pp.Target(NATIVE, pp.Power(2.0)), "Lookahead"),
    (pp.baselines.Plain(4), pp.Target(NATIVE, pp.Tempered(0.5)), "proposal Base"),
])
def test_what_needs_the_full_vocabulary_is_refused_by_name(engine, target, needle):
    with pytest.raises(NotNative, match=needle) as err:
        engine.run(target, PROMPT, T, seed=0)
    assert "HFLM" in str(err.value) or "Constant" in str(err.value) or "without moves" in str(err.value)


@pytest.mark.parametrize("engine, target", [
    (pp.SMC(64), pp.Target(NATIVE, pp.Power(2.0) * pp.Constraint(mask=_mask))),
    (pp.SMC(64, step=pp.steps.Until(1)), pp.Target(NATIVE, pp.Power(2.0))),
    (pp.SMC(64, proposal=pp.proposals.FromLM(LM)), pp.Target(NATIVE, pp.Power(2.0))),
    (pp.baselines.Plain(64), pp.Target(NATIVE, pp.Constraint(mask=_mask))),
    (pp.MH(2, 2), pp.Target(NATIVE, pp.Power(2.0) * pp.Constraint(mask=_mask))),
    (pp.SMC(64, proposal=pp.proposals.Lookahead(2, 2, 2)), pp.Target(NATIVE, pp.Power(2.0) * pp.Constraint(mask=_mask))),
    (pp.samplers.ScalablePower(2, 2, 2, n=16), pp.Target(NATIVE, pp.Power(2.0))),
], ids=["mask", "until", "draft", "plain-mask", "mh-mask", "lookahead-mask", "scalable-power"])
def test_masks_segments_and_drafts_run_in_native_blocks(engine, target):
    """What used to need the full vocabulary and now runs inside a block-only backend: masks
    (applied in the block), segment steps (end ids, the twist from ``log_norm_next``), a draft LM
    (its blocks scored by the target's ``extend``); the mask holds in every sample."""
    res = engine.run(target, PROMPT, T, seed=0)
    assert res.error is None and len(res.samples) >= 1
    if any(isinstance(f, pp.Constraint) for f in target.others):
        assert all(t < 3 for s in res.samples for t in s)


def test_block_steps_count_tokens_and_one_sync_per_token_step():
    res = pp.SMC(8).run(pp.Target(LM, pp.Power(2.0)), PROMPT, T, seed=0)
    assert res.stats["tokens_sampled"] == sum(len(s) + int(f) for s, f in zip(res.samples, res.finished))
    assert res.stats["host_syncs"] == res.stats["n_steps"]
    blocks = pp.SMC(8, step=pp.steps.Tokens(2)).run(pp.Target(LM, pp.Power(2.0)), PROMPT, T, seed=0)
    assert blocks.stats["n_steps"] <= math.ceil(T / 2)
    assert all(len(s) <= T for s in blocks.samples)
    assert list(itertools.chain(*blocks.samples))     # something was drawn


def test_one_token_hook_sees_every_listed_row_and_feed_last_false_makes_no_last_forward():
    """A one-token block runs on the device path: the hook sees every listed row (budget 0 too, its
    draw discarded); ``feed_last=False`` (a host bool) feeds no token at the budget's end, so the
    loop makes no ``step`` there, while a per-row ``feed_last`` tensor still does."""
    n = 5
    budget = torch.tensor([1, 0, 1, 1, 0])
    for feed_last, steps in ((False, 0), (torch.zeros(n, dtype=torch.bool), 1), (None, 1)):
        state = LM.start(PROMPT, n + 2, max_new_tokens=T)
        calls = []
        step = state.step
        state.step = lambda tok, act: calls.append(act.clone()) or step(tok, act)
        hook = TiltHook()
        spec = BlockSpec(budget=budget, width=1, temperature=torch.ones(n, dtype=torch.float64),
                         stop_ids=LM.eos_token_ids, feed_last=feed_last, propose=hook)
        blk = state.sample_block(torch.arange(1, n + 1), spec, torch.Generator().manual_seed(0))
        assert hook.calls == [list(range(n))]
        assert ((blk.tokens[:, 0] >= 0) == (budget > 0)).all() and blk.length.tolist() == budget.tolist()
        assert len(calls) == steps
        fed = [] if feed_last is not None else [k + 1 for k in range(n)
                                                  if budget[k] and int(blk.tokens[k, 0]) != LM.eos_token_id]
        assert [r for r in range(n + 2) if state.tokens[r]] == fed
    # several tokens with feed_last=False: a step per position but the last, rows at their end unfed
    state = LM.start(PROMPT, 3, max_new_tokens=T)
    calls = []
    step = state.step
    state.step = lambda tok, act: calls.append(act.clone()) or step(tok, act)
    spec = BlockSpec(budget=torch.tensor([3, 1, 3]), width=3, temperature=torch.ones(3, dtype=torch.float64),
                     stop_ids=LM.eos_token_ids, allow_stop=False, feed_last=False)
    blk = state.sample_block(None, spec, torch.Generator().manual_seed(0))
    assert len(calls) == 2 and calls[0].tolist() == [True, False, True]
    assert [len(t) for t in state.tokens] == [2, 0, 2] and blk.length.tolist() == [3, 1, 3]
