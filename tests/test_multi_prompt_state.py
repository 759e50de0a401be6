"""Multi-prompt decoding states: ``lm.start(prompts, n, max_new_tokens)`` with ragged prompts.

Rows ``R = P * n``, row r -> prompt ``group[r]``.  Each state is checked against the
model's own forward (``log_softmax(model(ids).logits[:, -1])``) and against one-prompt
states, through the device fast path (``last_logprobs``, ``step``, device ``reorder``,
mask ``finish``) and the host API (``extend``, ``truncate``, ``copy``).
"""

import pytest
import torch
from tiny_models import own_logprobs

from llmppl.models import HFLM, NGramLM, UncachedState

TOL = 1e-4


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def test_generic_state_of_a_third_party_lm():
    """An LM with only ``next_logprobs`` gets the whole contract from the base class."""
    lm = NGramLM(vocab_size=6, order=3, seed=2)
    prompts = [[0], [1, 2, 3], [4, 0]]
    st = lm.start(prompts, 2)
    assert isinstance(st, UncachedState) and st.n == 6 and st.group.tolist() == [0, 0, 1, 1, 2, 2]
    assert st.prompts == prompts and st.prompt_of(3) == [1, 2, 3]
    with pytest.raises(ValueError, match="3 prompts"):
        _ = st.prompt
    ref = lambda: lm.next_logprobs(st.sequences())  # noqa: E731
    assert torch.allclose(st.last_logprobs(), ref())
    before = st.last_logprobs()
    tok = torch.tensor([1, 2, 3, 4, 0, 1])
    active = torch.tensor([True, True, False, True, True, True])
    lp = st.step(tok, active)
    assert torch.allclose(lp[active], before.gather(1, tok[:, None]).squeeze(1)[active])
    assert st.tokens == [[1], [2], [], [4], [0], [1]]
    st.reorder(torch.tensor([5, 0, 0, 3, 1, 2]))
    assert st.group.tolist() == [2, 0, 0, 1, 0, 1] and st.tokens[0] == [1]
    st.finish(torch.tensor([False, False, True, False, False, False]))
    assert st.finished.tolist() == [False, False, True, False, False, False]
    live = (~st.finished).nonzero().flatten()
    assert torch.allclose(st.last_logprobs()[live], lm.next_logprobs(st.sequences(live)))
    st.truncate([0], [0])
    assert st.sequences([0]) == [[4, 0]]


def test_prompt_errors_name_the_prompt():
    lm = NGramLM(vocab_size=6)
    lm.max_context = 8
    with pytest.raises(ValueError, match="empty prompt"):
        lm.start([], 2)
    with pytest.raises(ValueError, match="prompt 1: empty prompt"):
        lm.start([[1], [], [2]], 2)
    with pytest.raises(ValueError, match="prompt 2: .*out of range"):
        lm.start([[1], [2], [9]], 2)
    with pytest.raises(ValueError, match="prompt 1: prompt of 5 tokens \\+ max_new_tokens=4 exceeds"):
        lm.start([[1, 2], [1, 2, 3, 4, 5]], 2, max_new_tokens=4)
    assert lm.start([1, 2], 3).prompt == [1, 2]  # one prompt: as before
    assert lm.start(torch.tensor([1, 2]), 1).prompt == [1, 2]


def _check(state, model):
    live = (~state.finished).nonzero().flatten().tolist()
    ref = own_logprobs(model, state.sequences(live))
    assert (state.logprobs(live) - ref).abs().max() < TOL
    assert (state.last_logprobs()[live] - ref).abs().max() < TOL


def _one_prompt_states(lm, prompts, n, **kw):
    return [lm.start(p, n, **kw) for p in prompts]


@pytest.fixture(scope="module")
def static_smollm(smollm):
    return HFLM(smollm.model, smollm.tokenizer, name="smollm-static", static_cache=True)


@pytest.mark.model
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_default_model_ragged_prompts(smollm, static_smollm, static):
    lm = static_smollm if static else smollm
    model = smollm.model
    prompts = [smollm.encode_prompt("The sky is"),
               smollm.encode_prompt("Name three primary colors.", chat=True),
               smollm.encode_prompt("1, 2, 3,")]
    st = lm.start(prompts, 2, max_new_tokens=8)
    singles = _one_prompt_states(lm, prompts, 2, max_new_tokens=8)
    if static:
        assert st.C == max(map(len, prompts)) + 8
    _check(st, model)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        tok = torch.multinomial(st.last_logprobs().exp(), 1, generator=gen).squeeze(1)
        lp = st.step(tok, torch.ones(6, dtype=torch.bool))
        for p, s in enumerate(singles):  # the same tokens through one-prompt states
            assert (s.step(tok[2 * p: 2 * p + 2]) - lp[2 * p: 2 * p + 2]).abs().max() < TOL
    for p, s in enumerate(singles):
        assert (s.last_logprobs() - st.last_logprobs()[2 * p: 2 * p + 2]).abs().max() < TOL
        assert s.tokens == st.tokens[2 * p: 2 * p + 2]
    _check(st, model)
    st.extend([[11, 12, 13], [14], [15, 16]], rows=[0, 3, 4])
    st.reorder(torch.tensor([4, 4, 0, 1, 3, 2]))
    assert st.group.tolist() == [2, 2, 0, 0, 1, 1]
    st.finish(torch.tensor([False, False, False, True, False, False]))
    st.truncate([0, 5], [1, 0])
    _check(st, model)
    st.step(torch.full((6,), 42), ~st.finished)
    _check(st, model)
