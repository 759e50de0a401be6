"""Rewards, verifiers and constraints: real models offline, bad input fails loudly."""


import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import llmppl as pp
from llmppl.models import NGramLM
from llmppl.targets import Completion, RewardError
from llmppl.targets import rewards as R

LM = NGramLM(vocab_size=4, order=2, seed=3)
PROMPT = [0]


def C(text: str, finished: bool = True) -> Completion:
    return Completion([], text, finished)


# --------------------------------------------------------------- verifiers
def test_answer_is_integer():
    texts = ["The answer is 42.", "about 3.5", "no number", "1,000 apples", "x = -7", "2.0"]
    assert R.answer_is_integer([C(t) for t in texts]) == [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]


@given(st.integers(-10**6, 10**6), st.integers(-10**6, 10**6))
def test_answer_checker_reads_the_last_number(n, other):
    check = R.AnswerChecker(n)
    assert check([C(f"first {other}, so the answer is {n}.")]) == [1.0]
    assert check([C(f"the answer is {n}, not {other}")]) == [1.0 if other == n else 0.0]


def test_answer_checker_marker_and_regex_reward():
    check = R.AnswerChecker(12, marker="Answer:", correct=2.0, wrong=-1.0)
    texts = ["3*4 = 12", "3*4 = 12\nAnswer: 12\n\nQ: 5 + 6?\nAnswer: 11", "Answer: 13"]
    assert check([C(t) for t in texts]) == [-1.0, 2.0, -1.0]
    r = R.regex_reward(r"\d+", fullmatch=True)
    assert r([C("123"), C("12a"), C("")]) == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="expected"):
        R.AnswerChecker("twelve")


def test_arithmetic_prm_counts_wrong_equations():
    text = "3 + 4 = 7\n5 x 6 = 31\n10 / 4 = 2.5\n8 - 9 = 1"
    assert R.wrong_equations(text) == 2
    assert R.arithmetic_prm([C(text, False), C("no maths yet", False)]) == [-2.0, 0.0]


def test_verifiers_need_text():
    with pytest.raises(RewardError, match="needs completion texts"):
        pp.Target(LM, pp.RewardTilt(R.answer_is_integer, 1.0)).log_density(PROMPT, [[1, 3]])


# ------------------------------------------------------- embedding reward
@pytest.fixture(scope="module")
def minilm():
    return R.load_minilm()


def test_embedding_similarity_offline(minilm):
    sim = R.EmbeddingSimilarity(["The sky is blue.", "Grass is green."], model=minilm)
    same, near, far = sim([C("The sky is blue."), C("The colour of the sky is blue"), C("I like pizza")])
    assert same == pytest.approx(1.0, abs=1e-5)
    assert near > 0.7 > 0.3 > far
    mean = R.EmbeddingSimilarity(["The sky is blue.", "Grass is green."], model=minilm, aggregate="mean")
    assert mean([C("The sky is blue.")])[0] < same
    # batching and the cache do not change values
    one = R.EmbeddingSimilarity("The sky is blue.", model=minilm, batch_size=1)
    texts = [C("The sky is blue."), C("The colour of the sky is blue"), C("I like pizza")] * 2
    fresh = R.EmbeddingSimilarity("The sky is blue.", model=minilm)
    assert one(texts) == pytest.approx([fresh([c])[0] for c in texts[:3]] * 2, abs=1e-5)
    assert len(one._cache.data) == 3
    with pytest.raises(ValueError, match="aggregate"):
        R.EmbeddingSimilarity("x", model=minilm, aggregate="median")
    with pytest.raises(ValueError, match="references"):
        R.EmbeddingSimilarity([], model=minilm)


@pytest.mark.model
def test_embedding_reward_tilts_the_target(smollm, minilm):
    sim = R.EmbeddingSimilarity("Red, yellow and blue.", model=minilm)
    target = pp.Target(smollm, pp.RewardTilt(sim, beta=0.25))
    tokens = [smollm.tokenizer.encode(t, add_special_tokens=False) for t in (" red", " a car")]
    batch = target.batch(smollm.encode_prompt("Colours:"), tokens, None, [True, True], [False, False])
    got = target.log_complete(batch).tolist()
    assert got == pytest.approx([sim([C(" red")])[0] / 0.25, sim([C(" a car")])[0] / 0.25], abs=1e-5)
    assert got[0] > got[1]


# ------------------------------------------------------------- LM judge
@pytest.mark.model
def test_lm_judge_matches_the_lm(smollm):
    template = "Question: is this text about food?\nText: {completion}\nAnswer:"
    texts = ["I ate a pizza.", "The train is late."]
    judge = R.LMJudge(smollm, template, normalize=False)
    raw = judge([C(t) for t in texts])
    yes, no = (smollm.tokenizer.encode(a, add_special_tokens=False) for a in (" Yes", " No"))
    assert len(yes) == len(no) == 1
    lp = smollm.next_logprobs([judge.prompt_ids(t) for t in texts]).double()
    assert raw == pytest.approx(lp[:, yes[0]].tolist(), abs=1e-4)
    # normalised against "No": log P(yes | yes or no)
    normed = R.LMJudge(smollm, template)([C(t) for t in texts])
    assert all(v < 0 for v in normed)
    assert normed == pytest.approx(torch.log_softmax(lp[:, [yes[0], no[0]]], 1)[:, 0].tolist(), abs=1e-4)
    # a multi-token answer: log-probs add along the answer
    ids = smollm.tokenizer.encode(" Yes indeed", add_special_tokens=False)
    assert len(ids) == 2
    multi = R.LMJudge(smollm, template, yes=" Yes indeed", no=None, normalize=False)
    p = judge.prompt_ids(texts[0])
    two = smollm.next_logprobs([p, p + ids[:1]]).double()
    assert multi([C(texts[0])])[0] == pytest.approx(float(two[0, ids[0]] + two[1, ids[1]]), abs=1e-4)
    with pytest.raises(ValueError, match="completion"):
        R.LMJudge(smollm, "no placeholder")
    with pytest.raises(ValueError, match="tokenizer"):
        R.LMJudge(LM, template)


# ------------------------------------------------------------ bad input
@pytest.mark.parametrize("beta", [0, -0.5, float("nan"), float("inf")])
def test_beta_must_be_positive(beta):
    with pytest.raises(ValueError, match="beta"):
        pp.RewardTilt(R.answer_is_integer, beta)


def ids_reward(values):
    return lambda cs: [values(c) for c in cs]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_rewards_name_the_completion(bad):
    reward = ids_reward(lambda c: bad if c.token_ids == [2, 1] else 0.0)
    target = pp.Target(LM, pp.RewardTilt(reward, 1.0))
    with pytest.raises(RewardError, match=r"reward returned .* for completion \d+ \(\[2, 1\]\)"):
        pp.exact.enumerate_target(target, PROMPT, 3)


def test_wrong_number_of_values_and_raising_rewards():
    target = pp.Target(LM, pp.RewardTilt(lambda cs: [0.0] * (len(cs) + 1), 1.0))
    with pytest.raises(RewardError, match="values for"):
        pp.exact.enumerate_target(target, PROMPT, 2)

    def prm(cs):
        raise RuntimeError("PRM server unreachable")

    target = pp.Target(LM, pp.RewardTilt(ids_reward(lambda c: 0.0), 1.0, process_reward=prm))
    batch = target.batch(PROMPT, [[1], [2]])
    with pytest.raises(RewardError, match="process_reward raised RuntimeError: PRM server unreachable"):
        target.log_twist(batch)


# ------------------------------------------------------------ constraints
def test_constraint_predicate_and_masks():
    target = pp.Target(LM, pp.Constraint(predicate=lambda c: 2 not in c.token_ids))
    exact = pp.exact.enumerate_target(target, PROMPT, 3)
    assert all(2 not in s for s in exact.sequences)
    masked = pp.exact.enumerate_target(pp.Target(LM, pp.Constraint(mask={0, 1, 3})), PROMPT, 3)
    assert exact.as_dict() == pytest.approx(masked.as_dict())
    assert masked.as_dict() == pytest.approx(
        pp.exact.enumerate_target(pp.Target(LM, pp.Constraint(mask=torch.tensor([1, 1, 0, 1]).bool())),
                                  PROMPT, 3).as_dict())


def test_constraint_errors():
    with pytest.raises(ValueError, match="allows no token"):
        pp.Constraint(mask=torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="allows no token"):
        pp.Constraint(mask=[])
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        pp.exact.enumerate_target(pp.Target(LM, pp.Constraint(mask=[0, 7])), PROMPT, 2)
    with pytest.raises(ValueError, match="exactly one"):
        pp.Constraint()
    never = pp.Target(LM, pp.Constraint(predicate=lambda c: False))
    with pytest.raises(ValueError, match="zero mass"):
        pp.exact.enumerate_target(never, PROMPT, 2)

    def broken(c):
        raise KeyError("oops")

    with pytest.raises(RewardError, match=r"constraint broken raised KeyError.*completion 0"):
        pp.exact.enumerate_target(pp.Target(LM, pp.Constraint(broken)), PROMPT, 2)


@pytest.mark.model
def test_digit_and_regex_masks(smollm):
    digits = pp.targets.digits_mask(smollm)
    texts = pp.targets.token_texts(smollm)
    allowed = [texts[i] for i in digits.nonzero().flatten().tolist() if i != smollm.eos_token_id]
    assert allowed and all(t.strip().isdigit() for t in allowed)
    assert bool(digits[smollm.eos_token_id])
    words = pp.targets.regex_mask(smollm, r" [a-z]+", allow_eos=False)
    assert not bool(words[smollm.eos_token_id]) and int(words.sum()) > 1000
    # sampling under the digit mask gives digits only
    target = pp.Target(smollm, pp.Constraint(mask=digits))
    prompt = smollm.encode_prompt("2 + 2 =")
    state = smollm.start(prompt, 1)
    for _ in range(3):
        batch = target.batch(prompt, state.tokens, state.logprobs())
        inc = target.log_next(batch)
        tok = int(inc[0].argmax())
        assert digits[tok]
        state.extend(torch.tensor([tok]))
