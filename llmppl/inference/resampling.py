"""Resampling schemes: ``(generator, weights, n) -> ancestor indices``.

``weights`` is ``(N,)`` or a batch ``(G, N)`` of independent groups (one prompt each);
the result is ``(n,)`` or ``(G, n)`` indices into each group's own particles, so groups
never exchange particles.  Every scheme is unbiased, ``E[#offspring_i] = n · w_i`` for
the normalised weights ``w`` of its group; stratified, systematic and residual have
lower offspring variance than multinomial.  All are pure tensor functions that run on
the weights' device (no host round-trip).  Schemes are looked up by name in
``RESAMPLERS`` (register new ones with ``register``).

A registered scheme checks its input (finite, non-negative, a positive sum per group: a
host sync) and normalises it; its ``from_normalised(generator, w, n)`` is the same draw
on weights already normalised per group, ``(G, N)`` float64, with no check and no sync,
which is what the engine calls once a step.

:func:`draw_ancestors_within` resamples within classes of a group's particles (segment steps:
particles at the same position), each class keeping its total weight.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from ..models.streams import torch_generator

Resampler = Callable[[torch.Generator, torch.Tensor, int], torch.Tensor]
RESAMPLERS: dict[str, Resampler] = {}


def register(name: str) -> Callable[[Resampler], Resampler]:
    """Register ``core(generator, w, n) -> (G, n)`` (``w``: ``(G, N)`` float64, normalised per
    group) as the scheme ``name``; the registered function takes any ``(N,)`` / ``(G, N)``
    weights, checks and normalises them, and keeps ``core`` as ``.from_normalised``."""
    def deco(core: Resampler) -> Resampler:
        @functools.wraps(core)
        def scheme(generator: torch.Generator, weights: torch.Tensor, n: int) -> torch.Tensor:
            idx = core(generator, _normalised(weights), n)
            return idx[0] if torch.as_tensor(weights).dim() == 1 else idx
        scheme.from_normalised = core   # type: ignore[attr-defined]
        RESAMPLERS[name] = scheme
        return scheme
    return deco


def _normalised(weights: torch.Tensor) -> torch.Tensor:
    """``(G, N)`` float64 weights normalised per group (a 1-D input is one group)."""
    w = torch.as_tensor(weights).to(torch.float64)
    if w.dim() == 1:
        w = w[None]
    if w.dim() != 2 or w.shape[1] == 0:
        raise ValueError(f"weights must be (N,) or (G, N) with N >= 1, got shape {tuple(w.shape)}")
    total = w.sum(1, keepdim=True)
    if bool(((w < 0) | ~torch.isfinite(w)).any() | (total <= 0).any()):
        raise ValueError("weights must be finite and non-negative, with a positive sum in every group")
    return w / total


def _uniform(generator: torch.Generator, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Uniforms in [0, 1) on the generator's device, moved to ``like``'s device."""
    gen = torch_generator(generator)
    dev = gen.device if gen is not None else like.device
    return torch.rand(shape, generator=gen, dtype=torch.float64, device=dev).to(like.device)


def _inverse_cdf(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per group, indices ``i`` with ``C_{i-1} <= u < C_i`` for points ``u`` (G, n) in [0, 1)
    (any order)."""
    cdf = torch.cumsum(w, 1)
    cdf[:, -1] = 1.0
    return torch.searchsorted(cdf, u.contiguous(), right=True).clamp_(max=w.shape[1] - 1)


@register("multinomial")
def multinomial(generator: torch.Generator, w: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` i.i.d. draws from Categorical(w) per group."""
    u = torch.sort(_uniform(generator, (w.shape[0], n), w), dim=1).values
    return _inverse_cdf(w, u)


@register("stratified")
def stratified(generator: torch.Generator, w: torch.Tensor, n: int) -> torch.Tensor:
    """One uniform per stratum: ``u_j = (j + U_j)/n``, ``U_j ~ U[0,1)`` independent."""
    j = torch.arange(n, dtype=torch.float64, device=w.device)
    u = (j + _uniform(generator, (w.shape[0], n), w)) / n
    return _inverse_cdf(w, u)


@register("systematic")
def systematic(generator: torch.Generator, w: torch.Tensor, n: int) -> torch.Tensor:
    """One uniform per group: ``u_j = (j + U)/n``, ``U ~ U[0,1)``."""
    j = torch.arange(n, dtype=torch.float64, device=w.device)
    u = (j + _uniform(generator, (w.shape[0], 1), w)) / n
    return _inverse_cdf(w, u)


@register("residual")
def residual(generator: torch.Generator, w: torch.Tensor, n: int) -> torch.Tensor:
    """``⌊n w_i⌋`` deterministic copies, the remaining ``n − Σ⌊n w_i⌋`` by multinomial on
    the residuals ``n w_i − ⌊n w_i⌋`` (per group)."""
    counts = torch.floor(n * w)
    fixed = counts.sum(1, keepdim=True)                       # (G, 1) deterministic offspring
    slot = torch.arange(n, dtype=torch.float64, device=w.device)[None].expand(w.shape[0], -1)
    # slot j < fixed: the j-th deterministic copy, i.e. the first i with cumsum(counts)_i > j
    det = torch.searchsorted(torch.cumsum(counts, 1), slot.contiguous(), right=True)
    resid = n * w - counts
    has_rest = resid.sum(1, keepdim=True) > 0
    resid = torch.where(has_rest, resid, torch.ones_like(resid))  # groups with no remainder: unused
    # unsorted uniforms: the slots j ≥ Σ⌊n w⌋ then hold i.i.d. draws from the residuals
    rnd = _inverse_cdf(resid / resid.sum(1, keepdim=True), _uniform(generator, (w.shape[0], n), w))
    idx = torch.where(slot < fixed, det.clamp(max=w.shape[1] - 1), rnd)
    return idx


def get_resampler(scheme: str | Resampler) -> Resampler:
    """A resampler by name (or pass a callable through)."""
    if callable(scheme):
        return scheme
    try:
        return RESAMPLERS[scheme]
    except KeyError:
        raise ValueError(
            f"unknown resampling scheme {scheme!r}; choose from {sorted(RESAMPLERS)}"
        ) from None


def log_ess(log_weights: torch.Tensor, log_sum: torch.Tensor | None = None) -> torch.Tensor:
    """``log ESS = 2 log Σ w − log Σ w²`` along the last dimension (−inf for an all-zero group);
    ``log_sum``: ``log Σ w`` when the caller has it already."""
    lw = torch.as_tensor(log_weights).to(torch.float64)
    lse = torch.logsumexp(lw, -1) if log_sum is None else log_sum
    return 2 * lse - torch.logsumexp(2 * lw, -1)


def ess(log_weights: torch.Tensor) -> float:
    """Effective sample size ``(Σ w)² / Σ w²`` from log-weights (one group)."""
    return float(torch.exp(log_ess(log_weights)))


def in_place_ancestors(ancestors: torch.Tensor) -> torch.Tensor:
    """The same offspring counts, arranged so that every surviving particle keeps its own slot.

    ``ancestors`` ``(G, N)`` (indices within each group) fixes the offspring counts ``c_i``;
    particles are exchangeable, so any arrangement of that multiset is the same resampling.
    Here slot ``i`` keeps particle ``i`` when ``c_i > 0``, and the slots of the particles that
    died receive the ``c_i − 1`` extra copies, in order: a cache reorder then copies only
    into the dead slots.  Fixed shapes, no host sync.
    """
    G, N = ancestors.shape
    counts = torch.zeros((G, N), dtype=torch.long, device=ancestors.device)
    counts.scatter_add_(1, ancestors, torch.ones_like(ancestors))
    survived = counts > 0
    extra_cum = torch.cumsum((counts - 1).clamp_min(0), 1)         # extra copies up to particle i
    dead_rank = torch.cumsum((~survived).long(), 1) - 1             # j-th dead slot of its group
    donor = torch.searchsorted(extra_cum, dead_rank.clamp_min(0), right=True).clamp_(max=N - 1)
    own = torch.arange(N, device=ancestors.device).expand(G, N)
    return torch.where(survived, own, donor)


def needs_resampling(ess: torch.Tensor, live: torch.Tensor, threshold: float, n: int) -> torch.Tensor:
    """``(G,)`` bool: the groups with live particles whose ``ESS < κ·N`` (``κ = threshold``;
    every live group for ``κ ≥ 1``, none for ``κ ≤ 0``)."""
    if threshold >= 1.0:
        return live
    if threshold <= 0.0:
        return torch.zeros_like(live)
    return live & (ess < threshold * n)


def _draw(resampler: Resampler, generator: torch.Generator, lw: torch.Tensor, n: int) -> torch.Tensor:
    """``(G, n)`` indices drawn by ``resampler`` from ``softmax(lw)`` per group."""
    draw = getattr(resampler, "from_normalised", None)
    if draw is not None:
        return draw(generator, torch.softmax(lw, 1), n)
    return resampler(generator, torch.exp(lw - lw.amax(1, keepdim=True)).nan_to_num(0.0), n)


def class_log_means(log_w: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """``(G, N)``: for every particle, the log of its class's mean weight
    ``log(Σ_{j ∈ c(i)} w_j / N_c)`` (classes: equal labels within a group; −inf for a class of
    zero weight)."""
    G, N = log_w.shape
    _, idx = torch.unique(classes, return_inverse=True)
    K = int(idx.max()) + 1 if idx.numel() else 1
    top = log_w.amax(1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    mass = torch.zeros((G, K), dtype=torch.float64, device=log_w.device).scatter_add_(
        1, idx, torch.exp(log_w.double() - top))
    count = torch.zeros((G, K), dtype=torch.float64, device=log_w.device).scatter_add_(
        1, idx, torch.ones_like(log_w, dtype=torch.float64))
    means = torch.log(mass) + top - torch.log(count.clamp_min(1.0))
    return means.gather(1, idx)


def within_class_ess(log_w: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """``(G,)``: the ESS of the weights relative to their class's mean, ``(Σλ)² / Σλ²`` with
    ``λ_i = w_i / m_c(i)`` — what resampling within the classes can raise (``N`` when every class's
    weights are equal, however unequal the classes; the ordinary ESS for one class)."""
    means = class_log_means(log_w, classes)
    lam = torch.where(torch.isfinite(log_w), log_w - means, torch.full_like(log_w, -math.inf))
    return torch.exp(log_ess(lam))


def draw_ancestors_within(resampler: Resampler, generator: torch.Generator, log_w: torch.Tensor,
                          need: torch.Tensor, classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Resampling *within classes*: ``(G, N)`` ancestors and the ``(G, N)`` log-weights after it.

    ``classes`` ``(G, N)`` labels particles; within a group, the ``N_c`` particles of a class
    compete only with each other: ``resampler`` draws ``N_c`` of them from their normalised
    weights, and every offspring carries the class's mean weight ``m_c``, so each class keeps
    its total weight (``Σ_j w'_j = Σ_i w_i``).  For any unbiased scheme
    ``E[Σ_j w'_j f(x'_j)] = Σ_c N_c · m_c · Σ_{i∈c} (w_i / W_c) f(x_i) = Σ_i w_i f(x_i)``, so ``Ẑ``
    and the target are unchanged.  A class of one keeps its particle.  One class per group is
    ordinary resampling (all weights after it equal the mean weight).  Where not ``need``: the
    identity and ``log_w`` unchanged.  One host sync (the class sizes); a draw per distinct
    class size."""
    G, N = log_w.shape
    dev = log_w.device
    ident = torch.arange(N, device=dev).expand(G, N)
    means = class_log_means(log_w, classes)
    _, idx = torch.unique(classes, return_inverse=True)
    K = int(idx.max()) + 1 if idx.numel() else 1
    key = (idx + torch.arange(G, device=dev)[:, None] * K).reshape(-1)          # (R,) (group, class)
    size = torch.bincount(key, minlength=G * K)
    order = torch.argsort(key, stable=True)                                    # each class contiguous
    first = torch.cumsum(size, 0) - size
    flat_lw = log_w.reshape(-1)
    anc = ident.reshape(-1).clone()
    sizes, needed = size.tolist(), need.tolist()
    for s in sorted({n for n in sizes if n > 1}):
        chosen = [k for k, n in enumerate(sizes) if n == s and needed[k // K]]
        if not chosen:
            continue
        members = order[first[torch.tensor(chosen, device=dev)][:, None] + torch.arange(s, device=dev)]  # (C, s)
        picks = _draw(resampler, generator, flat_lw[members], s).to(dev)
        anc[members.reshape(-1)] = (members.gather(1, picks) % N).reshape(-1)
    anc = torch.where(need[:, None], in_place_ancestors(anc.view(G, N)), ident)
    return anc, torch.where(need[:, None], means.gather(1, anc), log_w)


def draw_ancestors(resampler: Resampler, generator: torch.Generator, log_w: torch.Tensor,
                   need: torch.Tensor) -> torch.Tensor:
    """``(G, N)`` ancestor indices within each group: drawn by ``resampler`` from the normalised
    weights ``softmax(log_w)`` and arranged by :func:`in_place_ancestors` (survivors keep their
    slot) where ``need``; the identity elsewhere.  No host sync for a registered scheme."""
    G, N = log_w.shape
    ident = torch.arange(N, device=log_w.device).expand(G, N)
    lw = torch.where(need[:, None], log_w, torch.zeros_like(log_w))   # uniform where not needed
    anc = in_place_ancestors(_draw(resampler, generator, lw, N).to(log_w.device))
    return torch.where(need[:, None], anc, ident)
