"""Decoding baselines with the engines' ``Result`` and cost stats, so comparisons are one line.

* ``Plain(n)``: ``y ~ p`` (ancestral sampling from the base LM);
* ``LowTemperature(tau, n)``: ``y_t ~ softmax(logits_t / τ)`` (token-level, not ``p^{1/τ}``);
* ``Greedy()``: ``y_t = argmax_v p(v | y_<t)``;
* ``BestOfN(n, by)``: ``n`` plain samples, keep ``argmax_i score(y_i)`` with
  ``score = log p(y|x)`` (``"logp"``), ``log γ(y)`` (``"target"``) or a reward callable.

All ``n`` rows decode in one batched ``LMState``; weights are uniform (BestOfN: all
mass on the winner).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ..targets.base import Completion
from ..targets.target import Target
from .common import Stopwatch, peak_memory, prepare_run, run_each
from .decode import Decoded, advance, end_terms
from .proposals import Base, Temperature
from .proposal import Proposal, ProposalContext
from .result import Result


class BatchMixin:
    """``run_batch(target, prompts, max_new_tokens, seed)``: one ``Result`` per prompt."""

    def run_batch(self, target: Target, prompts: Sequence, max_new_tokens: int,
                  seed: int | None = None) -> list[Result]:
        return run_each(self.run, target, prompts, max_new_tokens, seed)


def _check_n(n: int) -> int:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    return n


class ArgMax(Proposal):
    """``q = p``, but ``sample`` returns the mode (greedy decoding)."""

    def log_probs(self, ctx: ProposalContext) -> torch.Tensor:
        return ctx.batch.base_logprobs

    def sample(self, log_q: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return log_q.argmax(dim=-1)


def decode_run(method: str, proposal: Proposal, n: int, target: Target, prompt, max_new_tokens: int,
               seed: int | None, config: dict) -> tuple[Result, Decoded]:
    """Decode ``n`` rows from ``proposal`` to EOS or ``max_new_tokens``; a uniformly weighted Result."""
    ids, gen = prepare_run(target, prompt, max_new_tokens, seed)
    with Stopwatch(target.lm.device) as clock:
        state = target.lm.start(ids, n)
        d = advance(target, state, torch.arange(n), max_new_tokens, proposal,
                    target.base_exponent, gen)
        samples = [list(t) for t in state.tokens]
        log_target = d.total("log_inc") + end_terms(target, ids, samples, d.ended, final=True)
    stats = {"forward_passes": state.forward_passes, "tokens_decoded": state.tokens_decoded,
             "wall_time": clock.seconds, "peak_memory": peak_memory(target.lm.device),
             "log_target": log_target.tolist()}
    result = Result(
        method=method, prompt_ids=ids, samples=samples, log_weights=[0.0] * n,
        texts=[target.lm.decode(s) for s in samples] if target.lm.tokenizer is not None else None,
        finished=d.ended.tolist(), truncated=(~d.ended).tolist(), log_p=d.total("log_p").tolist(),
        stats=stats, config={"n": n, "max_new_tokens": max_new_tokens, "proposal": repr(proposal),
                             "target": repr(target), **config},
        seed=seed,
    )
    return result, d


class Plain(BatchMixin):
    """``n`` samples from the base LM, ``y ~ p(·|x)``."""

    def __init__(self, n: int = 1) -> None:
        self.n = _check_n(n)

    def run(self, target: Target, prompt, max_new_tokens: int, seed: int | None = None) -> Result:
        return decode_run("plain", Base(), self.n, target, prompt, max_new_tokens, seed, {})[0]

    def __repr__(self) -> str:
        return f"Plain(n={self.n})"


class LowTemperature(BatchMixin):
    """``n`` samples with ``y_t ~ softmax(logits_t / τ)`` (locally normalised; not ``p^{1/τ}``)."""

    def __init__(self, tau: float, n: int = 1) -> None:
        self.proposal = Temperature(tau)
        self.tau = self.proposal.tau
        self.n = _check_n(n)

    def run(self, target: Target, prompt, max_new_tokens: int, seed: int | None = None) -> Result:
        return decode_run("lowtemp", self.proposal, self.n, target, prompt, max_new_tokens, seed,
                          {"tau": self.tau})[0]

    def __repr__(self) -> str:
        return f"LowTemperature(tau={self.tau:g}, n={self.n})"


class Greedy(BatchMixin):
    """``y_t = argmax_v p(v | y_<t)`` (one deterministic completion)."""

    def run(self, target: Target, prompt, max_new_tokens: int, seed: int | None = None) -> Result:
        return decode_run("greedy", ArgMax(), 1, target, prompt, max_new_tokens, seed, {})[0]

    def __repr__(self) -> str:
        return "Greedy()"


def _score_logp(target: Target, res: Result, d: Decoded) -> list[float]:
    return list(res.log_p)


def _score_target(target: Target, res: Result, d: Decoded) -> list[float]:
    return list(res.stats["log_target"])


#: built-in BestOfN scores: name -> score(target, result, decoded) -> list of floats
SCORES: dict[str, Callable[[Target, Result, Decoded], list[float]]] = {
    "logp": _score_logp,
    "target": _score_target,
}


class BestOfN(BatchMixin):
    """``n`` samples from ``p`` (temperature ``tau``); the one maximising ``by`` gets all the weight.

    ``by``: ``"logp"`` (``log p(y|x)``), ``"target"`` (``log γ(y)``) or a reward
    ``f(completions: list[Completion]) -> list[float]``.
    """

    def __init__(self, n: int, by: str | Callable[[Sequence[Completion]], Sequence[float]] = "logp",
                 tau: float = 1.0) -> None:
        self.n = _check_n(n)
        if not callable(by) and by not in SCORES:
            raise ValueError(f"by must be one of {sorted(SCORES)} or a callable, got {by!r}")
        self.by = by
        self.proposal = Base() if tau == 1.0 else Temperature(tau)
        self.tau = float(tau)

    def _scores(self, target: Target, res: Result, d: Decoded) -> list[float]:
        if not callable(self.by):
            return SCORES[self.by](target, res, d)
        comps = [Completion(list(s), t, f, c) for s, t, f, c in zip(
            res.samples, res.texts or [None] * res.n, res.finished, res.truncated)]
        values = [float(v) for v in self.by(comps)]
        if len(values) != res.n:
            raise ValueError(f"BestOfN reward returned {len(values)} scores for {res.n} completions")
        return values

    def run(self, target: Target, prompt, max_new_tokens: int, seed: int | None = None) -> Result:
        res, d = decode_run("bestofn", self.proposal, self.n, target, prompt, max_new_tokens, seed,
                            {"by": getattr(self.by, "__name__", str(self.by)), "tau": self.tau})
        scores = self._scores(target, res, d)
        finite = [s if not math.isnan(s) else -math.inf for s in scores]
        best = max(range(res.n), key=lambda i: finite[i])
        res.log_weights = [0.0 if i == best else -math.inf for i in range(res.n)]
        res.stats["scores"] = scores
        res.select = "max"
        return res

    def __repr__(self) -> str:
        return f"BestOfN(n={self.n}, by={getattr(self.by, '__name__', self.by)!r})"
