"""Toy LMs small enough to enumerate exactly (the ground truth of every test).

``NGramLM`` conditions on the last ``order - 1`` tokens; its next-token table is
drawn from a seeded Dirichlet per context, so a seed fixes the model.
``ForkingLM`` gives every context two favourite next tokens of similar probability
and sets EOS by the completion's length, so that ``p^α`` stays spread over many
completions even at ``α = 4``; :data:`EXACTNESS` names the LM / prompts / horizon
configurations the exactness tests use (their properties are asserted in
``tests/test_exact.py``).  ``TabularLM`` takes an explicit function or table of
next-token distributions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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


class ForkingLM(LanguageModel):
    """An n-gram LM with a fork at every context and EOS set by the completion's length.

    Tokens ``0 .. V−3`` are generated, ``SEP = V−2`` marks the end of a prompt (it is
    never generated) and ``EOS = V−1``.  For each context ``c`` (the last ``order − 1``
    tokens) a seeded draw makes ``c`` *flat* with probability ``flat`` (all generated
    tokens equally likely) or a *fork*: two favourite tokens ``f₁ ≠ f₂``, a ratio
    ``r ~ U(fork)`` and a spill ``s ~ U(spill)``:

        p(f₁ | c) ∝ (1 − s) / (1 + r),   p(f₂ | c) ∝ (1 − s) · r / (1 + r),
        p(v | c) ∝ s · d_v  for the other generated tokens, d ~ Dirichlet(1),

    all times ``1 − p(EOS)``, where ``p(EOS) = eos_profile[min(n, len(eos_profile) − 1)]``
    and ``n`` is the completion length so far: the number of tokens after the last
    ``SEP`` (after the start when there is none).  SEP and impossible EOS get
    probability 1e-9, not 0, so every exponent (``0 · log p``) stays finite.

    Why: with ``r`` near 1 the ``2^n`` fork paths have similar probabilities, so
    ``p^α`` keeps an effective support ``1/Σπ² ≥ 10`` at ``α = 4``; flat contexts have
    a much smaller future Rényi mass ``Σ_y p(y|c)^α`` than forks (``g^{1−α}`` against
    about ``2^{1−α}`` per step, ``g = V − 2``), so that ``p^α`` differs from token-level
    low temperature ``softmax(α log p)`` and from the base LM (an NGramLM with EOS equally likely at every step makes
    ``p^α`` pile onto the shortest completions instead).  Prompts ending in
    ``[x, SEP]`` give, with ``order ≥ 3``, a different first-token context per ``x``
    and the same length profile whatever the prompt's length.
    """

    def __init__(
        self,
        vocab_size: int = 6,
        order: int = 4,
        seed: int = 0,
        fork: tuple[float, float] = (0.85, 1.0),
        spill: tuple[float, float] = (0.0, 0.1),
        flat: float = 0.25,
        eos_profile: Sequence[float] = (0.0, 0.0, 0.0, 0.9),
    ) -> None:
        if vocab_size < 5:
            raise ValueError(f"ForkingLM needs vocab_size >= 5 (3 generated tokens, SEP, EOS), "
                             f"got {vocab_size}")
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        lo, hi = (float(x) for x in fork)
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"fork must be a range (lo, hi) with 0 < lo <= hi <= 1, got {fork!r}")
        slo, shi = (float(x) for x in spill)
        if not 0.0 <= slo <= shi < 1.0:
            raise ValueError(f"spill must be a range (lo, hi) with 0 <= lo <= hi < 1, got {spill!r}")
        if not 0.0 <= float(flat) <= 1.0:
            raise ValueError(f"flat must be a probability in [0, 1], got {flat!r}")
        profile = [float(e) for e in eos_profile]
        if not profile or any(not 0.0 <= e < 1.0 for e in profile):
            raise ValueError(f"eos_profile must be a non-empty list of probabilities in [0, 1), "
                             f"got {list(eos_profile)!r}")
        super().__init__(vocab_size=vocab_size, eos_token_id=vocab_size - 1,
                         name=f"ForkingLM(V={vocab_size}, order={order}, seed={seed})")
        self.sep_token_id = vocab_size - 2
        self.order = order
        self.seed = seed
        self.fork = (lo, hi)
        self.spill = (slo, shi)
        self.flat = float(flat)
        self.eos_profile = tuple(profile)
        self._body: dict[tuple[int, ...], np.ndarray] = {}
        self._rows: dict[tuple[tuple[int, ...], int], torch.Tensor] = {}

    def body(self, context: tuple[int, ...]) -> np.ndarray:
        """``p(v | c, not EOS)`` over the generated tokens ``0 .. V−3`` (sums to 1)."""
        if context not in self._body:
            rng = np.random.default_rng(_context_seed(self.seed, ("fork",) + context))
            g = self.sep_token_id           # the generated tokens 0 .. V−3
            if rng.uniform() < self.flat:
                self._body[context] = np.full(g, 1.0 / g)
                return self._body[context]
            f = rng.choice(g, 2, replace=False)
            r, s = rng.uniform(*self.fork), rng.uniform(*self.spill)
            other = rng.dirichlet(np.ones(g))
            other[f] = 0.0
            probs = other / other.sum() * s
            probs[f[0]] += (1.0 - s) / (1.0 + r)
            probs[f[1]] += (1.0 - s) * r / (1.0 + r)
            self._body[context] = probs
        return self._body[context]

    def completion_length(self, sequence: Sequence[int]) -> int:
        """Tokens after the last SEP (the whole sequence when there is none)."""
        for i in range(len(sequence) - 1, -1, -1):
            if sequence[i] == self.sep_token_id:
                return len(sequence) - 1 - i
        return len(sequence)

    def _row(self, context: tuple[int, ...], n: int) -> torch.Tensor:
        key = (context, n)
        if key not in self._rows:
            e = self.eos_profile[n]
            probs = np.concatenate([self.body(context) * (1.0 - e), [0.0, e]])
            probs = np.maximum(probs, 1e-9)
            self._rows[key] = torch.log(torch.tensor(probs / probs.sum(), dtype=torch.float64)).float()
        return self._rows[key]

    def next_logprobs(self, sequences: list[list[int]]) -> torch.Tensor:
        k, last = self.order - 1, len(self.eos_profile) - 1
        return torch.stack([
            self._row(tuple(s[len(s) - k:]) if k else (), min(self.completion_length(s), last))
            for s in sequences])


class ZeroForkingLM(ForkingLM):
    """A :class:`ForkingLM` with probabilities that are exactly 0 (no ``1e-9`` floor).

    * ``SEP`` is never generated: ``p(SEP) = 0`` exactly (a mask, as a chat template's
      special tokens are);
    * EOS has probability exactly 0 where ``eos_profile`` gives 0, and an entry ``1.0`` is a
      *forced* EOS: every other token has probability 0 there;
    * ``pad`` extra ids ``V .. V+pad−1`` past EOS have probability 0 in every context (a
      padded vocabulary: output rows that no token uses);
    * ``spill`` is the mass off a fork's two favourites: with ``(0, 0)``, the other generated
      tokens of a fork context have probability exactly 0.

    So ``a · log p`` meets ``0 · log 0`` at ``a = 0`` (``Target(lm, Tempered(τ))``), token
    masks meet impossible tokens, and proposals must give ``q = 0`` where ``p = 0``.
    """

    def __init__(self, vocab_size: int = 6, order: int = 4, seed: int = 0,
                 fork: tuple[float, float] = (0.85, 1.0), spill: tuple[float, float] = (0.0, 0.1),
                 flat: float = 0.25, eos_profile: Sequence[float] = (0.0, 0.0, 0.35, 1.0),
                 pad: int = 1) -> None:
        profile = [float(e) for e in eos_profile]
        if not profile or any(not 0.0 <= e <= 1.0 for e in profile):
            raise ValueError(f"eos_profile must be a non-empty list of probabilities in [0, 1], "
                             f"got {list(eos_profile)!r}")
        if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
            raise ValueError(f"pad must be an int >= 0, got {pad!r}")
        super().__init__(vocab_size, order, seed, fork, spill, flat, [min(e, 0.5) for e in profile])
        self.eos_profile = tuple(profile)
        self.pad = pad
        self.vocab_size = vocab_size + pad
        self.name = f"ZeroForkingLM(V={vocab_size}+{pad}, order={order}, seed={seed})"

    def _row(self, context: tuple[int, ...], n: int) -> torch.Tensor:
        key = (context, n)
        if key not in self._rows:
            e = self.eos_profile[n]
            probs = np.concatenate([self.body(context) * (1.0 - e), [0.0, e], np.zeros(self.pad)])
            with np.errstate(divide="ignore"):
                self._rows[key] = torch.log(torch.tensor(probs / probs.sum(), dtype=torch.float64)).float()
        return self._rows[key]


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


@dataclass(frozen=True)
class ExactnessSetup:
    """A seeded toy LM with prompts and a horizon on which exactness tests can fail.

    For every prompt and every ``α`` in ``alphas`` the target ``p^α`` (``Target(lm,
    Power(α))``, ``truncation="keep"``) has an effective support ``1/Σπ² ≥
    min_support`` sequences and a truncated mass ``≥ min_truncated``, and plain
    low-temperature sampling (``τ = 1/α``), the base LM (``α ≠ 1``) and the mode are
    farther than 0.1 in total variation from it — so a sampler that returns the mode
    or decodes at low temperature fails a TV check at 0.03–0.04.  ``tests/test_exact.py``
    asserts all of this through ``llmppl.exact``.
    """

    name: str
    eos_profile: tuple[float, ...]
    prompts: tuple[tuple[int, ...], ...]
    max_new_tokens: int = 4
    seed: int = 9
    alphas: tuple[float, ...] = (1.0, 2.0, 4.0)
    min_support: float = 10.0
    min_truncated: float = 0.0
    #: a :class:`ZeroForkingLM` (exact zeros: SEP masked, forced EOS, a padded vocabulary row)
    zeros: bool = False

    def lm(self) -> ForkingLM:
        """A fresh ``ForkingLM(seed=seed, eos_profile=eos_profile)`` (other arguments default),
        or ``ZeroForkingLM`` when ``zeros``."""
        if self.zeros:
            return ZeroForkingLM(seed=self.seed, eos_profile=self.eos_profile)
        return ForkingLM(seed=self.seed, eos_profile=self.eos_profile)

    @property
    def prompt(self) -> list[int]:
        """The first prompt (the one single-prompt tests use)."""
        return list(self.prompts[0])


#: the configurations of the exactness tests (``SEP = 4``, ``EOS = 5``, horizon 4):
#:
#: * ``"fork"``: one prompt; completions end after 2 or 3 tokens (so particles finish at
#:   different steps) or are cut; ``1/Σπ²`` = 36, 22, 14 at α = 1, 2, 4;
#: * ``"truncating"``: EOS less likely, so that ``π(truncated)`` = 0.47, 0.29, 0.11 at
#:   α = 1, 2, 4 (for ``Target(..., truncation=...)``);
#: * ``"prompts"``: eight ragged prompts (lengths 2, 3 and 5; the first three 3, 5, 3) for
#:   ``run_batch``; the last three prompt tokens set the first token's context, so prompts
#:   condition the target; α ∈ {1, 2} (``1/Σπ²`` ≥ 10.3);
#: * ``"zeros"``: a :class:`ZeroForkingLM` (probabilities exactly 0: SEP, EOS before two
#:   tokens, everything but EOS after three — a forced EOS — and a padded id 6), so
#:   ``0 · log 0`` and impossible tokens are met; nothing is truncated at horizon 4.
EXACTNESS: dict[str, ExactnessSetup] = {
    "fork": ExactnessSetup("fork", (0.0, 0.0, 0.35, 0.85), ((0, 4),)),
    "truncating": ExactnessSetup("truncating", (0.0, 0.0, 0.15, 0.45), ((0, 4),), min_truncated=0.05),
    "prompts": ExactnessSetup(
        "prompts", (0.0, 0.0, 0.35, 0.85),
        ((3, 0, 4), (0, 4, 1, 3, 4), (3, 1, 4), (0, 4), (0, 3, 4), (2, 0, 4), (3, 4), (0, 4, 3, 3, 4)),
        alphas=(1.0, 2.0)),
    "zeros": ExactnessSetup("zeros", (0.0, 0.0, 0.35, 1.0), ((0, 4),), zeros=True),
}
