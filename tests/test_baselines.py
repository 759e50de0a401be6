"""Decoding baselines: plain, low temperature, greedy, best-of-N."""

import math

import pytest
import torch

import llmppl as pp
from llmppl.exact import enumerate_target
from llmppl.models import NGramLM
from llmppl.models.toy import EXACTNESS

from _exactness import check

LM = NGramLM(vocab_size=4, order=2, seed=4)
SETUP = EXACTNESS["fork"]
FORK, PROMPT, T = SETUP.lm(), SETUP.prompt, SETUP.max_new_tokens


pytestmark = pytest.mark.usefixtures("one_thread")


def test_plain_and_low_temperature_sample_their_distributions():
    """Plain decoding samples the base LM and low temperature its token-level law — each far
    from the other, from the mode and from p^2 (what the target asks for and they ignore)."""
    target = pp.Target(FORK, pp.Power(2.0))   # the baselines ignore the target's sharpening
    base = enumerate_target(pp.Target(FORK), PROMPT, T)
    lowd = enumerate_target(pp.Target(FORK, pp.Tempered(0.5)), PROMPT, T)
    power = enumerate_target(target, PROMPT, T).as_dict()
    plain = pp.baselines.Plain(n=20000).run(target, PROMPT, T, seed=0)
    check(base, plain.samples, None, 0.04, {"p^2": power, "low temperature 1/2": lowd.as_dict()}, "Plain")
    low = pp.baselines.LowTemperature(tau=0.5, n=20000).run(target, PROMPT, T, seed=0)
    check(lowd, low.samples, None, 0.04, {"p^2": power, "base LM": base.as_dict()}, "LowTemperature(0.5)")
    for res in (plain, low):
        assert res.n == 20000 and list(res.weights) == pytest.approx([1 / 20000] * 20000)
        for key in ("forward_passes", "tokens_decoded", "wall_time", "peak_memory"):
            assert key in res.stats
        assert res.stats["forward_passes"] <= T + 1   # one batched forward per position
        assert all(f != t for f, t in zip(res.finished, res.truncated))
        assert all(len(s) == T for s, t in zip(res.samples, res.truncated) if t)
    target = pp.Target(LM, pp.Power(4.0))
    low = pp.baselines.LowTemperature(tau=0.5, n=50).run(target, [0], 4, seed=0)
    # log p and log γ of the samples agree with the target's own density
    seqs = [s + [LM.eos_token_id] if f else s for s, f in zip(low.samples[:20], low.finished[:20])]
    assert torch.allclose(torch.tensor(low.log_p[:20], dtype=torch.float64),
                          pp.Target(LM).log_density([0], seqs, 4), atol=1e-4)
    assert torch.allclose(torch.tensor(low.stats["log_target"][:20], dtype=torch.float64),
                          target.log_density([0], seqs, 4), atol=1e-4)


def test_greedy_follows_the_argmax():
    res = pp.baselines.Greedy().run(pp.Target(LM), [0], 6)
    seq, ctx = [], [0]
    for _ in range(6):
        v = int(LM.next_logprobs([ctx]).argmax())
        if v == LM.eos_token_id:
            break
        seq.append(v)
        ctx.append(v)
    assert res.samples == [seq] and res.n == 1


def test_best_of_n_keeps_the_best():
    target = pp.Target(LM, pp.Power(2.0))
    res = pp.baselines.BestOfN(n=16, by="logp").run(target, [0], 5, seed=1)
    assert res.weights[res.best_index()] == 1.0
    assert res.log_p[res.best_index()] == max(res.log_p)
    count_ones = lambda cs: [c.token_ids.count(1) for c in cs]  # noqa: E731
    res = pp.baselines.BestOfN(n=16, by=count_ones).run(target, [0], 5, seed=1)
    assert res.best_tokens.count(1) == max(s.count(1) for s in res.samples)
    res = pp.baselines.BestOfN(n=16, by="target").run(target, [0], 5, seed=1)
    assert res.stats["log_target"][res.best_index()] == max(res.stats["log_target"])


def test_bad_input():
    with pytest.raises(ValueError, match="n must"):
        pp.baselines.Plain(n=0)
    with pytest.raises(ValueError, match="tau"):
        pp.baselines.LowTemperature(tau=0.0)
    with pytest.raises(ValueError, match="by must"):
        pp.baselines.BestOfN(n=4, by="nonsense")
    with pytest.raises(ValueError, match="max_new_tokens"):
        pp.baselines.Plain().run(pp.Target(LM), [0], 0)
    bad = lambda cs: [1.0]  # noqa: E731
    with pytest.raises(ValueError, match="scores"):
        pp.baselines.BestOfN(n=3, by=bad).run(pp.Target(LM), [0], 3, seed=0)


def test_default_model_batched(smollm, chat_prompt):
    res = pp.baselines.LowTemperature(tau=0.7, n=3).run(pp.Target(smollm), chat_prompt, 6, seed=0)
    assert res.n == 3 and all(isinstance(t, str) for t in res.texts)
    assert res.stats["tokens_decoded"] <= 3 * 6 and res.stats["forward_passes"] <= 7
    assert all(math.isfinite(v) for v in res.log_p)
