"""Distinct completions of a ``Result`` with their summed weight (what a reader of a run wants).

After resampling, many particles carry the same completion; a table of particles then repeats
one text N times.  ``distinct_completions(result)`` groups identical token sequences and sums
their normalised weights: the weighted empirical distribution over completions, most probable
first.  ``select_index(result, "max")`` is the particle of the completion with the largest summed
weight (the mode of that distribution), ``"sample"`` a draw from the weights
(``Result.best_index()``).  Imports only numpy (the server and the CLI use it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ..inference.result import Result

#: ``select`` values: ``sample`` (a draw from the weights) or ``max`` (the heaviest completion)
SELECT = ("sample", "max")


@dataclass
class Completion:
    """One distinct completion: its tokens, text, summed normalised weight (``mass``), the
    particles that carry it, whether it ended with EOS or was cut at ``max_new_tokens``, and
    ``log p(y|x)`` under the base LM when the engine recorded it."""

    tokens: list[int]
    text: str | None
    mass: float
    particles: list[int] = field(default_factory=list)
    finished: bool = False
    truncated: bool = False
    log_p: float | None = None

    @property
    def count(self) -> int:
        return len(self.particles)

    def as_dict(self) -> dict[str, Any]:
        return {"text": self.text, "tokens": list(self.tokens), "mass": self.mass, "count": self.count,
                "particles": list(self.particles), "finished": self.finished, "truncated": self.truncated,
                "log_p": self.log_p if self.log_p is None or math.isfinite(self.log_p) else None}


def _weights(result: Result) -> np.ndarray:
    lw = np.asarray(result.log_weights, dtype=np.float64)
    if lw.size == 0 or not np.isfinite(lw).any():
        return np.zeros(lw.size)
    return np.asarray(result.weights)


def distinct_completions(result: Result) -> list[Completion]:
    """The distinct completions of ``result``, heaviest first (ties: first particle first)."""
    w = _weights(result)
    groups: dict[tuple[int, ...], Completion] = {}
    for i, s in enumerate(result.samples):
        key = tuple(int(t) for t in s)
        c = groups.get(key)
        if c is None:
            text = result.texts[i] if result.texts is not None and i < len(result.texts) else None
            log_p = float(result.log_p[i]) if i < len(result.log_p) else None
            c = groups[key] = Completion(list(key), text, 0.0, [],
                                         bool(result.finished[i]) if i < len(result.finished) else False,
                                         bool(result.truncated[i]) if i < len(result.truncated) else False, log_p)
        c.mass += float(w[i])
        c.particles.append(i)
    return sorted(groups.values(), key=lambda c: (-c.mass, c.particles[0]))


def select_index(result: Result, select: str = "sample") -> int:
    """The particle ``llmppl sample --select`` prints: ``sample`` draws one from the weights
    (``Result.best_index("sample")``, seeded by the run's seed); ``max`` takes the completion
    with the largest summed weight over identical particles (its first particle)."""
    if select == "sample":
        return result.best_index("sample")
    if select == "max":
        return distinct_completions(result)[0].particles[0]
    raise ValueError(f"--select must be one of {', '.join(SELECT)}, got {select!r}")
