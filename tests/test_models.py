"""The batched LM interface: HFLM's KV cache against uncached recomputation."""

import math

import pytest
import torch

from llmppl.models import HFLM, LanguageModel, LanguageModelError, NGramLM

TOL = 1e-4


def _ref(lm, state, rows=None):
    return lm.next_logprobs(state.sequences(rows))


@pytest.mark.model
def test_batched_equals_one_at_a_time(smollm, chat_prompt):
    seqs = [chat_prompt, chat_prompt + [504, 9], chat_prompt + [28, 3, 7, 11, 900]]
    batched = smollm.next_logprobs(seqs)
    single = torch.cat([smollm.next_logprobs([s]) for s in seqs])
    assert (batched - single).abs().max() < TOL


@pytest.mark.model
def test_cached_equals_uncached_through_extend_reorder_truncate(smollm, chat_prompt):
    st = smollm.start(chat_prompt, 4)
    assert (st.logprobs() - _ref(smollm, st)).abs().max() < TOL
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        tok = torch.multinomial(st.logprobs().exp(), 1, generator=gen).squeeze(1)
        st.extend(tok)
    assert (st.logprobs() - _ref(smollm, st)).abs().max() < TOL
    # ragged blocks, then reorder with duplicates
    out = st.extend([[5, 6, 7], [8], [9, 10], [11, 12, 13, 14]])
    assert out.shape == (4, 4) and math.isinf(out[1, 1])
    st.reorder([3, 3, 0, 1])
    assert st.tokens[0] == st.tokens[1]
    assert (st.logprobs() - _ref(smollm, st)).abs().max() < TOL
    st.truncate([0, 2], [2, 0])
    assert (st.logprobs() - _ref(smollm, st)).abs().max() < TOL
    st.extend([[40, 41], [42]], rows=[0, 1])
    st.finish([3])
    assert (st.logprobs([0, 1, 2]) - _ref(smollm, st, [0, 1, 2])).abs().max() < TOL
    fork = st.copy()
    fork.extend([[50]], rows=[2])
    fork.reorder([2, 0, 2])
    assert (fork.logprobs() - _ref(smollm, fork)).abs().max() < TOL
    assert (st.logprobs([0, 1, 2]) - _ref(smollm, st, [0, 1, 2])).abs().max() < TOL   # the fork is independent


@pytest.mark.model
def test_extend_returns_token_logprobs(smollm, chat_prompt):
    st = smollm.start(chat_prompt, 1)
    block = [504, 9, 3]
    out = st.extend([block])[0]
    for j, tok in enumerate(block):
        ref = smollm.next_logprobs([chat_prompt + block[:j]])[0, tok]
        assert abs(float(out[j]) - float(ref)) < TOL


@pytest.mark.model
def test_prompt_errors(smollm):
    with pytest.raises(ValueError, match="context"):
        smollm.check_prompt([1] * 10, max_new_tokens=smollm.max_context)
    with pytest.raises(ValueError, match="out of range"):
        smollm.check_prompt([smollm.vocab_size + 3])
    assert smollm.encode_prompt("") == [smollm.bos_token_id]
    text = smollm.decode(smollm.encode_prompt("hello world"))
    assert text == "hello world"


class WrongShape(LanguageModel):
    def __init__(self):
        super().__init__(vocab_size=3, eos_token_id=2)

    def next_logprobs(self, sequences):
        return torch.zeros(len(sequences), 4)


class Unnormalised(LanguageModel):
    def __init__(self):
        super().__init__(vocab_size=3, eos_token_id=2)

    def next_logprobs(self, sequences):
        return torch.zeros(len(sequences), 3)


class NaNAfterTwo(LanguageModel):
    def __init__(self):
        super().__init__(vocab_size=3, eos_token_id=2)

    def next_logprobs(self, sequences):
        out = torch.log(torch.full((len(sequences), 3), 1 / 3))
        for i, s in enumerate(sequences):
            if len(s) > 2:
                out[i, 0] = float("nan")
        return out


def test_third_party_lm_validation():
    with pytest.raises(LanguageModelError, match="shape"):
        WrongShape().start([0], 2).logprobs()
    with pytest.raises(LanguageModelError, match="not normalised"):
        Unnormalised().start([0], 2).logprobs()
    st = NaNAfterTwo().start([0], 2)
    st.extend([[1, 1], [0]])
    with pytest.raises(LanguageModelError, match="NaN.*row 0"):
        st.logprobs()


def test_uncached_state_matches_direct_calls():
    lm = NGramLM(vocab_size=5, order=3, seed=1)
    st = lm.start([0], 3)
    st.extend([[1, 2], [3], [4, 0, 1]])
    st.reorder([2, 0, 0])
    st.truncate([1], [1])
    ref = lm.next_logprobs(st.sequences())
    assert torch.equal(st.logprobs(), ref)


def test_lm_constructor_errors():
    with pytest.raises(ValueError, match="eos_token_id"):
        NGramLM(vocab_size=3, eos_token_id=7)
    with pytest.raises(ValueError, match="empty prompt"):
        NGramLM().start([], 1)


def test_finish_masks_and_reorder_gathers_in_place(one_thread):
    """Finishing rows never copies the cache; a same-size reorder writes into the same buffers."""
    from tiny_models import own_logprobs, tiny_model

    model = tiny_model("llama")
    lm = HFLM(model)
    st = lm.start([[3, 4, 5], [6, 7]], 2)
    st.extend([[8], [9], [10], [11]])
    ptrs = [layer.keys.data_ptr() for layer in st.cache.layers]
    st.finish([1, 2])
    st.reorder([0, 0, 3, 3])
    assert [layer.keys.data_ptr() for layer in st.cache.layers] == ptrs
    assert st.cache.layers[0].keys.shape[0] == 4
    st.step(torch.tensor([12, 13, 14, 15]), ~st.finished)
    ref = own_logprobs(model, st.sequences())
    assert (st.logprobs() - ref).abs().max() < TOL


def test_start_rows_per_prompt_and_the_old_keyword():
    """``start(prompts, n_per_prompt)`` gives ``P * n_per_prompt`` rows (``state.n_rows``);
    ``n=`` (the old keyword) means the same, and ``state.n`` is the old name of ``n_rows``."""
    from llmppl.models import NGramLM

    lm = NGramLM(vocab_size=5, seed=0)
    new = lm.start([[1, 2], [3]], n_per_prompt=3)
    old = lm.start([[1, 2], [3]], n=3)
    assert new.n_rows == old.n_rows == new.n == 6
    assert new.group.tolist() == old.group.tolist() == [0, 0, 0, 1, 1, 1]
    assert lm.start([1, 2], 2).n_rows == 2
    with pytest.raises(ValueError, match="n_per_prompt=2 and its old name n=3"):
        lm.start([1, 2], 2, n=3)
