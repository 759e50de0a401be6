"""The batched, device-resident SMC engine: grouped resampling, host syncs, masks, bridging, refusals.

Exactness through ``run_batch`` for every scheme and schedule is in ``test_run_batch_exact.py``;
here: properties of the pieces and the fixes of issue 12 that live in the engine.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llmppl as pp
from llmppl.exact import enumerate_target
from llmppl.inference.common import AllParticlesDied
from llmppl.inference.resampling import RESAMPLERS
from llmppl.models import NGramLM

SCHEMES = sorted(RESAMPLERS)


# ----------------------------------------------------------------------------- grouped resampling
@pytest.mark.parametrize("scheme", SCHEMES)
@settings(max_examples=8, deadline=None)
@given(w=st.lists(st.lists(st.floats(0.01, 5.0), min_size=5, max_size=5), min_size=2, max_size=4),
       n=st.integers(1, 9))
def test_grouped_resampling_is_unbiased_per_group(scheme, w, n):
    """``E[#offspring_i] = n w_i`` within each group, and indices never leave their group."""
    weights = torch.tensor(w, dtype=torch.float64)
    p = (weights / weights.sum(1, keepdim=True)).numpy()
    gen = torch.Generator().manual_seed(n)
    reps = 600
    counts = np.zeros(weights.shape)
    for _ in range(reps):
        idx = RESAMPLERS[scheme](gen, weights, n)
        assert idx.shape == (len(w), n) and int(idx.min()) >= 0 and int(idx.max()) < 5
        for g in range(len(w)):
            counts[g] += np.bincount(idx[g].numpy(), minlength=5)
    mean = counts / reps
    se = np.sqrt(n * p * (1 - p) / reps) + 1e-9
    assert np.all(np.abs(mean - n * p) <= 5 * se + 0.02), (mean, n * p)


def test_grouped_and_single_group_agree_in_shape():
    gen = torch.Generator().manual_seed(0)
    for scheme in SCHEMES:
        assert RESAMPLERS[scheme](gen, torch.ones(4), 4).shape == (4,)
        assert RESAMPLERS[scheme](gen, torch.ones(3, 4), 4).shape == (3, 4)
        with pytest.raises(ValueError):
            RESAMPLERS[scheme](gen, torch.tensor([[1.0, 1.0], [0.0, 0.0]]), 2)


# ----------------------------------------------------------------------------- host syncs, batching
def test_one_host_sync_per_token_step_for_a_power_target():
    lm = NGramLM(vocab_size=6, order=2, seed=2)
    target = pp.Target(lm, pp.Power(3.0))
    res = pp.SMC(16).run_batch(target, [[0], [1, 2], [3]], 5, seed=0)
    for r in res:
        assert r.stats["host_syncs"] == r.stats["n_steps"] and r.stats["batch_prompts"] == 3


def test_prompts_do_not_exchange_particles():
    """Prompts whose completions cannot overlap keep disjoint particles through resampling."""
    lm = NGramLM(vocab_size=8, order=2, seed=5, concentration=0.5)
    low = pp.Constraint(mask=torch.tensor([True] * 4 + [False] * 3 + [True]))
    res = pp.SMC(32, ess_threshold=1.0).run_batch(pp.Target(lm, pp.Power(2.0) * low), [[0], [1], [2]], 4, seed=1)
    assert all(r.stats["resampling_count"] >= 2 for r in res)
    for g, r in enumerate(res):
        anc = np.asarray(r.steps["ancestors"])
        assert anc.min() >= 0 and anc.max() < 32
        assert all(t < 4 or t == lm.eos_token_id for s in r.samples for t in s)


def test_one_prompt_failing_does_not_stop_the_others():
    lm = NGramLM(vocab_size=5, order=2, seed=1)

    def needs_token_3(c):            # prompt [3] starts every completion after a 3; others rarely
        return 3 in c.token_ids

    target = pp.Target(lm, pp.Power(1.0) * pp.Constraint(mask=lambda b: torch.tensor(
        [[v != 3 for v in range(5)] for _ in b.tokens])) * pp.Constraint(needs_token_3))
    res = pp.SMC(8).run_batch(target, [[0], [1]], 3, seed=0)
    assert all(r.error is not None and "prompt" in r.error for r in res)
    with pytest.raises(AllParticlesDied, match="every particle has weight zero"):
        pp.SMC(8).run(target, [0], 3, seed=0)
    ok = pp.Target(lm, pp.Power(1.0))
    mixed = pp.SMC(8).run_batch(ok, [[0], [1]], 3, seed=0)
    assert all(r.error is None for r in mixed)


# ----------------------------------------------------------------------------- issue 12, item 5: masks
def test_default_proposal_proposes_inside_the_token_mask():
    """2 of 8 tokens allowed: the default proposal is q ∝ p^a · mask, so no particle dies, and
    the weighted particles match the exact target; a temperature proposal is masked inside the
    native block too, while a full-vocabulary proposal that ignores the mask (``TopK(8)``, the
    unmasked ``q ∝ p^a``: the old default) kills most particles."""
    lm = NGramLM(vocab_size=8, order=2, seed=3, concentration=1.0)
    allowed = torch.zeros(8, dtype=torch.bool)
    allowed[[2, lm.eos_token_id]] = True
    target = pp.Target(lm, pp.Power(2.0) * pp.Constraint(mask=allowed))
    res = pp.SMC(16).run(target, [0], 4, seed=0)
    assert not any(math.isinf(w) for w in res.log_weights)
    assert all(t in (2,) for s in res.samples for t in s)
    masked = pp.SMC(16, proposal=pp.proposals.Temperature()).run(target, [0], 4, seed=0)
    assert not any(math.isinf(w) for w in masked.log_weights)
    ignoring = pp.SMC(16, proposal=pp.proposals.TopK(8)).run_batch(target, [[0]], 4, seed=0)[0]
    assert ignoring.error is not None or sum(math.isinf(w) for w in ignoring.log_weights) >= 8
    exact = enumerate_target(target, [0], 4)
    runs = pp.SMC(64).run_batch(target, [[0]] * 8, 4, seed=1)
    pooled = np.concatenate([r.weights for r in runs]) / len(runs)
    assert exact.tv([s for r in runs for s in r.samples], pooled) < 0.05


# ----------------------------------------------------------------------------- issue 12, item 4
def test_segment_steps_with_rejuvenation_are_refused():
    with pytest.raises(ValueError, match="segment steps"):
        pp.SMC(4, step=pp.steps.Until(2, max_tokens=3), rejuvenate=pp.MH(block_size=1, n_mcmc=1))
    pp.SMC(4, step=pp.steps.Tokens(2), rejuvenate=pp.MH(block_size=1, n_mcmc=1))   # fixed-length blocks: fine


# ----------------------------------------------------------------------------- issue 12, item 6
def test_adaptive_schedule_bridges_on_an_lm_and_stays_exact():
    lm = NGramLM(vocab_size=5, order=2, seed=3, concentration=1.0)
    target = pp.Target(lm, pp.Power(4.0))
    smc = pp.SMC(64, schedule=pp.schedules.AdaptiveESS(0.5))
    runs = smc.run_batch(target, [[0]] * 16, 5, seed=2)
    first = runs[0].steps["exponent"]
    assert first[0] < 4.0 and first[-1] == pytest.approx(4.0)      # it bridges from identical particles
    exact = enumerate_target(target, [0], 5)
    lz = np.array([r.log_evidence for r in runs])
    ratio = np.exp(lz - exact.log_Z)
    pooled = np.concatenate([r.weights * z for r, z in zip(runs, ratio / ratio.sum())])
    assert exact.tv([s for r in runs for s in r.samples], pooled) < 0.04
    # the greedy rule's failure mode: a constant schedule is what it used to return
    const = pp.SMC(64).run(target, [0], 5, seed=2).steps["exponent"]
    assert const[0] == 4.0


def test_per_prompt_exponents_differ_when_the_prompts_do():
    lm = NGramLM(vocab_size=6, order=2, seed=7, concentration=0.3)
    res = pp.SMC(32, schedule=pp.schedules.AdaptiveESS(0.5)).run_batch(
        pp.Target(lm, pp.Power(4.0)), [[0], [1], [2], [3]], 6, seed=0)
    firsts = {round(r.steps["exponent"][0], 6) for r in res}
    assert len(firsts) > 1


def test_decoder_baselines_decode_prompts_as_rows_of_one_state():
    lm = NGramLM(vocab_size=5, order=2, seed=1)
    target = pp.Target(lm, pp.Power(2.0))
    res = pp.baselines.Plain(4).run_batch(target, [[0], [1], [2]], 4, seed=0)
    assert [r.prompt_ids for r in res] == [[0], [1], [2]]
    assert all(r.stats["forward_passes"] == res[0].stats["forward_passes"] for r in res)
    # log γ(y) of each sample equals the target's own density of it
    for r in res:
        for s, f, lt in zip(r.samples, r.finished, r.stats["log_target"]):
            y = s + [lm.eos_token_id] if f else s
            assert lt == pytest.approx(float(target.log_density(r.prompt_ids, [y], 4)[0]), abs=1e-5)


def test_potentials_see_each_rows_own_prompt():
    """A mask that depends on the prompt (allow only the prompt's first token, or EOS): in a batch
    of prompts every row is masked by its own prompt, in SMC and in MH."""
    lm = NGramLM(vocab_size=6, order=2, seed=4, concentration=1.0)
    eos = lm.eos_token_id

    def own_token(batch):
        allowed = torch.zeros((len(batch), 6), dtype=torch.bool)
        for i, p in enumerate(batch.prompts):
            allowed[i, [p[0], eos]] = True
        return allowed

    target = pp.Target(lm, pp.Power(2.0) * pp.Constraint(mask=own_token))
    prompts = [[0], [1, 0], [2], [3]]
    for res in (pp.SMC(8).run_batch(target, prompts, 3, seed=0),
                pp.MH(block_size=1, n_mcmc=1, proposal=pp.proposals.LocallyOptimal()).run_batch(
                    target, prompts, 3, chains=4, seed=0)):
        for p, r in zip(prompts, res):
            assert r.error is None and all(t == p[0] for s in r.samples for t in s), (p, r.samples)
    with pytest.raises(ValueError, match="several prompts"):
        pp.SMC(4).run_batch(pp.Target(lm, pp.Power(1.0) * pp.Constraint(mask=lambda b: b.prompt and None)),
                            [[0], [1]], 2, seed=0)


@pytest.mark.model
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_run_batch_log_probs_match_the_model_on_ragged_prompts(smollm, static):
    """SMC and the plain decoder through ``run_batch`` on three ragged prompts: every sample's
    ``log p(y|x)`` equals the model's own uncached forward on that one prompt (fp32, < 1e-4)."""
    lm = smollm
    lm.static_cache = static
    try:
        target = pp.Target(lm, pp.Power(4.0), chat=True)
        prompts = ["Name three primary colors.", "What is 2+2?", "Write a haiku about rain, please."]
        for engine in (pp.SMC(3), pp.baselines.Plain(2)):
            for r in engine.run_batch(target, prompts, 6, seed=0):
                for s, fin, lp in zip(r.samples, r.finished, r.log_p):
                    seq = s + [lm.eos_token_id] if fin else s
                    rows = lm.next_logprobs([r.prompt_ids + seq[:k] for k in range(len(seq))])
                    ref = float(sum(rows[k, t] for k, t in enumerate(seq)))
                    assert abs(ref - lp) < 1e-4, (engine, s, ref, lp)
    finally:
        lm.static_cache = False


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_partial_reorder_equals_full_reorder(static, one_thread):
    """``reorder(idx, rows=...)`` (only the rows of resampling prompts copied) leaves the state
    exactly as the full gather does: same next-token log-probs, same continuations."""
    from llmppl.benchmarking.gpu import random_lm

    lm = random_lm("tiny", "cpu", torch.float32, static_cache=static)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    gen = torch.Generator().manual_seed(0)
    a, b = lm.start(prompts, 4, max_new_tokens=6), lm.start(prompts, 4, max_new_tokens=6)
    for _ in range(2):
        tok = torch.randint(0, 500, (12,), generator=gen)
        a.step(tok, torch.ones(12, dtype=torch.bool))
        b.step(tok, torch.ones(12, dtype=torch.bool))
    idx = torch.arange(12)
    idx[4:8] = torch.tensor([5, 5, 7, 4])          # only prompt 1 resamples
    a.reorder(idx)
    b.reorder(idx, rows=torch.arange(4, 8))
    assert torch.equal(a.last_logprobs(), b.last_logprobs())
    tok = torch.randint(0, 500, (12,), generator=gen)
    assert torch.allclose(a.step(tok, torch.ones(12, dtype=torch.bool)),
                          b.step(tok, torch.ones(12, dtype=torch.bool)), atol=1e-6)
    assert torch.allclose(a.last_logprobs(), b.last_logprobs(), atol=1e-6)
    assert a.tokens == b.tokens


@settings(max_examples=50, deadline=None)
@given(anc=st.lists(st.lists(st.integers(0, 6), min_size=7, max_size=7), min_size=1, max_size=4))
def test_in_place_ancestors_keep_counts_and_survivors(anc):
    from llmppl.inference.resampling import in_place_ancestors

    a = torch.tensor(anc)
    out = in_place_ancestors(a)
    for g in range(len(anc)):
        assert sorted(out[g].tolist()) == sorted(anc[g])               # the same offspring counts
        for i in set(anc[g]):
            assert out[g, i] == i                                      # survivors stay in place


def test_overhead_benchmark_runs_on_a_tiny_random_model(tmp_path, one_thread, capsys):
    import json

    from llmppl.cli import main

    out = tmp_path / "overhead.json"
    assert main(["bench", "overhead", "--prompts", "2", "--particles", "2", "--max-new-tokens", "3",
                 "--reps", "1", "--blocks", "1,2", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["rows"] == 4 and res["host_syncs_per_step"] == 1.0
    assert res["per_step_ms"]["smc_batch"] > 0 and res["per_step_ms"]["model_loop"] > 0
    assert set(res["by_block"]) == {"1", "2"} and res["by_block"]["1"]["ms_per_token"] == res["per_step_ms"]["smc_batch"]
    for bad in ("0", "1,1", "a"):
        assert main(["bench", "overhead", "--reps", "1", "--blocks", bad]) != 0
        assert "--blocks" in capsys.readouterr().err


def test_adaptive_schedule_with_impossible_tokens_has_no_nan():
    """log p = -inf tokens (q = 0) must not turn the predicted variance into 0 · ∞ = NaN."""
    lm = pp.models.TabularLM(4, 3, lambda ctx: [0.5, 0.25, 0.25, 0.0] if len(ctx) < 3 else [0.0, 0.0, 0.0, 1.0])
    r = pp.SMC(4, schedule=pp.schedules.AdaptiveESS()).run(pp.Target(lm, pp.Power(2.0)), [0], 4, seed=0)
    assert all(math.isfinite(a) for a in r.steps["exponent"]) and math.isfinite(r.log_evidence)
