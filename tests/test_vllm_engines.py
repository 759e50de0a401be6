"""The engines on ``VLLMLM`` against exact enumeration through the transformers forward.

A tiny random-weight Llama (vocabulary 8, EOS 7) is saved to disk; vLLM decodes it natively
in blocks, and the target ``p^α`` is enumerated exactly through ``HFLM`` over the same weights
(``llmppl.exact``: the independent answer).  SMC with token steps and with blocks of 2
(weighed at block boundaries) and block MH must match it in total variation (TV ≤ 0.06 at
N = 4000 particles × 6 runs); the mode, low-temperature decoding and the base LM must not.
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

import llmppl as pp  # noqa: E402
from llmppl.exact import enumerate_target  # noqa: E402
from llmppl.models.hf import HFLM  # noqa: E402
from llmppl.models.vllm import VLLMLM  # noqa: E402

from _exactness import check, impostors  # noqa: E402
from tiny_models import tiny_vllm_llama  # noqa: E402

PROMPT, T, ALPHA = [1, 2, 3], 3, 2.0
THRESHOLD = 0.06
N, RUNS = 4000, 6


def tiny_llama(seed: int = 3):
    """Head sharpened ×3 and EOS raised, so that p^2 spreads over ~14 sequences and half end early."""
    return tiny_vllm_llama(seed, head_scale=3.0, eos_bias=2.0)


@pytest.fixture(scope="module")
def lms(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-engines")
    model = tiny_llama()
    model.save_pretrained(path)
    hf = HFLM(model)
    vl = VLLMLM(path)
    yield vl, hf
    del vl


@pytest.fixture(scope="module")
def exact(lms):
    _, hf = lms
    return enumerate_target(pp.Target(hf, pp.Power(ALPHA)), PROMPT, T)


def pooled_batch(engine, target, **kw):
    """RUNS runs of N as one run_batch over RUNS copies of the prompt (each its own SMC)."""
    res = engine.run_batch(target, [PROMPT] * RUNS, T, seed=0, **kw)
    samples, weights = [], []
    for r in res:
        assert r.error is None
        samples += r.samples
        weights += list(r.weights / RUNS)
    return samples, weights


@pytest.mark.parametrize("k", [1, 2])
def test_power_smc_on_vllm_matches_exact(lms, exact, k):
    vl, hf = lms
    smc = pp.SMC(N, step=pp.steps.Tokens(k), ess_threshold=0.5)
    s, w = pooled_batch(smc, pp.Target(vl, pp.Power(ALPHA)))
    check(exact, s, w, THRESHOLD, impostors(hf, PROMPT, T, ALPHA), f"vLLM SMC Tokens({k})")


def marginals(samples, weights=None):
    """The law of (first token, length): low-dimensional, so two samplers compare sharply."""
    w = [1.0 / len(samples)] * len(samples) if weights is None else list(weights)
    out = {}
    for s, x in zip(samples, w):
        key = (s[0] if s else -1, len(s))
        out[key] = out.get(key, 0.0) + x
    return out


def exact_marginals(exact):
    out = {}
    for s, p in exact.as_dict().items():
        key = (s[0] if s else -1, len(s))
        out[key] = out.get(key, 0.0) + p
    return out


def test_block_mh_on_vllm_is_the_same_mh_as_on_hf(lms, exact):
    """Block MH mixes slowly on this target (acceptance ~0.75; ~30 steps to TV 0.14 on HF too),
    so it is held to the same MH on HFLM: the law of (first token, length) of 6000 chains agrees
    within 0.05 (sampling noise ~0.03), both improve on their proposal (low temperature, ``n_mcmc = 0``) towards the exact
    target, and MH without steps (the impostor) is told apart."""
    from llmppl.exact import tv_distance

    vl, hf = lms
    mh = pp.MH(block_size=T, n_mcmc=8)
    s_v, w_v = pooled_batch(mh, pp.Target(vl, pp.Power(ALPHA)), chains=N // 4)
    s_h, w_h = pooled_batch(mh, pp.Target(hf, pp.Power(ALPHA)), chains=N // 4)
    s_0, w_0 = pooled_batch(pp.MH(block_size=T, n_mcmc=0), pp.Target(hf, pp.Power(ALPHA)), chains=N // 4)
    m_v, m_h, m_0, m_x = marginals(s_v), marginals(s_h), marginals(s_0), exact_marginals(exact)
    same, impostor = tv_distance(m_v, m_h), tv_distance(m_0, m_h)
    print(f"MH marginals: TV(vLLM, HF) {same:.3f}, TV(no steps, HF) {impostor:.3f}; to exact: vLLM "
          f"{tv_distance(m_v, m_x):.3f}, HF {tv_distance(m_h, m_x):.3f}, no steps {tv_distance(m_0, m_x):.3f}")
    assert same < 0.05 and impostor > 0.1
    assert tv_distance(m_v, m_x) < tv_distance(m_0, m_x) - 0.04
    assert abs(exact.tv(s_v) - exact.tv(s_h)) < 0.04


def test_what_vllm_cannot_run_natively_is_refused_by_name(lms):
    vl, _ = lms
    with pytest.raises(pp.models.block.NotNative, match="TopK"):
        pp.SMC(4, proposal=pp.proposals.TopK(2)).run(pp.Target(vl, pp.Power(2.0)), PROMPT, T, seed=0)
