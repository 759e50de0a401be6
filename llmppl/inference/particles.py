"""Device-resident particle state of a batched run: ``G`` prompts × ``N`` particles.

Row ``r = g·N + i`` is particle ``i`` of prompt ``g``.  Every per-particle quantity is
a tensor on the LM's device (float64 for accumulated log values), so a token step of
the engine is a handful of tensor ops over all rows; group-wise reductions (weights,
ESS, evidence) are reductions over the second axis of a ``(G, N)`` view.

Tokens have one home: the LM's decoding state (``decoding.tokens[r]``, the tokens fed to
row ``r``), which resampling and moves keep right.  The particles add only ``unfed``: the
token a row drew at its last position (the cut at ``max_new_tokens``), which is never fed
to the LM, or ``-1``.  A completion is :func:`completions` of the two; EOS is never in it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..targets.base import Prefixes

#: why a particle's weight became zero (codes of ``Particles.cause``)
CAUSES = {
    1: "the drawn token has zero target density (a token mask / constraint excludes it)",
    2: "log_complete is -inf (a constraint or reward on finished completions rejects it)",
    3: "the twist log ψ (log_prefix) is -inf",
}


@dataclass
class Particles:
    """Per-row tensors of one batched run (see module docstring)."""

    G: int
    N: int
    device: torch.device

    def __post_init__(self) -> None:
        R, dev, f64 = self.G * self.N, self.device, torch.float64
        self.log_w = torch.zeros((self.G, self.N), dtype=f64, device=dev)  # LSE − log N = log Ẑ so far
        self.log_p = torch.zeros(R, dtype=f64, device=dev)       # log p(y_≤t | x)
        self.log_other = torch.zeros(R, dtype=f64, device=dev)   # Σ_s non-Power token increments
        self.log_q = torch.zeros(R, dtype=f64, device=dev)       # log q(y_≤t): the proposal's path density
        self.log_twist = torch.zeros(R, dtype=f64, device=dev)   # log ψ_t(y_≤t) of the target (0 once ended)
        self.finished = torch.zeros(R, dtype=torch.bool, device=dev)   # ended with EOS
        self.truncated = torch.zeros(R, dtype=torch.bool, device=dev)  # cut at max_new_tokens
        self.dead = torch.zeros(R, dtype=torch.bool, device=dev)       # weight −∞
        self.done = torch.zeros(R, dtype=torch.bool, device=dev)       # finished | truncated | dead (kept in step)
        self.cause = torch.zeros(R, dtype=torch.int8, device=dev)      # CAUSES code of a dead row
        self.length = torch.zeros(R, dtype=torch.long, device=dev)              # tokens drawn (EOS excluded)
        self.unfed = torch.full((R,), -1, dtype=torch.long, device=dev)        # the cut token, or -1
        self.log_Z = torch.zeros(self.G, dtype=f64, device=dev)
        self.failed = torch.zeros(self.G, dtype=torch.bool, device=dev)  # every particle of the prompt died
        self.failed_at = torch.zeros(self.G, dtype=torch.long, device=dev)  # the step at which it did
        #: per-row values of the run's weight terms (:mod:`~llmppl.inference.terms`), by term name
        self.extra: dict[str, torch.Tensor] = {}

    #: per-row tensors that follow the particles through resampling (and every ``extra``)
    ROW_FIELDS = ("log_p", "log_other", "log_q", "log_twist", "finished", "truncated", "dead", "done",
                  "cause", "length", "unfed")

    @property
    def R(self) -> int:
        return self.G * self.N

    @property
    def group(self) -> torch.Tensor:
        return torch.arange(self.G, device=self.device).repeat_interleave(self.N)

    def gather(self, rows: torch.Tensor) -> None:
        """Row ``r`` becomes a copy of row ``rows[r]`` (resampling; ``rows`` stays within groups)."""
        for name in self.ROW_FIELDS:
            setattr(self, name, getattr(self, name).index_select(0, rows))
        self.extra = {k: v.index_select(0, rows) for k, v in self.extra.items()}


def completions(decoding: Any, unfed: torch.Tensor, rows: torch.Tensor | None = None) -> list[list[int]]:
    """The completions of ``rows`` (all when None): the decoding state's tokens of each row,
    plus its ``unfed`` cut token when it has one (one device→host copy of ``unfed``)."""
    idx = list(range(len(unfed))) if rows is None else rows.cpu().tolist()
    cut = (unfed if rows is None else unfed[rows]).cpu().tolist()
    fed = decoding.tokens
    return [fed[r] + [c] if c >= 0 else list(fed[r]) for r, c in zip(idx, cut)]


class RowPrefixes(Prefixes):
    """A :class:`Prefixes` over rows of a run whose ``tokens`` (:func:`completions`) are read
    only when a potential asks for them (pure-``Power`` targets never do: no host sync)."""

    def __init__(self, lm: Any, prompts: list[list[int]], particles: Particles, decoding: Any,
                 rows: torch.Tensor | None, base_logprobs: torch.Tensor | None = None,
                 finished: list[bool] | None = None, truncated: list[bool] | None = None) -> None:
        self.lm, self.base_logprobs = lm, base_logprobs
        self.finished, self.truncated = finished, truncated
        self._texts = None
        self._particles, self._decoding, self._rows = particles, decoding, rows
        self._tokens: list[list[int]] | None = None
        self._prompts = prompts
        n = particles.R if rows is None else len(rows)
        self._len = n

    @property
    def prompts(self) -> list[list[int]]:  # type: ignore[override]
        rows = (torch.arange(self._particles.R) if self._rows is None else self._rows.cpu())
        return [self._prompts[g] for g in (rows // self._particles.N).tolist()]

    @property
    def prompt(self) -> list[int]:  # type: ignore[override]
        if len(self._prompts) == 1:
            return self._prompts[0]
        ps = self.prompts
        if all(p == ps[0] for p in ps):
            return ps[0]
        raise ValueError("this batch holds rows of several prompts (run_batch): use batch.prompts[i], "
                         "the prompt of row i")

    @prompt.setter
    def prompt(self, value: list[int]) -> None:
        pass

    @property
    def row_prompts(self) -> list[list[int]]:  # type: ignore[override]
        return self.prompts

    @row_prompts.setter
    def row_prompts(self, value: list[list[int]] | None) -> None:
        pass

    @property
    def tokens(self) -> list[list[int]]:  # type: ignore[override]
        if self._tokens is None:
            self._tokens = completions(self._decoding, self._particles.unfed, self._rows)
        return self._tokens

    @tokens.setter
    def tokens(self, value: list[list[int]]) -> None:
        self._tokens = value

    def __len__(self) -> int:
        return self._len


__all__ = ["Particles", "RowPrefixes", "CAUSES", "completions"]
