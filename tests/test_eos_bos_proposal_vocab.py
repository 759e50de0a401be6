"""Several EOS ids, BOS on text prompts, and FromLM across padded vocabularies (issue 12, items 2, 3, 8)."""

import math

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

import llmppl as pp
from llmppl.exact import enumerate_target
from llmppl.inference.proposals import FromLM, ProposalContext
from llmppl.models import HFLM, LanguageModel


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


class TwoEOS(LanguageModel):
    """V = 5 with EOS ids 4 and 3; next-token table drawn per context from a seeded generator."""

    def __init__(self):
        super().__init__(vocab_size=5, eos_token_id=[4, 3], name="TwoEOS")

    def next_logprobs(self, sequences):
        rows = []
        for s in sequences:
            g = torch.Generator().manual_seed(hash(tuple(s)) % (2 ** 31))
            rows.append(torch.log_softmax(torch.randn(5, generator=g, dtype=torch.float64) * 1.5, 0))
        return torch.stack(rows).float()


def test_eos_ids_contract():
    lm = TwoEOS()
    assert lm.eos_token_ids == (4, 3) and lm.eos_token_id == 4
    assert lm.is_eos(torch.tensor([0, 3, 4, 2])).tolist() == [False, True, True, False]
    with pytest.raises(ValueError, match="eos_token_id"):
        LanguageModel(vocab_size=5, eos_token_id=[4, 9])
    with pytest.raises(ValueError, match="eos_token_id"):
        LanguageModel(vocab_size=5, eos_token_id=[])


def test_exact_and_log_density_end_at_any_eos():
    lm = TwoEOS()
    target = pp.Target(lm, pp.Power(1.0))
    prompt = [0, 1]
    dist = enumerate_target(target, prompt, 3)
    assert abs(dist.log_Z) < 1e-6  # alpha = 1: the LM's own distribution, summing to one
    assert not any(t in (3, 4) for s in dist.sequences for t in s)
    assert len(set(dist.sequences)) == len(dist.sequences)
    for seq in [(), (0,), (2, 1)]:
        lp = lm.next_logprobs([prompt + list(seq[:t]) for t in range(len(seq) + 1)]).double()
        body = sum(float(lp[t, seq[t]]) for t in range(len(seq)))
        end = torch.logsumexp(lp[len(seq), [3, 4]], 0)
        assert abs(math.log(dist.prob(seq)) - (body + float(end))) < 1e-6
        # Target.log_density: a sequence ended by either id is finished
        d = target.log_density(prompt, [list(seq) + [3], list(seq) + [4]], max_new_tokens=3)
        assert abs(float(torch.logsumexp(d, 0)) - math.log(dist.prob(seq))) < 1e-6
    with pytest.raises(ValueError, match="EOS before its end"):
        target.log_density(prompt, [[3, 0]], max_new_tokens=3)


def test_hflm_reads_every_eos_id():
    tok = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=32, eos_token_id=2)
    model.generation_config.eos_token_id = [2, 30]
    lm = HFLM(model, tok)
    # tokenizer EOS first, then the generation config, then the template's end-of-turn token
    assert lm.eos_token_ids == (2, 30, tok.convert_tokens_to_ids("<|im_end|>"))
    assert lm.eos_token_id == 2
    assert HFLM(model, tok, eos_token_id=[5, 2]).eos_token_ids == (5, 2)
    tok.chat_template = None  # no template: no end-of-turn token
    assert HFLM(model, tok).eos_token_ids == (2, 30)


def test_text_prompts_get_bos_and_chat_prompts_one_bos():
    tok = tiny_tokenizer(add_bos=True)
    lm = HFLM(tiny_model("llama", vocab_size=32), tok)
    bos = tok.bos_token_id
    ids = lm.encode_prompt("the cat sat")
    assert ids == [bos] + tok.encode("the cat sat", add_special_tokens=False)
    assert lm.encode_prompt("") == [bos]
    chat = lm.encode_prompt([{"role": "user", "content": "the cat"}])
    assert chat[0] == bos and chat[1] != bos and chat.count(bos) == 1
    assert lm.encode_prompt("the cat", chat=True) == chat
    assert pp.Target(lm, pp.Power(2.0)).encode("the cat sat") == ids
    # a tokenizer that adds nothing (GPT-2 style) adds nothing
    plain = HFLM(tiny_model("llama", vocab_size=32), tiny_tokenizer(add_bos=False))
    assert plain.encode_prompt("the cat sat") == tok.encode("the cat sat", add_special_tokens=False)


def _ctx(target, proposal, n=3):
    prompt = target.lm.encode_prompt("the cat")
    run = proposal.start(target, [prompt], n, 8)
    state = target.lm.start(prompt, n)
    batch = target.batch(prompt, [[] for _ in range(n)], state.logprobs())
    return ProposalContext(target=target, batch=batch, state=state, rows=torch.arange(n), run=run)


@pytest.mark.parametrize("proposal_vocab", [40, 28])
def test_from_lm_with_another_padded_vocab(proposal_vocab):
    tok = tiny_tokenizer()  # 25 tokens
    target = pp.Target(HFLM(tiny_model("llama", vocab_size=32), tok), pp.Power(2.0))
    small = HFLM(tiny_model("qwen2", seed=3, vocab_size=proposal_vocab, eos_token_id=2), tok)
    prop = FromLM(small, tau=1.0)
    ctx = _ctx(target, prop)
    log_q = prop.log_probs(ctx)
    assert log_q.shape == (3, 32)
    assert torch.allclose(torch.logsumexp(log_q, -1), torch.zeros(3, dtype=log_q.dtype), atol=1e-6)
    own = small.start(ctx.batch.prompt, 1).logprobs()[0].double()
    if proposal_vocab > 32:  # rows past the target's vocabulary dropped, the rest renormalised
        ref = torch.log_softmax(own[:32], -1)
    else:  # target ids past the proposal's vocabulary are never proposed
        ref = torch.cat([own, own.new_full((32 - proposal_vocab,), -math.inf)])
        assert torch.isinf(log_q[:, proposal_vocab:]).all()
    assert (log_q[0, :min(32, proposal_vocab)] - ref[:min(32, proposal_vocab)]).abs().max() < 1e-5
    prop.on_extend(ctx.run, torch.tensor([6, 7, 8]), torch.arange(3))  # follows the particles
    prop.on_reorder(ctx.run, torch.tensor([2, 2, 0]))
    assert ctx.run.state.tokens == [[8], [8], [6]]


def test_from_lm_refuses_another_tokenizer():
    tok = tiny_tokenizer()
    other = tiny_tokenizer(order=list(reversed(tiny_tokenizer.__globals__["WORDS"])))
    target = pp.Target(HFLM(tiny_model("llama", vocab_size=32), tok), pp.Power(2.0))
    prop = FromLM(HFLM(tiny_model("llama", vocab_size=40), other))
    with pytest.raises(ValueError, match="tokenizer differs"):
        prop.start(target, [[1, 6]], 2, 8)
