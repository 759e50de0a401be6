"""Block MH (Karan & Du, Algorithm 1) against ``llmppl.exact`` on toy LMs."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llmppl as pp
from llmppl.exact import enumerate_target
from llmppl.models import NGramLM


pytestmark = pytest.mark.usefixtures("one_thread")




LM = NGramLM(vocab_size=4, order=2, seed=4)   # EOS inside blocks; p^2 and p^4 both spread


@pytest.mark.parametrize("alpha", [2.0, 4.0])
def test_mh_matches_power_with_eos_inside_blocks(alpha):
    target = pp.Target(LM, pp.Power(alpha))
    exact = enumerate_target(target, [0], 5)
    res = pp.MH(block_size=2, n_mcmc=20).run(target, [0], 5, chains=1500, seed=1)
    tv = exact.tv(res.samples)
    print(f"alpha={alpha}: TV(MH, exact) = {tv:.4f}, acceptance per stage {res.steps['acceptance']}")
    assert tv < 0.05
    assert res.steps["stage_length"] == [2, 4, 5]
    # EOS ended chains inside blocks: the final lengths vary
    assert any(res.finished) and len({len(s) for s in res.samples}) >= 2


def test_too_few_steps_are_detectably_wrong():
    """The same check fails without enough MH steps (the test can fail)."""
    target = pp.Target(LM, pp.Power(4.0))
    exact = enumerate_target(target, [0], 5)
    res = pp.MH(block_size=5, n_mcmc=0).run(target, [0], 5, chains=2000, seed=1)
    assert exact.tv(res.samples) > 0.1


@pytest.mark.parametrize("alpha", [2.0, 4.0])
def test_mh_matches_power_without_eos(alpha):
    lm = NGramLM(vocab_size=3, order=2, seed=6, eos_boost=0.0)
    target = pp.Target(lm, pp.Power(alpha))
    exact = enumerate_target(target, [0], 4)
    res = pp.MH(block_size=2, n_mcmc=15).run(target, [0], 4, chains=1000, seed=2)
    assert all(len(s) == 4 for s in res.samples) and all(res.truncated)
    tv = exact.tv(res.samples)
    print(f"alpha={alpha} no EOS: TV = {tv:.4f}")
    assert tv < 0.05


def test_mh_uses_the_full_density_reward_and_twist():
    """Non-factorising log_complete (reward) at the end, twists at intermediate stages."""
    reward = lambda cs: [0.5 * c.token_ids.count(1) for c in cs]  # noqa: E731
    prm = lambda cs: [0.3 * len(c.token_ids) for c in cs]  # noqa: E731
    target = pp.Target(LM, pp.Power(2.0) * pp.RewardTilt(reward, 0.5, process_reward=prm))
    exact = enumerate_target(target, [0], 5)
    res = pp.MH(block_size=2, n_mcmc=20).run(target, [0], 5, chains=1500, seed=3)
    tv = exact.tv(res.samples)
    print(f"Power(2) * RewardTilt: TV = {tv:.4f}")
    assert tv < 0.05


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
