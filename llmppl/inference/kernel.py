"""The one shape of every engine: a kernel over a run state, as in blackjax.

    state = engine.init(target, prompts, max_new_tokens, seed=…)    # a run on G prompts
    while not state.done:
        state, info = engine.step(state)                            # info: typed, per step
    results = engine.results(state)                                 # one Result per prompt

``run_batch`` is that loop (with a progress bar when ``engine.progress``), ``run`` the same
on one prompt (raising :class:`~llmppl.inference.common.AllParticlesDied` when every particle
of it dies).  The engine holds configuration only; everything a run owns — particles,
evidence, exponent, the LM's decoding handle, each part's run state — lives in the state, so
two states of one engine can be stepped alternately and each equals its run alone.  A state is
advanced in place (the LM's KV cache cannot be copied cheaply) and returned: use the returned
one.

Every engine's ``Result.stats`` has the keys of :data:`STATS` (one schema), plus its own.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from ..targets.target import Target
from .result import Result

Prompt = str | Sequence[int] | Sequence[dict]

#: the ``Result.stats`` keys every engine reports (LM work, time, memory, batch size, steps)
STATS = ("forward_passes", "tokens_decoded", "tokens_sampled", "wall_time", "peak_memory",
         "batch_prompts", "n_steps")


@dataclass(frozen=True)
class StepInfo:
    """What one step did, per prompt where it matters; engines extend it with typed fields."""

    step: int


class RunState(Protocol):
    """What the driver reads of a state: whether a step is left, and its token budget."""

    @property
    def done(self) -> bool: ...

    @property
    def max_new_tokens(self) -> int: ...


S = TypeVar("S", bound=RunState)


class Engine(Generic[S]):
    """Base class of SMC, MH, the baselines, ``Reweight`` and ``ScalablePower``.

    Subclasses implement :meth:`init`, :meth:`step` and :meth:`results`; the driver
    (:meth:`run_batch`, :meth:`run`) is shared."""

    #: the method name in ``Result.method``
    method: str = "engine"
    #: show a progress bar (tqdm, on stderr) in run / run_batch
    progress: bool = False

    def init(self, target: Target, prompts: Sequence[Prompt], max_new_tokens: int,
             seed: int | None = None) -> S:
        raise NotImplementedError

    def step(self, state: S) -> tuple[S, StepInfo]:
        raise NotImplementedError

    def results(self, state: S, raise_on_failure: bool = False) -> list[Result]:
        raise NotImplementedError

    def drive(self, state: S) -> S:
        """``state, _ = step(state)`` until ``state.done`` (a progress bar when ``progress``)."""
        from tqdm.auto import tqdm

        with tqdm(total=state.max_new_tokens, disable=not self.progress, file=sys.stderr,
                  desc=self.method, unit="tok") as bar:
            while not state.done:
                state, _ = self.step(state)
                bar.update(1)
        return state

    def run_batch(self, target: Target, prompts: Sequence[Prompt], max_new_tokens: int,
                  seed: int | None = None, **init_options: Any) -> list[Result]:
        """One :class:`Result` per prompt (all prompts as rows of one decoding state); a prompt
        whose particles all die gets a Result with ``error`` set, the others go on."""
        state = self.init(target, prompts, max_new_tokens, seed=seed, **init_options)
        return self.results(self.drive(state), raise_on_failure=False)

    def run(self, target: Target, prompt: Prompt, max_new_tokens: int, seed: int | None = None,
            **init_options: Any) -> Result:
        """One prompt; raises ``AllParticlesDied`` when every particle dies."""
        state = self.init(target, [prompt], max_new_tokens, seed=seed, **init_options)
        return self.results(self.drive(state), raise_on_failure=True)[0]


__all__ = ["Engine", "StepInfo", "RunState", "STATS", "Prompt"]
