"""Brute-force enumeration of a target on a toy LM: the ground truth for every engine.

``enumerate_target`` walks the tree of completions breadth-first, one batched
``next_logprobs`` call per depth, accumulating ``log γ`` token by token; a prefix
whose density is already ``-inf`` is pruned (token increments are never ``+inf``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .targets.target import Target

#: refuse to enumerate more prefixes than this
MAX_PREFIXES = 2_000_000


@dataclass
class ExactDistribution:
    """The normalised target over completions (token tuples without EOS).

    A completion of length ``max_new_tokens`` is truncated (no EOS); shorter ones
    ended in EOS (any of ``lm.eos_token_ids``: a completion's mass sums over them).
    ``log_Z = log Σ_y γ(y)``.
    """

    sequences: list[tuple[int, ...]]
    log_gamma: torch.Tensor  # (K,) float64 unnormalised log density
    max_new_tokens: int

    def __post_init__(self) -> None:
        self.log_Z = float(torch.logsumexp(self.log_gamma, 0))
        if not math.isfinite(self.log_Z):
            raise ValueError("the target gives zero mass to every completion (log Z = -inf)")
        self.log_probs = self.log_gamma - self.log_Z
        self.probs = self.log_probs.exp()
        self._index = {s: i for i, s in enumerate(self.sequences)}

    @property
    def Z(self) -> float:
        return math.exp(self.log_Z)

    @property
    def effective_support(self) -> float:
        """``1 / Σ_y π(y)²``: how many equally likely sequences ``π`` is worth.

        A test whose target has an effective support near 1 passes for a sampler
        that always returns the mode; the exactness tests use targets with ≥ 10.
        """
        return float(1.0 / (self.probs**2).sum())

    @property
    def truncated_mass(self) -> float:
        """``π(y truncated)``: the mass on completions cut at ``max_new_tokens`` (no EOS).

        A finished completion has at most ``max_new_tokens − 1`` tokens besides its EOS,
        so the truncated ones are exactly those of length ``max_new_tokens``.
        """
        cut = [i for i, s in enumerate(self.sequences) if len(s) == self.max_new_tokens]
        return float(self.probs[cut].sum()) if cut else 0.0

    def prob(self, sequence: Sequence[int]) -> float:
        i = self._index.get(tuple(sequence))
        return 0.0 if i is None else float(self.probs[i])

    def as_dict(self) -> dict[tuple[int, ...], float]:
        return {s: float(p) for s, p in zip(self.sequences, self.probs)}

    def empirical(self, samples: Iterable[Sequence[int]], weights: Sequence[float] | None = None
                  ) -> dict[tuple[int, ...], float]:
        """Weighted empirical distribution of samples (weights normalised; uniform if None)."""
        samples = [tuple(s) for s in samples]
        w = torch.ones(len(samples), dtype=torch.float64) if weights is None else torch.as_tensor(
            weights, dtype=torch.float64)
        w = w / w.sum()
        out: dict[tuple[int, ...], float] = {}
        for s, wi in zip(samples, w.tolist()):
            out[s] = out.get(s, 0.0) + wi
        return out

    def tv(self, samples: Iterable[Sequence[int]], weights: Sequence[float] | None = None) -> float:
        """Total-variation distance ``½ Σ_y |π(y) − π̂(y)|`` to a weighted sample."""
        return tv_distance(self.as_dict(), self.empirical(samples, weights))

    def mean(self, f) -> float:
        """``E_π[f(y)]``."""
        return float(sum(p * f(s) for s, p in self.as_dict().items()))

    def top(self, k: int = 5) -> list[tuple[tuple[int, ...], float]]:
        order = torch.argsort(self.probs, descending=True)[:k]
        return [(self.sequences[i], float(self.probs[i])) for i in order.tolist()]


def tv_distance(p: dict, q: dict) -> float:
    """``½ Σ |p − q|`` over the union of supports."""
    keys = set(p) | set(q)
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in keys)


def enumerate_target(target: Target, prompt: str | Sequence[int], max_new_tokens: int
                     ) -> ExactDistribution:
    """Every completion of at most ``max_new_tokens`` tokens with its ``log γ``."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    lm = target.lm
    ids = target.encode(prompt) if isinstance(prompt, str) else lm.check_prompt(prompt)
    lm.check_prompt(ids, max_new_tokens)
    eos = set(getattr(lm, "eos_token_ids", (lm.eos_token_id,)))
    frontier: list[tuple[int, ...]] = [()]
    frontier_lg = torch.zeros(1, dtype=torch.float64)
    done: list[tuple[int, ...]] = []
    done_lg: list[float] = []
    done_trunc: list[bool] = []
    for depth in range(max_new_tokens):
        if not frontier:
            break
        if len(frontier) * lm.vocab_size > MAX_PREFIXES:
            raise ValueError(
                f"exact enumeration would visit {len(frontier) * lm.vocab_size} prefixes at depth "
                f"{depth}; use a smaller vocabulary or horizon"
            )
        lp = lm.checked_next_logprobs([ids + list(f) for f in frontier], step=depth)
        inc = target.log_next(target.batch(ids, [list(f) for f in frontier], lp)).double().cpu()
        total = frontier_lg[:, None] + inc
        new_frontier, new_lg = [], []
        last = depth == max_new_tokens - 1
        for i, f in enumerate(frontier):
            row = total[i]
            for v in torch.isfinite(row).nonzero().flatten().tolist():
                if v in eos:
                    done.append(f)
                    done_lg.append(float(row[v]))
                    done_trunc.append(False)
                elif last:
                    done.append(f + (v,))
                    done_lg.append(float(row[v]))
                    done_trunc.append(True)
                else:
                    new_frontier.append(f + (v,))
                    new_lg.append(float(row[v]))
        frontier, frontier_lg = new_frontier, torch.tensor(new_lg, dtype=torch.float64)
    if len(eos) > 1:
        done, done_lg, done_trunc = _merge_eos(done, done_lg, done_trunc)
    log_gamma = torch.tensor(done_lg, dtype=torch.float64)
    if target.has_complete and done:
        batch = target.batch(ids, [list(s) for s in done], None,
                             [not t for t in done_trunc], done_trunc)
        log_gamma = log_gamma + target.log_complete(batch)
    keep = torch.isfinite(log_gamma)
    finished = torch.tensor([not t for t in done_trunc], dtype=torch.bool)
    if target.truncation == "zero" and any(done_trunc) and not bool(keep[finished].any()):
        raise ValueError(
            f"the target gives zero mass to every completion: under truncation='zero' the "
            f"{sum(done_trunc)} completions cut at max_new_tokens={max_new_tokens} weigh nothing and "
            f"no completion that finishes within {max_new_tokens} tokens has positive weight; "
            f"raise max_new_tokens")
    seqs = [s for s, k in zip(done, keep.tolist()) if k]
    return ExactDistribution(seqs, log_gamma[keep], max_new_tokens)


def _merge_eos(done: list[tuple[int, ...]], lg: list[float], trunc: list[bool]
               ) -> tuple[list[tuple[int, ...]], list[float], list[bool]]:
    """One entry per completion: ``y`` ended by any of several EOS ids has
    ``γ(y) = Σ_e γ(y, e)`` (samples carry no EOS, so the ids are indistinguishable)."""
    index: dict[tuple[int, ...], int] = {}
    seqs: list[tuple[int, ...]] = []
    parts: list[list[float]] = []
    flags: list[bool] = []
    for s, g, t in zip(done, lg, trunc):
        if s in index:
            parts[index[s]].append(g)
        else:
            index[s] = len(seqs)
            seqs.append(s)
            parts.append([g])
            flags.append(t)
    merged = [float(torch.logsumexp(torch.tensor(p, dtype=torch.float64), 0)) for p in parts]
    return seqs, merged, flags
