"""Toy LMs small enough to enumerate exactly (the ground truth of every test).

``NGramLM`` conditions on the last ``order - 1`` tokens; its next-token table is
drawn from a seeded Dirichlet per context, so a seed fixes the model.
``TabularLM`` takes an explicit function or table of next-token distributions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .base import LanguageModel


def _context_seed(seed: int, context: tuple[int, ...]) -> int:
    digest = hashlib.blake2b(repr((seed, context)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class NGramLM(LanguageModel):
    """``p(v | y_<t) = θ[y_{t-order+1..t-1}][v]``, ``θ[c] ~ Dirichlet(concentration)`` seeded.

    ``eos_boost`` multiplies the EOS probability (then renormalises) so that short
    completions dominate and horizons stay enumerable; ``eos_boost=0`` never ends
    (every completion is truncated at ``max_new_tokens``).
    """

    def __init__(
        self,
        vocab_size: int = 4,
        order: int = 2,
        seed: int = 0,
        concentration: float = 0.7,
        eos_token_id: int | None = None,
        eos_boost: float = 1.0,
    ) -> None:
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        if eos_boost < 0:
            raise ValueError(f"eos_boost must be >= 0, got {eos_boost}")
        if concentration <= 0:
            raise ValueError(f"concentration must be > 0, got {concentration}")
        super().__init__(
            vocab_size=vocab_size,
            eos_token_id=vocab_size - 1 if eos_token_id is None else eos_token_id,
            name=f"NGramLM(V={vocab_size}, order={order}, seed={seed})",
        )
        self.order = order
        self.seed = seed
        self.concentration = concentration
        self.eos_boost = eos_boost
        self._table: dict[tuple[int, ...], torch.Tensor] = {}

    def distribution(self, context: tuple[int, ...]) -> torch.Tensor:
        """Log-probabilities of the next token after ``context`` (the last order-1 tokens)."""
        if context not in self._table:
            rng = np.random.default_rng(_context_seed(self.seed, context))
            probs = rng.dirichlet(np.full(self.vocab_size, self.concentration))
            probs = np.maximum(probs, 1e-6)
            probs[self.eos_token_id] *= self.eos_boost
            probs /= probs.sum()
            self._table[context] = torch.log(torch.tensor(probs, dtype=torch.float64)).float()
        return self._table[context]

    def next_logprobs(self, sequences: list[list[int]]) -> torch.Tensor:
        k = self.order - 1
        rows = [self.distribution(tuple(s[len(s) - k :]) if k else ()) for s in sequences]
        return torch.stack(rows)


class TabularLM(LanguageModel):
    """An LM given by ``table(sequence) -> probabilities`` (a callable or a dict by context).

    ``table`` may map a tuple of the *whole* sequence (prompt included) to a vector of
    next-token probabilities; missing contexts fall back to ``default``.
    """

    def __init__(
        self,
        vocab_size: int,
        eos_token_id: int,
        table: Callable[[tuple[int, ...]], Sequence[float]] | dict[tuple[int, ...], Sequence[float]],
        default: Sequence[float] | None = None,
    ) -> None:
        super().__init__(vocab_size=vocab_size, eos_token_id=eos_token_id, name="TabularLM")
        self.table = table
        self.default = default

    def _probs(self, seq: tuple[int, ...]) -> Sequence[float]:
        if callable(self.table):
            return self.table(seq)
        if seq in self.table:
            return self.table[seq]
        if self.default is None:
            raise KeyError(f"TabularLM has no distribution for context {seq}")
        return self.default

    def next_logprobs(self, sequences: list[list[int]]) -> torch.Tensor:
        probs = torch.tensor([list(self._probs(tuple(s))) for s in sequences], dtype=torch.float64)
        probs = probs / probs.sum(dim=1, keepdim=True)
        return torch.log(probs).float()


def pivotal_lm() -> TabularLM:
    """The "pivotal token" example: token 0 leads to one strong future, token 1 to many weak ones.

    Vocabulary {0, 1, 2, 3, EOS=4}; after the prompt [0]: p(0)=0.4, p(1)=0.6.  After 0
    the continuation is almost deterministic (2 then EOS); after 1 it is uniform over
    {0, 1, 2, 3} then EOS.  Low temperature prefers 1; ``p^α`` prefers 0.
    """

    def table(seq: tuple[int, ...]) -> list[float]:
        completion = seq[1:]
        if len(completion) == 0:
            return [0.4, 0.6, 0.0, 0.0, 0.0]
        if completion[0] == 0:
            return [0.0, 0.0, 0.9, 0.0, 0.1] if len(completion) == 1 else [0, 0, 0, 0, 1.0]
        if len(completion) == 1:
            return [0.25, 0.25, 0.25, 0.25, 0.0]
        return [0, 0, 0, 0, 1.0]

    def safe(seq: tuple[int, ...]) -> list[float]:
        p = np.asarray(table(seq), dtype=float) + 1e-9
        return list(p / p.sum())

    return TabularLM(vocab_size=5, eos_token_id=4, table=safe)
