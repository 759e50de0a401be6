"""HFLM equals each model family's own forward (``log_softmax(model(ids).logits[:, -1])``).

Tiny random-weight models built from configs: Llama, Qwen2 (with sliding-window layers),
Gemma-2 and Gemma-3 (final logit soft-capping, alternating sliding/full layers), Granite and
GraniteMoE (``logits_scaling``), Cohere (``logit_scale``) and Cohere2 (with sliding layers),
Phi-3, Mistral, Starcoder2 and EXAONE-4 (sliding window), Qwen3, OLMo-2, GPT-2, GPT-NeoX,
Falcon and OPT.  Every sequence runs past the window.  Paths: ``next_logprobs`` (uncached), the dynamic
``HFState`` and the static ``StaticHFState``, with ragged multi-prompt batches through
extend / step / reorder / finish / truncate / copy.
"""

import inspect

import pytest
import torch
from tiny_models import FAMILIES, VOCAB, WINDOW, own_logprobs, tiny_model

from llmppl.models import HFLM
from llmppl.models.hf import HFState
from llmppl.models.static import StaticHFState

TOL = 1e-4


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _check(state, model):
    live = (~state.finished).nonzero().flatten().tolist()
    ref = own_logprobs(model, state.sequences(live))
    assert (state.logprobs(live) - ref).abs().max() < TOL
    assert (state.last_logprobs()[live] - ref).abs().max() < TOL


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return request.param, tiny_model(request.param)


@pytest.mark.parametrize("name", ["gemma2", "gemma3_text", "granite", "cohere", "cohere2", "granitemoe"])
def test_post_processing_matters(name):
    """Impostor: the output embedding alone (what HFLM did before) is not the model's forward."""
    model = tiny_model(name)
    seq = [3, 4, 5, 6, 7, 8]
    with torch.no_grad():
        hidden = model.get_decoder()(torch.tensor([seq])).last_hidden_state[0, -1]
        naive = torch.log_softmax(model.get_output_embeddings()(hidden).float(), -1)
    assert (naive - own_logprobs(model, [seq])[0]).abs().max() > 0.1


@pytest.mark.parametrize("name", ["qwen2", "gemma2", "gemma3_text", "phi3", "mistral", "cohere2",
                                  "starcoder2", "exaone4"])
def test_sliding_window_matters(name):
    """Impostor: the same weights without the window give other log-probs on these sequences."""
    seq = list(range(3, 3 + 3 * WINDOW))
    windowed = own_logprobs(tiny_model(name), [seq])[0]
    no_window = {"qwen2": dict(use_sliding_window=False, layer_types=["full_attention"] * 2),
                 "gemma2": dict(sliding_window=256), "gemma3_text": dict(sliding_window=256),
                 "cohere2": dict(sliding_window=256), "exaone4": dict(sliding_window=256)}
    full = own_logprobs(tiny_model(name, **no_window.get(name, dict(sliding_window=None))), [seq])[0]
    assert (windowed - full).abs().max() > 1e-3


def test_next_logprobs_equals_own_forward(family):
    _, model = family
    lm = HFLM(model)
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(2, VOCAB - 1, (k,), generator=gen).tolist() for k in (1, 3 * WINDOW + 2, 7, 2 * WINDOW)]
    assert (lm.next_logprobs(seqs) - own_logprobs(model, seqs)).abs().max() < TOL


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_states_equal_own_forward(family, static):
    _, model = family
    lm = HFLM(model, static_cache=static, cuda_graph=False)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16], [17, 18]]
    st = lm.start(prompts, 2, max_new_tokens=16)
    assert isinstance(st, StaticHFState if static else HFState)
    if static:
        assert st.C == 9 + 16  # the longest prompt + max_new_tokens, no doubling
    assert st.group.tolist() == [0, 0, 1, 1, 2, 2]
    _check(st, model)
    gen = torch.Generator().manual_seed(0)
    for t in range(3):  # device fast path
        before = st.last_logprobs().clone()
        tok = torch.multinomial(before.exp(), 1, generator=gen).squeeze(1)
        active = torch.ones(6, dtype=torch.bool)
        if t == 1:
            active[3] = False
        lp = st.step(tok, active)
        ref = before.gather(1, tok[:, None]).squeeze(1)
        assert (lp[active] - ref[active]).abs().max() < TOL
    assert len(st.tokens[3]) == 2 and len(st.tokens[0]) == 3
    _check(st, model)
    out = st.extend([[1, 2, 3], [4], [5, 6], [7, 8, 9, 10, 11]], rows=[0, 2, 3, 5])  # ragged blocks
    assert out.shape == (4, 5) and torch.isinf(out[1, 1:]).all()
    _check(st, model)
    st.reorder(torch.tensor([5, 5, 0, 1, 2, 3]))  # a device index (the CPU here)
    assert st.group.tolist() == [2, 2, 0, 0, 1, 1]
    _check(st, model)
    st.finish(torch.tensor([False, True, False, False, False, False]))  # a device mask
    assert st.finished.tolist() == [False, True, False, False, False, False]
    lp = st.step(torch.full((6,), 9), ~st.finished)
    assert len(st.tokens[1]) == len(st.tokens[0]) - 1
    _check(st, model)
    st.truncate([0, 2, 4], [1, 0, 2])
    st.reorder(torch.tensor([4, 1, 2, 3, 0, 5]))  # the truncated rows are re-fed lazily
    st.step(torch.full((6,), 7), ~st.finished)
    _check(st, model)
    st.truncate([1, 3], [0, 1])  # a finished row may be cut back: it is live again
    assert not st.finished[1]
    _check(st, model)
    fork = st.copy()
    fork.extend([[20, 21, 22]], rows=[2])
    _check(fork, model)
    _check(st, model)
    st.reorder([3, 0])  # fewer rows
    _check(st, model)
    st.extend([[30] * (2 * WINDOW)], rows=[1])  # well past the window
    _check(st, model)


def test_one_prompt_start_is_unchanged(family):
    _, model = family
    lm = HFLM(model)
    st = lm.start([4, 5, 6, 7], 3)
    assert st.prompt == [4, 5, 6, 7] and st.n == 3
    st.extend([[8, 9], [10], [11, 12, 13]])
    _check(st, model)


def test_unsupported_attention_raises_clearly():
    model = tiny_model("qwen2", layer_types=["full_attention", "chunked_attention"])
    with pytest.raises(ValueError, match="chunked_attention"):
        HFLM(model)


def test_verify_catches_a_forward_it_cannot_reproduce():
    """A model whose forward ignores our mask (a wrapper that rescales logits only when
    called on one sequence) fails the construction check instead of giving wrong numbers."""
    model = tiny_model("llama")
    inner = model.forward

    def odd_forward(*args, **kwargs):
        out = inner(*args, **kwargs)
        if kwargs.get("attention_mask") is not None:
            out.logits = out.logits * 0.5
        return out

    model.forward = odd_forward
    with pytest.raises(ValueError, match="does not reproduce"):
        HFLM(model)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_long_blocks_are_fed_in_column_chunks(monkeypatch, static):
    """A block longer than the logit budget allows is fed in column chunks: same numbers."""
    import llmppl.models.hf_common as hf_common

    model = tiny_model("gemma2")
    lm = HFLM(model, static_cache=static, cuda_graph=False)
    monkeypatch.setattr(hf_common, "LOGIT_BUDGET", 4 * VOCAB * 2)  # 4 rows -> 2 columns per forward
    st = lm.start([[3, 4], [5, 6, 7]], 2, max_new_tokens=12)
    before = st.forward_passes
    blocks = [list(range(10, 17)), [20], list(range(30, 40)), [40, 41, 42]]
    out = st.extend(blocks)
    assert st.forward_passes - before == 5  # ceil(10 / 2)
    seqs = st.sequences()
    for k, b in enumerate(blocks):  # each token's log-prob against the model's own forward
        prefix = seqs[k][: len(seqs[k]) - len(b)]
        ref = own_logprobs(model, [prefix + b[:j] for j in range(len(b))])
        assert (out[k, : len(b)] - ref[torch.arange(len(b)), b].double()).abs().max() < TOL
    _check(st, model)


def test_hf_start_takes_n_per_prompt_and_the_old_keyword():
    lm = HFLM(tiny_model("llama"))
    a, b = lm.start([[4, 5], [6]], n_per_prompt=2), lm.start([[4, 5], [6]], n=2)
    assert a.n_rows == b.n_rows == 4
    assert torch.equal(a.logprobs(), b.logprobs())


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_no_deprecation_warning_from_the_cache_argument(static):
    """The forward gets the KV cache under the installed transformers' own name (``cache`` on
    current releases, ``past_key_values`` on older ones): no FutureWarning on any path."""
    import warnings

    from llmppl.models.hf_common import cache_argument

    model = tiny_model("llama")
    assert cache_argument(model) in inspect.signature(type(model).forward).parameters
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        lm = HFLM(model, static_cache=static)
        st = lm.start([[4, 5, 6], [7]], 2, max_new_tokens=4)
        st.extend([[8], [9, 10], [11], [12]])
        st.step(torch.tensor([1, 2, 3, 4]))
        st.reorder([1, 1, 2, 3])
        assert torch.isfinite(st.logprobs()).all()
