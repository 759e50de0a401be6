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


@pytest.mark.parametrize("vocab, block", [(50, 8), (48, 8), (7, 8), (1000, 1024), (3000, 1024)])
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


@pytest.mark.parametrize("vocab, allow_stop, masked", [(9, True, False), (300, False, True), (1200, False, False)])
def test_sample_tempered_draws_q_and_reports_its_log_q(vocab, allow_stop, masked):
    """``sample_tempered`` (the fused draw of ``q ∝ p^{1/τ}`` per row) against the law written
    out with ``log_softmax``: TV at the sampling noise of ``torch.multinomial``, ``log q`` of
    every drawn token equal to the reference, nothing drawn outside the mask or at a stop id."""
    from llmppl.models.block import sample_tempered

    g = torch.Generator().manual_seed(3)
    log_p = torch.log_softmax(2.0 * torch.randn(2, vocab, generator=g), -1)
    log_p[1, : vocab // 3] = -math.inf                       # exact zeros
    tau = torch.tensor([0.25, 2.0], dtype=torch.float64)     # sharpened and flattened rows
    stop = torch.tensor([vocab - 1])
    allowed = (torch.arange(vocab) % 4 != 1) if masked else None
    keep = torch.ones(vocab, dtype=torch.bool) if allowed is None else allowed.clone()
    if not allow_stop:
        keep[stop] = False
    ref = torch.log_softmax((log_p.double() / tau[:, None]).masked_fill(~keep, -math.inf), -1)
    draws = 40_000
    tok, lq = sample_tempered(log_p.repeat(draws, 1), tau.repeat(draws), stop, allow_stop, allowed,
                              torch.Generator().manual_seed(0))
    assert torch.allclose(lq, ref[torch.arange(2 * draws) % 2, tok], atol=1e-5)
    for row in range(2):
        q = ref[row].exp()
        emp = torch.bincount(tok[row::2], minlength=vocab).double() / draws
        assert emp[q == 0].sum() == 0
        mult = torch.bincount(torch.multinomial(q, draws, replacement=True, generator=g), minlength=vocab)
        tv_ref = 0.5 * (mult.double() / draws - q).abs().sum().item()
        assert 0.5 * (emp - q).abs().sum().item() < 1.3 * tv_ref + 0.003
        base = log_p[row].double().exp()            # the impostor: p itself, not p^{1/τ}
        assert 0.5 * (emp - base).abs().sum().item() > 0.05
    # a row without mass gets a draw inside the vocabulary and a log q that is not finite
    tok, lq = sample_tempered(torch.full((1, vocab), -math.inf), tau[:1], stop, allow_stop, allowed, g)
    assert 0 <= int(tok) < vocab and not bool(torch.isfinite(lq).all())
