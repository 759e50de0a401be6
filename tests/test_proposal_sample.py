"""``Proposal.sample``: the two-level inverse-CDF draw has exactly the law ``q``."""

import math

import pytest
import torch

from llmppl.models import block as proposal_module
from llmppl.inference.proposal import LOG_Q_FLOOR, Proposal


def _law(log_q: torch.Tensor, draws: int, seed: int = 0) -> torch.Tensor:
    rows = log_q.expand(draws, -1).contiguous()
    x = Proposal().sample(rows, torch.Generator().manual_seed(seed))
    return torch.bincount(x, minlength=log_q.shape[-1]).double() / draws


@pytest.mark.parametrize("vocab, block", [(50, 8), (48, 8), (7, 8), (1000, 1024)])
def test_sample_matches_q_and_never_draws_zero_mass(monkeypatch, vocab, block):
    monkeypatch.setattr(proposal_module, "SAMPLE_BLOCK", block)
    g = torch.Generator().manual_seed(1)
    logits = 2.0 * torch.randn(vocab, generator=g)
    logits[: vocab // 3] = -math.inf                       # whole blocks without mass
    logits[vocab // 2] = LOG_Q_FLOOR - 5.0 + logits.max()  # below the floor: probability 0
    log_q = torch.log_softmax(logits, -1).unsqueeze(0)
    q = log_q[0].double().exp()
    q = torch.where(log_q[0] < LOG_Q_FLOOR, torch.zeros_like(q), q)
    draws = 200_000
    emp = _law(log_q, draws)
    assert emp[q == 0].sum() == 0
    tv = 0.5 * (emp - q / q.sum()).abs().sum().item()
    # the sampling noise of a correct sampler at this many draws: torch.multinomial's TV
    ref = torch.bincount(torch.multinomial(q, draws, replacement=True, generator=g), minlength=vocab)
    tv_ref = 0.5 * (ref.double() / draws - q / q.sum()).abs().sum().item()
    assert tv < 1.3 * tv_ref + 0.003, (tv, tv_ref)
    # an impostor law (q sharpened) is far from what the sampler draws
    sharp = torch.softmax(4 * log_q[0].double(), -1)
    assert 0.5 * (emp - sharp).abs().sum().item() > 0.05


def test_sample_rows_are_independent_laws(monkeypatch):
    monkeypatch.setattr(proposal_module, "SAMPLE_BLOCK", 4)
    log_q = torch.full((2, 10), -math.inf)
    log_q[0, 9] = 0.0   # one token, in the tail block
    log_q[1, 0] = 0.0   # one token, in the first block
    x = Proposal().sample(log_q.repeat(50, 1), torch.Generator().manual_seed(0))
    assert x.view(50, 2)[:, 0].eq(9).all() and x.view(50, 2)[:, 1].eq(0).all()


def test_sampler_index_stays_in_the_vocabulary_for_a_row_without_mass():
    """A NaN / all −inf row (a broken LM) gives an index inside the vocabulary, so the engine's
    own check reports the bad log-probabilities instead of an out-of-range gather."""
    from llmppl.models.block import sample_inverse_cdf

    for V in (7, 3000):
        lq = torch.full((2, V), float("nan"))
        lq[1] = -float("inf")
        idx = sample_inverse_cdf(lq, torch.Generator().manual_seed(0))
        assert idx.shape == (2,) and int(idx.min()) >= 0 and int(idx.max()) < V
