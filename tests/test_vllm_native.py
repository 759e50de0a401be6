"""Methods that run inside vLLM's native blocks, exact against enumeration through transformers.

A tiny random Llama (vocabulary 8, EOS 7) is decoded by ``VLLMLM`` (the mask applied inside our
logits processor, segment ends as block end ids, the look-ahead twist from the recorder's
``log_norm_next``) and by ``HFLM`` over the same weights (the reference token loop); the target is
enumerated exactly through the transformers forward (``llmppl.exact`` on ``HFLM``).  Each method
must match it (TV ≤ 0.06, N = 4000 × 6 pooled) on both backends, and the impostor — the same run
without the mask / tilt — must be at least 0.2 away from the target:

* ``Power(2) * Constraint(mask=fixed set)``: a static mask (``BlockSpec.allowed``);
* ``Power(2) * Constraint(mask=callable)``: a per-row mask on the completion so far (``mask_fn``);
* ``Until`` segment steps (a token-id delimiter) under ``Power(2) * RewardTilt(r, β)``, resampling
  at segment boundaries: the PRM particle filter's shape;
* ``AdaptiveESS`` bridging and resample-move (``rejuvenate=pp.MH``, reverse moves replayed as
  forced tokens through the engine);
* ``FromLM(draft)`` in token steps and blocks of 2: the draft (an ``HFLM`` of another tiny Llama)
  draws each block, the target scores it with one ``extend`` (on vLLM: forced tokens through the
  engine); the impostor is the draft's own law;
* the engines refuse by name what still needs full-vocabulary log-probabilities on vLLM.
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

import llmppl as pp  # noqa: E402
from llmppl.exact import enumerate_target, tv_distance  # noqa: E402
from llmppl.models.block import NotNative  # noqa: E402
from llmppl.models.hf import HFLM  # noqa: E402
from llmppl.models.vllm import VLLMLM  # noqa: E402

from _exactness import check  # noqa: E402
from tiny_models import tiny_vllm_llama  # noqa: E402

PROMPT, T, ALPHA = [1, 2, 3], 3, 2.0
THRESHOLD, AWAY = 0.06, 0.2
N, RUNS = 4000, 6
DELIM = 4


@pytest.fixture(scope="module")
def tiny_llama():
    return tiny_vllm_llama(3, head_scale=3.0, eos_bias=2.0)


@pytest.fixture(scope="module")
def lms(tmp_path_factory, tiny_llama):
    path = tmp_path_factory.mktemp("tiny-llama-native")
    tiny_llama.save_pretrained(path)
    hf = HFLM(tiny_llama)
    vl = VLLMLM(path)
    yield {"vllm": vl, "hf": hf}
    del vl


def pooled(engine, target):
    res = engine.run_batch(target, [PROMPT] * RUNS, T, seed=0)
    samples, weights = [], []
    for r in res:
        assert r.error is None, r.error
        samples += r.samples
        weights += list(r.weights / RUNS)
    return samples, weights


def _heavy_token(hf) -> int:
    """The generated token that carries the most mass of p^α (masking it moves the law most)."""
    ex = enumerate_target(pp.Target(hf, pp.Power(ALPHA)), PROMPT, T)
    mass = torch.zeros(8, dtype=torch.float64)
    for s, p in ex.as_dict().items():
        for v in set(s):
            mass[v] += p
    mass[7] = 0.0
    return int(mass.argmax())


def no_repeat(batch):
    """A per-row mask: never the token just drawn (EOS always allowed)."""
    out = torch.ones(len(batch), 8, dtype=torch.bool)
    for i, toks in enumerate(batch.tokens):
        if toks:
            out[i, toks[-1]] = toks[-1] == 7
    return out


def reward(cs):
    return [1.0 * c.token_ids.count(DELIM) - (0.5 if c.truncated else 0.0) for c in cs]


def _targets(lm, hf):
    heavy = _heavy_token(hf)
    allowed = torch.ones(8, dtype=torch.bool)
    allowed[heavy] = False
    return {
        "static-mask": (pp.Power(ALPHA) * pp.Constraint(mask=allowed), "token"),
        "callable-mask": (pp.Power(ALPHA) * pp.Constraint(mask=no_repeat), "token"),
        "segments-tilt": (pp.Power(ALPHA) * pp.RewardTilt(reward, 1.0), pp.steps.Until(DELIM, max_tokens=2)),
    }


@pytest.mark.parametrize("backend", ["vllm", "hf"])
@pytest.mark.parametrize("case", ["static-mask", "callable-mask", "segments-tilt"])
def test_native_method_matches_exact(lms, backend, case):
    hf, lm = lms["hf"], lms[backend]
    potential, step = _targets(lm, hf)[case]
    exact = enumerate_target(pp.Target(hf, potential), PROMPT, T)
    impostor = enumerate_target(pp.Target(hf, pp.Power(ALPHA)), PROMPT, T)   # without mask / tilt
    assert tv_distance(exact.as_dict(), impostor.as_dict()) > AWAY
    smc = pp.SMC(N, step=step, ess_threshold=0.5)
    state = smc.init(pp.Target(lm, potential), [PROMPT], T, seed=0)
    assert state.plan.native              # drawn in the backend's own blocks
    s, w = pooled(smc, pp.Target(lm, potential))
    check(exact, s, w, THRESHOLD, {"the same run without the mask or tilt": impostor.as_dict()},
          f"{backend} {case}", min_support=3.0)


@pytest.mark.parametrize("backend", ["vllm", "hf"])
@pytest.mark.parametrize("k", [1, 2])
def test_a_draft_lm_proposal_is_exact(lms, backend, k):
    hf, lm = lms["hf"], lms[backend]
    draft = HFLM(tiny_vllm_llama(5, head_scale=2.0, eos_bias=2.0))
    exact = enumerate_target(pp.Target(hf, pp.Power(ALPHA)), PROMPT, T)
    draft_law = enumerate_target(pp.Target(draft), PROMPT, T).as_dict()
    assert tv_distance(exact.as_dict(), draft_law) > AWAY
    smc = pp.SMC(N, step=pp.steps.Tokens(k), proposal=pp.proposals.FromLM(draft, tau=0.7), ess_threshold=0.5)
    assert smc.init(pp.Target(lm, pp.Power(ALPHA)), [PROMPT], T, seed=0).plan.drafted
    s, w = pooled(smc, pp.Target(lm, pp.Power(ALPHA)))
    check(exact, s, w, THRESHOLD, {"the draft's own law": draft_law}, f"{backend} FromLM Tokens({k})",
          min_support=3.0)


def _low_temperature(hf):
    return enumerate_target(pp.Target(hf, pp.Tempered(1.0 / ALPHA)), PROMPT, T).as_dict()


@pytest.mark.parametrize("backend", ["vllm", "hf"])
@pytest.mark.parametrize("case", ["adaptive", "rejuvenate"])
def test_adaptive_bridging_and_resample_move_are_exact(lms, backend, case):
    """``AdaptiveESS`` (on vLLM from the variance per token the last step realised, on HF from the
    next-token distribution) and ``rejuvenate=pp.MH(1, 1)`` (suffixes redrawn in native blocks, the
    current ones replayed as forced tokens for their reverse log q), resampling every step so that
    the moves act; the impostors are plain decoding at τ = 1/α and the base LM."""
    hf, lm = lms["hf"], lms[backend]
    exact = enumerate_target(pp.Target(hf, pp.Power(ALPHA)), PROMPT, T)
    others = {"low temperature": _low_temperature(hf),
              "base LM": enumerate_target(pp.Target(hf), PROMPT, T).as_dict()}
    assert min(tv_distance(exact.as_dict(), d) for d in others.values()) > AWAY
    smc = (pp.SMC(N, schedule=pp.schedules.AdaptiveESS(0.5, alpha_from=0.5), ess_threshold=0.5) if case == "adaptive"
           else pp.SMC(N, rejuvenate=pp.MH(1, 1), ess_threshold=1.0))
    res = smc.run_batch(pp.Target(lm, pp.Power(ALPHA)), [PROMPT] * RUNS, T, seed=0)
    if case == "adaptive":
        assert all(r.steps["exponent"][0] < r.steps["exponent"][1] for r in res)    # it bridged
    else:
        assert sum(sum(r.steps["moves_accepted"]) for r in res) > 0
    s, w = [], []
    for r in res:
        s += r.samples
        w += list(r.weights / RUNS)
    check(exact, s, w, THRESHOLD, others, f"{backend} {case}", min_support=3.0)


def test_forced_tokens_replay_with_the_exact_log_q_of_the_native_proposal(lms, tiny_llama):
    """A replayed suffix (MH's reverse move) on vLLM: ``log q`` of each forced token under
    ``q ∝ p^{1/τ}`` without EOS and ``log p``, against the transformers forward; a forced token
    the mask excludes has ``log q = −inf``; the drawn row of the same block is drawn."""
    from llmppl.models.block import BlockSpec
    vl = lms["vllm"]
    suffix = [4, 5, 6]
    allowed = torch.ones(8, dtype=torch.bool)
    allowed[6] = False
    for mask in (None, allowed):
        st = vl.start(PROMPT, 2)
        spec = BlockSpec.make(2, 3, 0.5, (7,), allow_stop=False, allowed=mask,
                              forced=torch.tensor([suffix, [-1, -1, -1]]))
        blk = st.sample_block(None, spec, torch.Generator().manual_seed(0))
        assert blk.tokens[0].tolist() == suffix and st.tokens[0] == suffix and len(st.tokens[1]) == 3
        with torch.no_grad():
            lp = torch.log_softmax(tiny_llama(torch.tensor([PROMPT + suffix])).logits[0].double(), -1)
        for j, tok in enumerate(suffix):
            row = lp[len(PROMPT) - 1 + j]
            logits_q = row / 0.5
            logits_q[7] = -float("inf")
            if mask is not None:
                logits_q[~mask] = -float("inf")
            want = float(torch.log_softmax(logits_q, -1)[tok])
            assert float(blk.log_p[0, j]) == pytest.approx(float(row[tok]), abs=1e-4)
            if want == -float("inf"):
                assert float(blk.log_q[0, j]) == -float("inf")
            else:
                assert float(blk.log_q[0, j]) == pytest.approx(want, abs=1e-4)


def test_mh_and_plain_apply_a_mask_natively_on_vllm(lms):
    vl = lms["vllm"]
    potential = pp.Power(ALPHA) * pp.Constraint(mask=no_repeat)
    plain = pp.baselines.Plain(200).run(pp.Target(vl, potential), PROMPT, T, seed=0)
    for s in plain.samples:
        assert all(a != b for a, b in zip(s, s[1:]))
    mh = pp.MH(block_size=T, n_mcmc=2).run(pp.Target(vl, potential), PROMPT, T, chains=64, seed=0)
    for s in mh.samples:
        assert all(a != b for a, b in zip(s, s[1:]))


def test_what_still_needs_the_full_vocabulary_is_refused_by_name(lms):
    vl = lms["vllm"]
    target = pp.Target(vl, pp.Power(ALPHA))
    for engine, name in [(pp.SMC(4, proposal=pp.proposals.TopK(2)), "TopK"),
                         (pp.SMC(4, proposal=pp.proposals.Lookahead(2, 2, 2, jackknife=True)), "Lookahead"),
                         (pp.SMC(4, proposal=pp.proposals.Lookahead(2, 2, 2), step=pp.steps.Until(3)), "Lookahead"),
                         (pp.SMC(4, rejuvenate=pp.MH(1, 1, proposal=pp.proposals.TopK(2))), "rejuvenate")]:
        with pytest.raises(NotNative, match=name):
            engine.run(target, PROMPT, T, seed=0)
    with pytest.raises(NotNative, match="Tempered"):
        pp.SMC(4).run(pp.Target(vl, pp.Power(ALPHA) * pp.Tempered(0.5)), PROMPT, T, seed=0)
