"""The static-cache fast path (``HFLM(..., static_cache=True)``) against the dynamic ``HFState``."""

import math

import pytest
import torch

import llmppl as pp
from llmppl.models import HFLM, HFState
from llmppl.models.static import StaticHFState

TOL = 1e-4

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def static_lm(smollm):
    return HFLM(smollm.model, smollm.tokenizer, name="smollm-static", static_cache=True)


def _same(a, b):
    assert a.tokens == b.tokens
    assert torch.equal(a.finished, b.finished)
    live = (~a.finished).nonzero().flatten().tolist()
    assert (a.logprobs(live) - b.logprobs(live)).abs().max() < TOL


def _close(x, y):
    assert torch.equal(x.isinf(), y.isinf())
    assert (x - y).nan_to_num(0.0, 0.0, 0.0).abs().max() < TOL


@pytest.mark.model
def test_static_equals_dynamic_through_the_interface(smollm, static_lm, chat_prompt):
    dyn, st = smollm.start(chat_prompt, 4), static_lm.start(chat_prompt, 4, max_new_tokens=6)
    assert isinstance(st, StaticHFState) and st.C == len(chat_prompt) + 6
    _same(dyn, st)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        tok = torch.multinomial(dyn.logprobs().exp(), 1, generator=gen).squeeze(1)
        _close(dyn.extend(tok), st.extend(tok))
    blocks = [[5, 6, 7], [8], [9, 10], [11, 12, 13, 14]]  # ragged; runs past capacity -> grows
    _close(dyn.extend(blocks), st.extend(blocks))
    assert st.C > len(chat_prompt) + 6
    _same(dyn, st)
    for s in (dyn, st):
        s.reorder([3, 3, 0, 1])
    _same(dyn, st)
    for s in (dyn, st):
        s.truncate([0, 2], [2, 0])
    _same(dyn, st)
    _close(dyn.extend([[40, 41], [42]], rows=[0, 1]), st.extend([[40, 41], [42]], rows=[0, 1]))
    tok = torch.tensor([7, 8])
    _close(dyn.extend(tok, rows=[2, 3]), st.extend(tok, rows=[2, 3]))  # one-token step, 2 of 4 rows
    for s in (dyn, st):
        s.finish([3])
    _same(dyn, st)
    with pytest.raises(ValueError, match="finished"):
        st.extend([[1]], rows=[3])
    fd, fs = dyn.copy(), st.copy()
    _close(fd.extend([[50]], rows=[2]), fs.extend([[50]], rows=[2]))
    _same(fd, fs)
    _same(dyn, st)  # the fork left the original alone
    for s in (dyn, st):
        s.reorder([2, 0])  # fewer rows: buffers reallocated
    _same(dyn, st)
    ref = smollm.next_logprobs(st.sequences())
    assert (st.logprobs() - ref).abs().max() < TOL
    assert st.tokens_decoded == dyn.tokens_decoded


@pytest.mark.model
def test_no_sync_step_and_device_reorder(smollm, static_lm, chat_prompt):
    """``step`` / ``finish_where`` / tensor ``reorder`` (the fused loop) give the interface's results."""
    dyn, st = smollm.start(chat_prompt, 3), static_lm.start(chat_prompt, 3, max_new_tokens=3)
    gen = torch.Generator().manual_seed(1)
    for t in range(4):  # passes the capacity of 3 new tokens
        tok = torch.multinomial(dyn.logprobs().exp(), 1, generator=gen).squeeze(1)
        lp = st.step(tok)
        _close(dyn.extend(tok)[:, 0].float().double(), lp.double())
        if t == 2:
            idx = torch.tensor([1, 1, 0])
            dyn.reorder(idx)
            st.reorder(idx)  # state is stale here: applied on the device
    st.finish_where(torch.tensor([False, True, False]))
    dyn.finish([1])
    _same(dyn, st)
    tok = torch.tensor([3, 0, 5])
    st.step(tok)  # finished row 1 is masked
    dyn.extend(tok[[0, 2]], rows=[0, 2])
    _same(dyn, st)


@pytest.mark.model
def test_smc_same_result_static_and_dynamic(smollm, static_lm, chat_prompt):
    if not hasattr(pp, "SMC"):
        pytest.skip("pp.SMC is not on this branch yet")
    runs = []
    for lm in (smollm, static_lm):
        smc = pp.SMC(n_particles=4, proposal=pp.proposals.Tempered(0.25), ess_threshold=0.9)
        runs.append(smc.run(pp.Target(lm, pp.Power(4.0)), chat_prompt, max_new_tokens=6, seed=3))
    a, b = runs
    assert a.samples == b.samples
    assert a.steps.get("resampled") == b.steps.get("resampled")
    assert max(abs(x - y) for x, y in zip(a.log_weights, b.log_weights)) < 1e-3
    assert abs(a.log_evidence - b.log_evidence) < 1e-3


def test_gpu_benchmark_runs_on_a_tiny_random_model(tmp_path):
    from llmppl.cli import main

    out = tmp_path / "gpu.json"
    rc = main(["bench", "gpu", "--random-weights", "tiny", "--device", "cpu", "--particles", "1,3",
               "--steps", "3", "--warmup", "1", "--prompt-len", "5", "--force-resample",
               "--batch-prompts", "2", "--json", str(out)])
    assert rc == 0
    import json

    res = json.loads(out.read_text())
    assert [r["n"] for r in res["runs"]] == [1, 3]
    for r in res["runs"]:
        assert r["smc_ms"] > 0 and r["floor_ms"] > 0 and r["dynamic_bN_ms"] > 0
        # resampling at every step but the last (all rows done); the cut token is never fed
        assert r["smc_steps"] == 3 and r["smc_resampled"] == 2
        assert r["smc_tokens_decoded"] == 2 * r["n"] and math.isfinite(r["smc_log_evidence"])
        assert r["smc_host_syncs_per_step"] == 1.0
    assert res["run_batch"]["prompts"] == 2 and res["run_batch"]["speedup"] > 0


@pytest.fixture(scope="module")
def tiny_cuda():
    from llmppl.benchmarking.gpu import random_lm

    return random_lm("tiny", "cuda", torch.float32)


@pytest.mark.cuda
@cuda
def test_cuda_graph_equals_eager(tiny_cuda):
    """The captured decode/reorder graphs give the eager results (tiny random Qwen2, no files needed)."""
    prompt = list(range(3, 12))
    graphed = tiny_cuda.start(prompt, 4, max_new_tokens=6)
    eager = StaticHFState(tiny_cuda, prompt, 4, 6, cuda_graph=False)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for t in range(10):  # passes the capacity: graphs re-captured after growth
        tok = torch.multinomial(eager.last.exp(), 1, generator=gen).squeeze(1)
        assert (graphed.step(tok) - eager.step(tok)).abs().max() < 1e-4
        if t % 3 == 2:
            idx = torch.randint(0, 4, (4,), device="cuda", generator=gen)
            graphed.reorder(idx)
            eager.reorder(idx)
    assert graphed.graph_error is None and graphed._graph is not None
    assert graphed.tokens == eager.tokens
    assert (graphed.last - eager.last).abs().max() < 1e-4


@pytest.mark.cuda
@cuda
def test_cuda_static_equals_dynamic(tiny_cuda):
    prompt = list(range(3, 12))
    dyn, st = HFState(tiny_cuda, prompt, 3), tiny_cuda.start(prompt, 3, max_new_tokens=4)
    gen = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(3):
        tok = torch.multinomial(dyn.logprobs().exp(), 1, generator=gen).squeeze(1)
        _close(dyn.extend(tok), st.extend(tok))
    _close(dyn.extend([[5, 6], [7], [8, 9, 10]]), st.extend([[5, 6], [7], [8, 9, 10]]))
    for s in (dyn, st):
        s.reorder([2, 2, 0])
        s.truncate([1], [1])
        s.finish([0])
    _same(dyn, st)


def test_static_capacity_is_exact_and_masks_finish(one_thread):
    """``max_new_tokens`` fixes the capacity (longest prompt + it); a run past it grows to exactly
    what is needed; ``step(tokens, active)`` and a mask ``finish`` on a tiny model."""
    from tiny_models import own_logprobs, tiny_model

    model = tiny_model("mistral")
    lm = HFLM(model, static_cache=True)
    st = lm.start([[3, 4, 5, 6], [7]], 2, max_new_tokens=3)
    assert st.C == 4 + 3
    ptr = st._kv.layers[0].keys.data_ptr()
    for t in range(3):
        st.step(torch.full((4,), 10 + t), torch.tensor([True, t != 1, True, True]))
    st.finish(torch.tensor([False, False, True, False]))
    st.reorder(torch.tensor([3, 1, 2, 0]))
    assert st._kv.layers[0].keys.data_ptr() == ptr and st.C == 7  # in place, no reallocation
    st.extend([[20, 21]], rows=[1])  # row 1 has 2 tokens: 4 + 2 + 2 = 8 > 7
    assert st.C == 8
    live = (~st.finished).nonzero().flatten().tolist()
    assert (st.logprobs(live) - own_logprobs(model, st.sequences(live))).abs().max() < TOL
    with pytest.raises(ValueError, match="prompt 1: .*exceeds"):
        lm.start([[1], [2] * 120], 1, max_new_tokens=10)
