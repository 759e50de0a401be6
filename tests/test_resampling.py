"""Resampling schemes: valid indices, unbiased offspring counts, variance ≤ multinomial."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmppl.inference import resampling

SCHEMES = sorted(resampling.RESAMPLERS)
weights_st = st.lists(st.floats(0.0, 10.0, allow_nan=False), min_size=1, max_size=8).filter(
    lambda w: sum(w) > 1e-3)


def offspring(scheme: str, w: torch.Tensor, n: int, reps: int, seed: int) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    fn = resampling.get_resampler(scheme)
    counts = np.zeros((reps, len(w)))
    for r in range(reps):
        idx = fn(gen, w, n)
        counts[r] = np.bincount(idx.numpy(), minlength=len(w))
    return counts


@pytest.mark.parametrize("scheme", SCHEMES)
@settings(max_examples=15, deadline=None)
@given(w=weights_st, n=st.integers(1, 12))
def test_valid_indices(scheme, w, n):
    idx = resampling.get_resampler(scheme)(torch.Generator().manual_seed(0), torch.tensor(w), n)
    assert idx.shape == (n,)
    assert idx.dtype == torch.long
    assert int(idx.min()) >= 0 and int(idx.max()) < len(w)
    assert all(w[i] > 0 for i in idx.tolist())          # zero weight is never an ancestor


@pytest.mark.parametrize("scheme", SCHEMES)
@settings(max_examples=5, deadline=None)
@given(w=weights_st, n=st.integers(1, 10))
def test_unbiased_offspring(scheme, w, n):
    wt = torch.tensor(w, dtype=torch.float64)
    p = (wt / wt.sum()).numpy()
    reps = 800
    c = offspring(scheme, wt, n, reps, seed=n)
    mean, sd = c.mean(0), c.std(0)
    se = np.maximum(sd, np.sqrt(n * p * (1 - p)) + 1e-9) / np.sqrt(reps)
    assert np.all(np.abs(mean - n * p) <= 5 * se + 1e-9), (mean, n * p)


@pytest.mark.parametrize("scheme", [s for s in SCHEMES if s != "multinomial"])
@settings(max_examples=5, deadline=None)
@given(w=weights_st, n=st.integers(2, 10))
def test_variance_at_most_multinomial(scheme, w, n):
    wt = torch.tensor(w, dtype=torch.float64)
    p = (wt / wt.sum()).numpy()
    c = offspring(scheme, wt, n, 600, seed=1)
    multinomial_var = n * p * (1 - p)                     # exact variance of multinomial counts
    assert c.var(0).sum() <= multinomial_var.sum() * 1.15 + 0.02


def test_unknown_scheme():
    with pytest.raises(ValueError, match="unknown resampling"):
        resampling.get_resampler("bogus")


@pytest.mark.parametrize("scheme", SCHEMES)
@settings(max_examples=10, deadline=None)
@given(w=st.lists(weights_st, min_size=1, max_size=3).filter(lambda g: len({len(x) for x in g}) == 1),
       n=st.integers(1, 10))
def test_from_normalised_is_the_same_draw_without_the_check(scheme, w, n):
    """The engine's entry (normalised (G, N) float64 weights, no validation, no host sync) draws
    exactly what the checked scheme draws from the same generator state."""
    fn = resampling.RESAMPLERS[scheme]
    weights = torch.tensor(w, dtype=torch.float64)
    checked = fn(torch.Generator().manual_seed(3), weights, n)
    raw = fn.from_normalised(torch.Generator().manual_seed(3), weights / weights.sum(1, keepdim=True), n)
    assert torch.equal(checked, raw)


def test_checked_schemes_still_refuse_bad_weights():
    for scheme in SCHEMES:
        with pytest.raises(ValueError, match="finite and non-negative"):
            resampling.RESAMPLERS[scheme](torch.Generator().manual_seed(0), torch.tensor([1.0, -1.0]), 2)
