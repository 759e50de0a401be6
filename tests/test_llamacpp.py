"""``LlamaCppLM``: the bundled GGUF through llama.cpp, checked against HF's forward and itself."""

import math
import sys

import pytest
import torch

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install 'llmppl[llamacpp]'")

import llmppl as pp  # noqa: E402
from llmppl.models.llamacpp import LlamaCppLM, import_llama_cpp  # noqa: E402
from llmppl.models.registry import smollm2_gguf_path  # noqa: E402

CONTINUATION = "The waves roll in beneath a silver moon,\nWhispering secrets to the sandy dune."


@pytest.fixture(scope="module")
def lm():
    return LlamaCppLM(smollm2_gguf_path(), n_ctx=4096, n_seq_max=64, n_threads=1)


@pytest.fixture(scope="module")
def lm32():
    """The same GGUF with its weights re-encoded as float32 by llama.cpp (HFLM's weights exactly)."""
    return LlamaCppLM(smollm2_gguf_path(), n_ctx=4096, n_seq_max=64, n_threads=1, weights="f32")


#: max / mean KL(uncached || cached) allowed per weight type (see ``agree``)
TOL = {None: (0.1, 0.02), "f32": (1e-4, 1e-5)}


@pytest.fixture(scope="module", params=[None, "f32"], ids=["q4_1", "f32"])
def anylm(request, lm, lm32):
    return lm if request.param is None else lm32


@pytest.fixture(scope="module")
def prompt(lm):
    return lm.encode_prompt("Write a short poem about the sea.", chat=True)


def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """Row-wise KL(p || q) in nats."""
    p, q = p_log.double(), q_log.double()
    return (p.exp() * (p - q)).sum(-1)


def agree(state, lm, rows=None):
    """The cached state's next-token distributions match lm.next_logprobs on the same sequences.

    llama.cpp's kernels depend on the batch: with the Q4_1 weights (whose activations are
    quantised to 8 bits) several sequences decoded together move log-probs by ~0.01 nats
    KL, so the bound is loose there; with f32 weights they agree to ~1e-7.  A wrong
    context (a lost, duplicated or misplaced token) costs > 0.5 nats.
    """
    rows = list(range(state.n)) if rows is None else rows
    got = state.logprobs(rows)
    ref = lm.next_logprobs(state.sequences(rows))
    d = kl(ref, got)
    max_tol, mean_tol = TOL[lm.weights]
    assert float(d.max()) < max_tol, d.tolist()
    assert float(d.mean()) < mean_tol, d.tolist()
    return d


# ------------------------------------------------------------------ vs transformers
@pytest.mark.model
def test_agrees_with_hflm_on_the_same_gguf(lm, lm32, smollm, prompt):
    """Mean KL(HF || llama.cpp) of next-token distributions along a real continuation ≤ 0.02.

    HFLM runs the GGUF de-quantised to float32; llama.cpp runs it as Q4_1 (activations
    quantised to 8 bits), or re-encoded as f32, where the two agree to ~1e-6 nats.
    """
    assert smollm.encode_prompt("Write a short poem about the sea.", chat=True) == prompt
    cont = lm.tokenizer.encode(CONTINUATION)
    assert cont == smollm.tokenizer.encode(CONTINUATION, add_special_tokens=False)
    seqs = [prompt + cont[:k] for k in range(len(cont) + 1)]
    with torch.inference_mode():
        ref = smollm.model(torch.tensor([seqs[-1]])).logits[0, len(prompt) - 1:].float().log_softmax(-1)
    d = kl(ref, lm.next_logprobs(seqs))
    assert float(d.mean()) <= 0.02, d.tolist()
    # the KV-cached state, one token at a time, agrees too
    state = lm.start(prompt, 1)
    rows = [state.logprobs()[0]]
    for t in cont:
        state.extend([[t]])
        rows.append(state.logprobs()[0])
    d2 = kl(ref, torch.stack(rows))
    assert float(d2.mean()) <= 0.02, d2.tolist()
    assert (ref.argmax(-1) == torch.stack(rows).argmax(-1)).float().mean() >= 0.8
    d32 = kl(ref, lm32.next_logprobs(seqs))
    assert float(d32.max()) <= 1e-4, d32.tolist()


@pytest.mark.model
def test_tokenizer_and_special_ids_match_hf(lm, smollm):
    for text in ["Hello world!", "  spaces and\nnewlines\t", "<|im_start|>user\nhi<|im_end|>", "naïve café 🌊"]:
        ids = lm.tokenizer.encode(text)
        assert ids == smollm.tokenizer.encode(text, add_special_tokens=False), text
        assert lm.decode(ids) == smollm.decode(ids), text
    assert lm.eos_token_id == smollm.eos_token_id
    assert lm.bos_token_id == smollm.tokenizer.bos_token_id
    assert lm.vocab_size == smollm.vocab_size


def test_a_quantised_gguf_drafts_for_its_hf_model(lm, smollm):
    """The GGUF's vocabulary (token text -> id, read by llama.cpp) is the transformers tokenizer's, so
    ``FromLM`` takes the Q4 llama.cpp model as the draft of the float HF model (speculative SMC on
    CPU: the draft decodes each block natively, the target scores it with one forward)."""
    assert lm.tokenizer.get_vocab() == smollm.tokenizer.get_vocab() and len(lm.tokenizer) == len(smollm.tokenizer)
    target = pp.Target(smollm, pp.Power(2.0), chat=True)
    smc = pp.SMC(4, proposal=pp.proposals.FromLM(lm, tau=0.5), step=pp.steps.Tokens(4))
    res = smc.run(target, "Name three primary colors.", 8, seed=0)
    assert res.error is None and res.n == 4 and res.stats["proposal_tokens_decoded"] > 0
    assert all(0 < len(s) <= 8 for s in res.samples) and all(math.isfinite(x) for x in res.log_weights)


def test_gguf_metadata(lm):
    """EOS and every end-of-generation id come from the GGUF; the chat template too."""
    assert lm.eos_token_id == lm.eos_token_ids[0] == 2  # <|im_end|>
    assert 0 in lm.eos_token_ids  # <|endoftext|> also ends generation
    assert "<|im_start|>" in lm.tokenizer.chat_template
    text = lm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    # a plain text prompt gets no BOS: this GGUF says add_bos_token = false
    assert lm.encode_prompt("hi") == lm.tokenizer.encode("hi")


# ------------------------------------------------------------ cached vs uncached
def test_one_row_state_is_exactly_the_uncached_forward(lm, prompt):
    """With one row, cached decoding runs the same kernels as next_logprobs: equal results."""
    state = lm.start(prompt, 1)
    cont = lm.tokenizer.encode(CONTINUATION)[:6]
    lp = state.extend([cont[:2]])
    state.extend([cont[2:]])
    assert torch.allclose(state.logprobs(), lm.next_logprobs([prompt + cont]), atol=1e-5)
    ref = lm.next_logprobs([prompt, prompt + cont[:1]])
    assert lp.shape == (1, 2) and lp.dtype == torch.float64
    assert torch.allclose(lp[0], torch.stack([ref[0, cont[0]], ref[1, cont[1]]]).double(), atol=1e-5)


def test_extend_reorder_finish_truncate(anylm, prompt):
    lm = anylm
    state = lm.start(prompt, 4, max_new_tokens=16)
    assert state.n == 4 and state.prompt == prompt
    agree(state, lm)
    toks = lm.tokenizer.encode(" The sea is wide and the sky is grey")
    before = state.logprobs()
    out = state.extend([[toks[0]], [toks[1]], [toks[2], toks[3]], [toks[4]]])
    assert out.shape == (4, 2) and out[0, 1] == -torch.inf and out[2, 1] > -torch.inf
    assert torch.allclose(out[:, 0], before[torch.arange(4), torch.tensor(toks[:3] + [toks[4]])].double())
    agree(state, lm)
    state.extend(torch.tensor(toks[5:9]))
    agree(state, lm)
    state.reorder([2, 2, 0, 3, 2])  # resampling may change the row count
    assert state.n == 5 and state.tokens[0] == state.tokens[1] == state.tokens[4]
    state.extend([[toks[1]], [toks[2]], [toks[3]], [toks[4]], [toks[5]]])
    agree(state, lm)
    assert state.tokens[0] != state.tokens[1]  # copies diverged: their sequences are distinct
    state.finish([1, 3])
    with pytest.raises(ValueError, match="finished"):
        state.extend([[toks[0]]], [1])
    agree(state, lm, [0, 2, 4])
    state.reorder([0, 1, 4, 4])  # a finished row stays finished when copied
    assert state.finished.tolist() == [False, True, False, False]
    state.truncate([0, 2, 3], [1, 0, 2])
    assert [len(state.tokens[i]) for i in (0, 2, 3)] == [1, 0, 2]
    agree(state, lm, [0, 2, 3])
    state.truncate([1], [1])  # a finished (freed) row is rebuilt when truncated
    assert not state.finished[1]
    agree(state, lm)
    state.extend([[toks[6]]] * 4)
    agree(state, lm)


def test_step_and_last_logprobs_match_extend(anylm, prompt):
    lm = anylm
    a = lm.start(prompt, 3)
    b = a.copy()
    tok = torch.tensor([11, 22, 33])
    act = torch.tensor([True, False, True])
    last = a.last_logprobs()
    assert last.shape == (3, lm.vocab_size) and last.dtype == torch.float32
    out = a.step(tok, act)
    assert out.shape == (3,)
    assert torch.allclose(out[act], last[[0, 2], [11, 33]])
    ref = b.extend([[11], [33]], [0, 2])
    assert torch.allclose(out[act].double(), ref[:, 0])
    assert a.tokens == [[11], [], [33]] == b.tokens
    assert torch.allclose(a.last_logprobs(), b.logprobs(), atol=1e-4)
    a.reorder(torch.tensor([2, 2, 1]))
    a.finish(torch.tensor([False, True, False]))
    assert a.finished.tolist() == [False, True, False]
    a.step(torch.tensor([5, 6, 7]), torch.tensor([True, False, True]))
    assert a.tokens == [[33, 5], [33], [7]]
    agree(a, lm, [0, 2])
    assert b.tokens == [[11], [], [33]]  # the copy is independent
    agree(b, lm)


def test_multi_prompt_ragged_state(anylm, prompt):
    lm = anylm
    p2 = lm.encode_prompt("Tell me a joke.", chat=False)
    p3 = lm.encode_prompt("Name three primary colors.", chat=True)
    state = lm.start([prompt, p2, p3], n=2, max_new_tokens=8)
    assert state.n == 6 and state.group.tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="3 prompts"):
        state.prompt
    assert state.prompt_of(3) == p2 and state.sequences([4])[0] == p3
    agree(state, lm)
    state.extend([[100 + i] for i in range(6)])
    state.reorder([1, 1, 3, 2, 5, 5])  # gather within prompts
    assert state.group.tolist() == [0, 0, 1, 1, 2, 2]
    state.extend([[200 + i] for i in range(6)])
    assert state.sequences([2])[0] == p2 + [103, 202]
    agree(state, lm)


def test_sequence_ids_are_returned(lm, prompt):
    free = lm.free_sequences
    state = lm.start(prompt, 8)
    fork = state.copy()
    fork.reorder([0] * 12)
    assert lm.free_sequences == free - 20
    del state, fork
    assert lm.free_sequences == free


# ----------------------------------------------------------------------- engines
def test_smc_and_mh_are_reproducible(lm):
    target = pp.Target(lm, pp.Power(4.0), chat=True)
    smc = pp.SMC(4)
    a = smc.run(target, "Name three primary colors.", 8, seed=3)
    b = smc.run(target, "Name three primary colors.", 8, seed=3)
    assert a.samples == b.samples and a.log_weights == b.log_weights and a.n == 4
    assert all(len(s) <= 8 for s in a.samples) and a.texts is not None
    mh = pp.MH(block_size=4, n_mcmc=1)
    c = mh.run(target, "Name three primary colors.", 8, chains=2, seed=5)
    d = mh.run(target, "Name three primary colors.", 8, chains=2, seed=5)
    assert c.samples == d.samples and c.log_p == d.log_p
    assert lm.free_sequences == lm.n_seq_max  # every state gave its sequences back


# --------------------------------------------------------------------- bad input
def test_missing_and_corrupt_gguf(tmp_path):
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        LlamaCppLM(tmp_path / "missing.gguf")
    bad = tmp_path / "notgguf.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ValueError, match="not a GGUF file"):
        LlamaCppLM(bad)
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(smollm2_gguf_path().read_bytes()[:100_000])  # truncated
    with pytest.raises(ValueError, match="could not load"):
        LlamaCppLM(corrupt)


def test_context_and_sequence_limits(prompt):
    small = LlamaCppLM(smollm2_gguf_path(), n_ctx=256, n_seq_max=4, n_threads=1)
    assert small.n_ctx == 256 and small.n_seq_max == 4
    with pytest.raises(ValueError, match=r"n_ctx=256"):
        small.start(prompt, 4, max_new_tokens=100)  # 38 + 4·100 cells > 256
    with pytest.raises(ValueError, match=r"prompt 1: .*n_ctx=256"):
        small.start([prompt, list(range(5, 305))], 1)
    with pytest.raises(ValueError, match=r"n_seq_max=4"):
        small.start(prompt, 5)
    with pytest.raises(ValueError, match=r"n_seq_max=4"):
        small.start([prompt, prompt, prompt], 2)
    state = small.start(prompt, 4)
    with pytest.raises(ValueError, match=r"n_seq_max=4"):
        state.copy()
    # without max_new_tokens nothing is reserved: a full cache is an error naming n_ctx
    del state
    state = small.start(prompt, 4)
    with pytest.raises(RuntimeError, match=r"n_ctx=256"):
        for _ in range(100):
            state.extend(torch.full((4,), 42))
    state.truncate([0, 1, 2], [1, 1, 1])  # the state stays usable after the error
    state.finish([3])  # next_logprobs needs a free (scratch) sequence id
    agree(state, small, [0, 1, 2])
    with pytest.raises(ValueError, match="n_seq_max must be in"):
        LlamaCppLM(smollm2_gguf_path(), n_seq_max=1000)


def test_extra_not_installed_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # what Python does for a missing package
    with pytest.raises(ImportError, match=r"pip install 'llmppl\[llamacpp\]'"):
        import_llama_cpp()


def test_load_model_backend(tmp_path):
    m = pp.models.load_model(backend="llamacpp")
    assert isinstance(m, LlamaCppLM) and m.name == "smollm2-135m-instruct"
    m2 = pp.models.load_model(str(smollm2_gguf_path()), backend="llamacpp")
    assert isinstance(m2, LlamaCppLM)
    with pytest.raises(ValueError, match=r"\.gguf"):
        pp.models.load_model("some/hub-id", backend="llamacpp")
    with pytest.raises(FileNotFoundError):
        pp.models.load_model(str(tmp_path / "x.gguf"), backend="llamacpp")
    with pytest.raises(ValueError, match="dtype"):
        pp.models.load_model(backend="llamacpp", dtype="int4")
    m3 = pp.models.load_model(backend="llamacpp", dtype="float32")  # weights re-encoded once, cached
    assert m3.weights == "f32" and m3.model_file != m3.path and m3.model_file.exists()
    with pytest.raises(ValueError, match="weights must be one of"):
        LlamaCppLM(smollm2_gguf_path(), weights="q2")


def test_llama_cpp_log_is_silent(capfd):
    m = LlamaCppLM(smollm2_gguf_path(), n_ctx=256, n_seq_max=2, n_threads=1)
    m.next_logprobs([[1, 2, 3]])
    err = capfd.readouterr().err
    assert "llama_model_loader" not in err and "llama_context" not in err and err.strip() == ""


def test_cli_sample_and_latency_on_llamacpp(capsys, tmp_path):
    from llmppl.cli import main

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # LlamaCppLM's default n_threads
    try:
        assert main(["sample", "--backend", "llamacpp", "--prompt", "Name three primary colors.",
                     "--particles", "2", "--max-new-tokens", "6", "--quiet"]) == 0
        assert "smc" in capsys.readouterr().err
        out = tmp_path / "lat.json"
        assert main(["bench", "latency", "--backend", "llamacpp", "--model", str(smollm2_gguf_path()),
                     "--prompts", "2", "--particles", "2", "--max-new-tokens", "3", "--reps", "1",
                     "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(n)
    import json

    res = json.loads(out.read_text())
    assert res["backend"] == "llamacpp" and res["per_step_ms"]["smc_batch"] > 0 and res["rows"] == 4
    assert res["smc_step"] == "Tokens(1)" and "--block" not in res["command"]   # the backend's native block
