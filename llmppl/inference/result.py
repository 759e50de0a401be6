"""``Result``: what every engine returns (SMC, MH, look-ahead, baselines).

Weighted samples ``{(y_i, w_i)}`` approximating the target, the evidence estimate
``log Ẑ`` where the engine has one, per-step traces and cost statistics.  A Result
is picklable and JSON-serialisable (``to_json`` / ``Result.from_json``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import diagnostics   # Result → its diagnostics (diagnostics reads Results duck-typed, never imports this)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return v if math.isfinite(v) else ("-inf" if v < 0 else "inf" if v > 0 else "nan")
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.bool_,)):
        return bool(x)
    return x


def _unjson_float(x: Any) -> Any:
    if isinstance(x, str) and x in ("-inf", "inf", "nan"):
        return float(x)
    if isinstance(x, list):
        return [_unjson_float(v) for v in x]
    return x


@dataclass
class Result:
    """Weighted completions and diagnostics of one run.

    ``samples[i]``: token ids without EOS; ``log_weights[i]``: unnormalised final
    log-weights (``weights`` normalises them); ``finished[i]`` / ``truncated[i]``:
    ended with EOS / cut at ``max_new_tokens``; ``log_p[i]``: ``log p(y_i|x)`` under
    the base LM.  ``steps`` holds per-step traces (lists, one entry a step):
    ``ess``, ``resampled``, ``ancestors``, ``log_weights``, ``exponent``,
    ``log_evidence_increment``, ... as the engine records them.  ``chains`` holds
    per-chain traces (MH).  ``stats``: ``forward_passes``, ``tokens_decoded``,
    ``wall_time``, ``peak_memory`` and engine-specific counters.  ``error``: set by
    ``run_batch`` when this prompt failed on its own (its particles all died) while the
    other prompts of the batch went on.
    """

    method: str
    prompt_ids: list[int]
    samples: list[list[int]]
    log_weights: list[float]
    texts: list[str | None] | None = None
    finished: list[bool] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)
    log_p: list[float] = field(default_factory=list)
    log_evidence: float | None = None
    steps: dict[str, list] = field(default_factory=dict)
    chains: dict[str, list] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    select: str = "sample"
    #: why this prompt produced no usable sample (e.g. every particle died in ``run_batch``); None if fine
    error: str | None = None

    # ------------------------------------------------------------ weights
    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def weights(self) -> np.ndarray:
        """Normalised weights ``w_i / Σ_j w_j`` (float64)."""
        lw = np.asarray(self.log_weights, dtype=np.float64)
        if lw.size == 0 or not np.isfinite(lw).any():
            raise ValueError("no particle has positive weight")
        m = lw[np.isfinite(lw)].max()
        w = np.exp(lw - m)
        return w / w.sum()

    @property
    def ess(self) -> list[float]:
        """ESS per step (SMC), or the ESS of the final weights when no trace exists."""
        if "ess" in self.steps:
            return list(self.steps["ess"])
        w = self.weights
        return [float(1.0 / np.sum(w**2))]

    @property
    def truncated_share(self) -> float:
        """``Σ_i W_i · 1[y_i truncated]``: the normalised weight on completions cut at
        ``max_new_tokens`` (0 when none is; NaN when no sample has positive weight).

        Under ``Target(..., truncation="keep")`` a large share says the target favours
        completions that never end (raise ``max_new_tokens`` or use ``truncation="zero"``).
        """
        if not any(self.truncated):
            return 0.0
        lw = np.asarray(self.log_weights, dtype=np.float64)
        if lw.size == 0 or not np.isfinite(lw).any():
            return math.nan
        return float(np.sum(self.weights[np.asarray(self.truncated, dtype=bool)]))

    @property
    def final_ess(self) -> float:
        w = self.weights
        return float(1.0 / np.sum(w**2))

    def best_index(self, select: str | None = None) -> int:
        """``select="sample"``: a draw from the weights (seeded by the run's seed); ``"max"``: arg-max weight."""
        mode = select or self.select
        if mode == "max":
            return int(np.argmax(self.weights))
        if mode == "sample":
            rng = np.random.default_rng(None if self.seed is None else self.seed + 7919)
            return int(rng.choice(self.n, p=self.weights))
        raise ValueError(f"select must be 'sample' or 'max', got {mode!r}")

    @property
    def best(self) -> str | list[int]:
        """The chosen completion: its text when the LM has a tokenizer, else its token ids."""
        i = self.best_index()
        if self.texts is not None and self.texts[i] is not None:
            return self.texts[i]
        return self.samples[i]

    @property
    def best_tokens(self) -> list[int]:
        return self.samples[self.best_index()]

    def distribution(self) -> dict[tuple[int, ...], float]:
        """Weighted empirical distribution over distinct completions."""
        out: dict[tuple[int, ...], float] = {}
        for s, w in zip(self.samples, self.weights):
            out[tuple(s)] = out.get(tuple(s), 0.0) + float(w)
        return out

    def summary(self) -> str:
        """One line: method, particles, ESS, log Z, tokens, seconds."""
        parts = [f"{self.method}: n={self.n}", f"ESS={self.final_ess:.2f}"]
        if self.log_evidence is not None:
            parts.append(f"logZ={self.log_evidence:.3f}")
        parts.append(f"tokens={self.stats.get('tokens_decoded', '?')}")
        if "wall_time" in self.stats:
            parts.append(f"seconds={self.stats['wall_time']:.2f}")
        if any(self.truncated):
            parts.append(f"truncated={sum(self.truncated)}/{self.n} "
                         f"(weight share {self.truncated_share:.3f})")
        return "  ".join(parts)

    # ------------------------------------------------------------- serialise
    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict())
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "Result":
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text).read_text()
        d = json.loads(text)
        d["log_weights"] = _unjson_float(d["log_weights"])
        d["log_p"] = _unjson_float(d.get("log_p", []))
        if isinstance(d.get("log_evidence"), str):
            d["log_evidence"] = float(d["log_evidence"])
        d["steps"] = {k: _unjson_float(v) for k, v in d.get("steps", {}).items()}
        d["chains"] = {k: _unjson_float(v) for k, v in d.get("chains", {}).items()}
        return cls(**d)

    # ----------------------------------------------------------- diagnostics
    def to_arviz(self):
        """An ``arviz.InferenceData`` of the run's traces (see ``llmppl.diagnostics``)."""
        return diagnostics.to_arviz(self)

    def genealogy(self):
        """The particle ancestry as a ``networkx.DiGraph`` (see ``llmppl.diagnostics``)."""
        return diagnostics.genealogy(self)

    def plot(self, path: str | Path | None = None):
        """ESS, log-weight spread, exponent schedule and genealogy in one figure."""
        return diagnostics.plot(self, path)
