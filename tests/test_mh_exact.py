"""Block MH (Karan & Du, Algorithm 1) against ``llmppl.exact`` on toy LMs."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llmppl as pp
from llmppl.exact import enumerate_target
from llmppl.models import NGramLM
from llmppl.models.toy import EXACTNESS, ForkingLM

from _exactness import check, impostors, pooled


pytestmark = pytest.mark.usefixtures("one_thread")




LM = NGramLM(vocab_size=4, order=2, seed=4)   # structural tests (traces, stats, errors)
SETUP = EXACTNESS["fork"]                     # exactness: completions of 2 or 3 tokens, cut at 4
FORK = SETUP.lm()
PROMPT, T = SETUP.prompt, SETUP.max_new_tokens
THRESHOLD = 0.05
#: chains per run (two runs pooled): p^2 spreads over more sequences than p^4
CHAINS = {2.0: 3500, 4.0: 2500}


def mh_check(mh, target, alpha, label, lm=FORK, chains=5000, runs=2, others=None):
    exact = enumerate_target(target, PROMPT, T)
    res = []
    s, w = pooled(lambda seed: res.append(mh.run(target, PROMPT, T, chains=chains, seed=seed)) or res[-1],
                  range(runs))
    check(exact, s, w, THRESHOLD, impostors(lm, PROMPT, T, alpha) if others is None else others, label)
    return res


@pytest.mark.parametrize("alpha", [2.0, 4.0])
def test_mh_matches_power_with_eos_inside_blocks(alpha):
    res = mh_check(pp.MH(block_size=2, n_mcmc=8), pp.Target(FORK, pp.Power(alpha)), alpha,
                   f"MH alpha={alpha}", chains=CHAINS[alpha])[0]
    print(f"acceptance per stage {res.steps['acceptance']}")
    assert res.steps["stage_length"] == [2, 4]
    # EOS ended chains inside the second block (after 2 or 3 tokens): the final lengths vary
    assert any(res.finished) and {2, 3} <= {len(s) for s in res.samples}


def test_too_few_steps_are_detectably_wrong():
    """The same check fails without MH steps: the chains are then low-temperature draws."""
    target = pp.Target(FORK, pp.Power(4.0))
    exact = enumerate_target(target, PROMPT, T)
    res = pp.MH(block_size=4, n_mcmc=0).run(target, PROMPT, T, chains=5000, seed=1)
    assert exact.tv(res.samples) > 0.15


@pytest.mark.parametrize("alpha", [4.0])
def test_mh_matches_power_without_eos(alpha):
    """A ForkingLM that never ends (EOS probability 1e-9): every chain is cut at T."""
    lm = ForkingLM(seed=SETUP.seed, eos_profile=(0.0,))
    res = mh_check(pp.MH(block_size=2, n_mcmc=12), pp.Target(lm, pp.Power(alpha)), alpha,
                   f"MH alpha={alpha} no EOS", lm=lm, chains=3000)[0]
    assert all(len(s) == T for s in res.samples) and all(res.truncated)


def test_mh_uses_the_full_density_reward_and_twist():
    """Non-factorising log_complete (reward) at the end, twists at intermediate stages."""
    reward = lambda cs: [0.5 * c.token_ids.count(1) for c in cs]  # noqa: E731
    prm = lambda cs: [0.3 * len(c.token_ids) for c in cs]  # noqa: E731
    target = pp.Target(FORK, pp.Power(2.0) * pp.RewardTilt(reward, 0.5, process_reward=prm))
    others = {"p^2 without the reward": enumerate_target(pp.Target(FORK, pp.Power(2.0)), PROMPT, T).as_dict(),
              "base LM": enumerate_target(pp.Target(FORK), PROMPT, T).as_dict()}
    mh_check(pp.MH(block_size=2, n_mcmc=12), target, 2.0, "MH Power(2) * RewardTilt", others=others,
             chains=CHAINS[2.0])


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 1000), block=st.integers(1, 3))
def test_alpha_one_base_proposal_accepts_every_move(seed, block):
    """α = 1 with q = p and equal lengths: log A = 0 exactly, every move is accepted."""
    lm = NGramLM(vocab_size=4, order=2, seed=seed, eos_boost=0.0)
    res = pp.MH(block_size=block, n_mcmc=3, proposal=pp.proposals.Base()).run(
        pp.Target(lm), [0], 4, chains=16, seed=seed)
    assert res.steps["acceptance"] == [1.0] * math.ceil(4 / block)


def test_result_traces_and_stats():
    res = pp.MH(block_size=2, n_mcmc=3).run(pp.Target(LM, pp.Power(4.0)), [0], 5, chains=4, seed=0)
    assert res.method == "mh" and res.n == 4 and list(res.weights) == [0.25] * 4
    assert len(res.chains["log_p"]) == 4 and len(res.chains["log_p"][0]) == 3 * 3
    assert len(res.chains["acceptance"][0]) == 3 and len(res.chains["length"][0]) == 9
    # the trace ends at the final state's log p, which is the base LM's log-probability
    lp = pp.Target(LM).log_density([0], [s + ([LM.eos_token_id] if f else []) for s, f in
                                         zip(res.samples, res.finished)], 5)
    assert torch.allclose(torch.tensor(res.log_p, dtype=torch.float64), lp, atol=1e-4)
    assert [c[-1] for c in res.chains["log_p"]] == pytest.approx(res.log_p)
    for key in ("forward_passes", "tokens_decoded", "wall_time", "peak_memory"):
        assert key in res.stats
    again = pp.MH(block_size=2, n_mcmc=3).run(pp.Target(LM, pp.Power(4.0)), [0], 5, chains=4, seed=0)
    assert again.samples == res.samples


def test_bad_input():
    target = pp.Target(LM, pp.Power(2.0))
    with pytest.raises(ValueError, match="block_size"):
        pp.MH(block_size=0, n_mcmc=1)
    with pytest.raises(ValueError, match="n_mcmc"):
        pp.MH(block_size=2, n_mcmc=-1)
    with pytest.raises(ValueError, match="chains"):
        pp.MH(block_size=2, n_mcmc=1).run(target, [0], 4, chains=0)
    with pytest.raises(ValueError, match="random"):
        pp.MH(block_size=2, n_mcmc=1, proposal=pp.proposals.Lookahead(2, 2, 2))


def test_default_model_kv_reuse_matches_uncached_density(smollm, chat_prompt):
    """On the HF backend the suffix proposals reuse the prefix KV cache (reorder + truncate);
    the chains' log p must equal an uncached recomputation."""
    target = pp.Target(smollm, pp.Power(4.0))
    res = pp.MH(block_size=3, n_mcmc=2).run(target, chat_prompt, 6, chains=2, seed=0)
    eos = smollm.eos_token_id
    seqs = [s + [eos] if f else s for s, f in zip(res.samples, res.finished)]
    ref = pp.Target(smollm).log_density(chat_prompt, seqs, 6)
    assert torch.allclose(torch.tensor(res.log_p, dtype=torch.float64), ref, atol=2e-3)
    assert res.stats["forward_passes"] < 40 and all(isinstance(t, str) for t in res.texts)


def test_stateful_proposals_are_refused():
    with pytest.raises(ValueError, match="stateless"):
        pp.MH(block_size=2, n_mcmc=1, proposal=pp.proposals.FromLM(NGramLM(vocab_size=4, seed=1)))
