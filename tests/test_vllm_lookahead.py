"""The look-ahead proposal runs natively on vLLM, exact against enumeration through transformers.

The same tiny random Llama as tests/test_vllm_native.py (vocabulary 8, EOS 7), decoded by ``VLLMLM``
and by ``HFLM`` over the same weights.  ``Lookahead`` draws each token natively on both
(``Lookahead.draw_next``: a one-token block at ``τ = 1/α`` that records the top-k candidates
(``BlockSpec.top_k``) and ``log Σ p^α``, rollouts on a fork, the mixture's choice on the host):

* ``BlockSpec.top_k``: vLLM's recorder gives the top-k ids and ``log p`` that HF's reference loop
  gives, at each row's first position;
* SMC with ``Lookahead(top_k=2, rollouts=2, horizon=2)`` under ``Power(2)`` matches the exact target
  (TV ≤ 0.06, N = 4000 × 6 pooled) on both backends, off the token path (``plan.drafted``); the base
  LM's law is ≥ 0.2 away;
* ``ScalablePower`` (approximate by design: its law has no closed form) draws the same law on vLLM,
  on HF's native path and on HF's full-vocabulary reference path (``Lookahead.log_probs`` through the
  decoder's token hook): a permutation two-sample test on 6000 draws each, which rejects draws from
  the base LM.
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

from collections import Counter  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

import llmppl as pp  # noqa: E402
from llmppl.exact import enumerate_target, tv_distance  # noqa: E402
from llmppl.inference.decoder import Decoder  # noqa: E402
from llmppl.models.block import BlockSpec  # noqa: E402
from llmppl.models.hf import HFLM  # noqa: E402
from llmppl.models.vllm import VLLMLM  # noqa: E402

from _exactness import check  # noqa: E402
from tiny_models import tiny_vllm_llama  # noqa: E402

PROMPT, T, ALPHA = [1, 2, 3], 3, 2.0
THRESHOLD, AWAY = 0.06, 0.2
N, RUNS = 4000, 6
N_SP = 1000          # ScalablePower: 1000 × 6 draws per path (vLLM decodes ~1 request per row and token)
LOOKAHEAD = dict(top_k=2, rollouts=2, horizon=2)


@pytest.fixture(scope="module")
def lms(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-lookahead")
    model = tiny_vllm_llama(3, head_scale=3.0, eos_bias=2.0)
    model.save_pretrained(path)
    hf = HFLM(model)
    vl = VLLMLM(path)
    yield {"vllm": vl, "hf": hf}
    del vl


def law(samples, weights=None) -> dict:
    """The (weighted) empirical law of token sequences."""
    out: Counter = Counter()
    for s, w in zip(samples, weights if weights is not None else [1.0 / len(samples)] * len(samples)):
        out[tuple(s)] += float(w)
    return dict(out)


def permutation_test(a: list, b: list, permutations: int = 999, seed: int = 0) -> tuple[float, float]:
    """TV between the empirical laws of ``a`` and ``b`` and its permutation p-value under "one law"
    (the pooled draws relabelled at random ``permutations`` times): the TV two same-law samples of
    these sizes show is sampling noise (~0.045 at 12000 each over this support, ~0.06 at 6000), not a threshold."""
    codes = {s: i for i, s in enumerate(sorted(set(a) | set(b)))}
    pooled = torch.tensor([codes[s] for s in a + b])
    n, C = len(a), len(codes)

    def tv(labels: torch.Tensor) -> float:
        fa = torch.bincount(labels[:n], minlength=C).double() / n
        fb = torch.bincount(labels[n:], minlength=C).double() / (len(labels) - n)
        return 0.5 * float((fa - fb).abs().sum())

    observed = tv(pooled)
    g = torch.Generator().manual_seed(seed)
    null = [tv(pooled[torch.randperm(len(pooled), generator=g)]) for _ in range(permutations)]
    return observed, (1 + sum(x >= observed for x in null)) / (1 + permutations)


def test_top_k_of_a_block_is_the_same_on_both_backends(lms):
    prompts = [[1, 2, 3], [4, 5], [6]]
    got = {}
    for name in ("vllm", "hf"):
        state = lms[name].start(prompts, n=2, max_new_tokens=3)
        spec = BlockSpec.make(6, torch.tensor([2, 1, 0, 2, 1, 1]), torch.full((6,), 0.5), (7,), top_k=3,
                              norm_exponent=torch.full((6,), 2.0), feed_last=False)
        blk = state.sample_block(torch.arange(6), spec, torch.Generator().manual_seed(0))
        got[name] = blk
    v, h = got["vllm"], got["hf"]
    assert v.top_ids is not None and h.top_ids is not None and v.top_log_p is not None and h.top_log_p is not None
    assert v.top_ids.tolist() == h.top_ids.tolist()
    assert v.top_ids[2].tolist() == [-1, -1, -1]             # budget 0: nothing recorded
    live = v.top_ids[:, 0] >= 0
    assert torch.allclose(v.top_log_p[live], h.top_log_p[live], atol=1e-4)
    full = lms["hf"].next_logprobs([[1, 2, 3], [4, 5], [6]]).double()
    ref = full.topk(3, -1)
    assert v.top_ids[0].tolist() == ref.indices[0].tolist() and v.top_ids[5].tolist() == ref.indices[2].tolist()
    # the block's first log_norm at a = 1/τ is log Σ p^a: what the look-ahead's q_0 needs
    S = torch.logsumexp(2.0 * full, -1)
    assert torch.allclose(v.log_norm[[0, 1, 3, 4, 5], 0], S[[0, 0, 1, 2, 2]], atol=1e-4)


@pytest.mark.parametrize("backend", ["vllm", "hf"])
def test_lookahead_in_smc_is_exact_and_native(lms, backend):
    hf, lm = lms["hf"], lms[backend]
    exact = enumerate_target(pp.Target(hf, pp.Power(ALPHA)), PROMPT, T)
    base = enumerate_target(pp.Target(hf), PROMPT, T).as_dict()
    assert tv_distance(exact.as_dict(), base) > AWAY
    smc = pp.SMC(N, proposal=pp.proposals.Lookahead(**LOOKAHEAD), ess_threshold=0.5)
    target = pp.Target(lm, pp.Power(ALPHA))
    plan = smc.init(target, [PROMPT], T, seed=0).plan
    assert plan.drafted and not plan.native and not plan.tokenwise     # not the token path
    res = smc.run_batch(target, [PROMPT] * RUNS, T, seed=0)
    samples, weights = [], []
    for r in res:
        assert r.error is None, r.error
        samples += r.samples
        weights += list(r.weights / RUNS)
    assert res[0].stats["lookahead_tokens_decoded"] > 0
    check(exact, samples, weights, THRESHOLD, {"the base LM": base}, f"{backend} SMC Lookahead", min_support=3.0)


def test_scalable_power_draws_the_same_law_natively_on_both_backends(lms):
    hf, vl = lms["hf"], lms["vllm"]
    sp = pp.samplers.ScalablePower(n=N_SP, **LOOKAHEAD)
    draws = {}
    for name, lm in (("vllm", vl), ("hf", hf)):
        res = sp.run_batch(pp.Target(lm, pp.Power(ALPHA)), [PROMPT] * RUNS, T, seed=1)
        draws[name] = [tuple(s) for r in res for s in r.samples]
    # HF's full-vocabulary reference: the decoder's token hook over Lookahead.log_probs
    ref = Decoder("scalable_power", sp.lookahead, N_SP, {})
    res = ref.run_batch(pp.Target(hf, pp.Power(ALPHA)), [PROMPT] * RUNS, T, seed=2)
    draws["hf-full-vocabulary"] = [tuple(s) for r in res for s in r.samples]
    exact = enumerate_target(pp.Target(hf, pp.Power(ALPHA)), PROMPT, T).as_dict()
    base = enumerate_target(pp.Target(hf), PROMPT, T).as_dict()
    print("ScalablePower, TV to p^α:", {k: round(tv_distance(law(v), exact), 3) for k, v in draws.items()},
          "| to p:", {k: round(tv_distance(law(v), base), 3) for k, v in draws.items()})
    names = sorted(draws)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            tv, p = permutation_test(draws[a], draws[b])
            print(f"{a} ~ {b}: TV {tv:.4f}, permutation p = {p:.3f}")
            assert p > 0.002, (a, b, tv, p)
    # the same test rejects a law that differs: 6000 draws from the base LM's exact law
    seqs = list(base)
    pick = torch.multinomial(torch.tensor([base[s] for s in seqs], dtype=torch.float64), RUNS * N_SP,
                             replacement=True, generator=torch.Generator().manual_seed(3))
    tv, p = permutation_test(draws["vllm"], [seqs[i] for i in pick.tolist()])
    print(f"vllm ~ the base LM: TV {tv:.4f}, permutation p = {p:.3f}")
    assert p <= 0.002 and tv > 0.1
