"""Task adapters: problems, the prompt format, answer extraction and scoring.

A task spec is ``FAMILY:NAME`` (e.g. ``reasoning_gym:chain_sum``); ``registry.FAMILIES`` maps
a family to a factory ``(name, config, seed) -> Task``.  A :class:`Task` yields
:class:`Problem` s, turns one into a chat prompt, extracts the final answer from a
completion and scores it (1 = correct).  Problem ``i`` depends only on ``(seed, i)``,
so a larger ``--n`` extends a problem set instead of replacing it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

#: the instruction appended to every numeric question (one format for all numeric tasks)
NUMBER_FORMAT = "Solve the problem, then end your reply with a final line of the form 'Answer: <number>'."

_ANSWER_LINE = re.compile(r"answer(?:\s*[:：=]|\s+is\b\s*[:：=]?)\s*(.+)", re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_NUMBER = re.compile(r"[-+−]?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


@dataclass
class Problem:
    """One question with its reference answer; ``entry`` is what the task's scorer needs."""

    index: int
    question: str
    answer: str
    entry: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class Extraction:
    """The extracted answer (None when the completion has none) and how it was found."""

    answer: str | None
    how: str  # "answer-line", "boxed", "last-number" or "none"


def canonical_number(text: str) -> str | None:
    """``" +1,000.00 "`` -> ``"1000"``; ``"-4.5"`` -> ``"-4.5"``; ``"3/4"`` kept; None if not a number."""
    s = text.strip().replace("−", "-").replace(",", "").replace(" ", "").rstrip(".")
    if re.fullmatch(r"[-+]?\d+/\d+", s):
        return s.lstrip("+")
    try:
        v = float(s)
    except ValueError:
        return None
    if not math.isfinite(v):
        return None
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return repr(v)


def extract_number(text: str | None) -> Extraction:
    """The final numeric answer: the last ``Answer: …`` line, else ``\\boxed{…}``, else the last number.

    Inside the chosen span the first number after its last ``=`` is taken
    (``Answer: 12 apples.`` -> ``12``; ``Answer: 5 - 3 = 2`` -> ``2``).
    """
    if not text:
        return Extraction(None, "none")
    for how, spans in (("answer-line", _ANSWER_LINE.findall(text)), ("boxed", _BOXED.findall(text))):
        for span in reversed(spans):
            m = _NUMBER.search(span.replace("$", "").replace("**", "").rsplit("=", 1)[-1])
            if m:
                return Extraction(canonical_number(m.group()), how)
    numbers = _NUMBER.findall(text)
    if numbers:
        return Extraction(canonical_number(numbers[-1]), "last-number")
    return Extraction(None, "none")


class Task:
    """Interface of a task adapter (subclass and register a factory in ``registry.FAMILIES``)."""

    spec: str
    config: dict[str, Any]

    def problems(self, n: int) -> list[Problem]:
        raise NotImplementedError

    def prompt(self, problem: Problem) -> list[dict[str, str]]:
        """Chat messages for ``problem`` (a plain string prompt is ``[{"role": "user", ...}]``)."""
        raise NotImplementedError

    def extract(self, completion: str | None) -> Extraction:
        raise NotImplementedError

    def score(self, answer: str | None, problem: Problem) -> float:
        """Score in [0, 1]; a completion counts as correct when its score is 1."""
        raise NotImplementedError


def import_reasoning_gym() -> Any:
    """``import reasoning_gym`` without the SyntaxWarnings its dependency cellpylib prints when Python
    first compiles it ('"is" with a literal', 8 lines on every start until the bytecode is cached)."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)
            import reasoning_gym
    except ModuleNotFoundError as exc:  # pragma: no cover - depends on the install
        raise ModuleNotFoundError("reasoning_gym tasks need the eval extra: pip install 'llmppl[eval]'") from exc
    return reasoning_gym


class ReasoningGymTask(Task):
    """A ``reasoning_gym`` procedural dataset with a numeric answer, scored by its own scorer."""

    def __init__(self, name: str, config: dict[str, Any] | None = None, seed: int = 0) -> None:
        reasoning_gym = import_reasoning_gym()
        self.name, self.seed = name, seed
        self.config = dict(config or {})
        self.spec = f"reasoning_gym:{name}"
        self._rg = reasoning_gym
        try:
            self._scorer = reasoning_gym.create_dataset(name, size=1, seed=seed, **self.config)
        except (KeyError, ValueError, TypeError, AssertionError) as exc:
            raise ValueError(f"reasoning_gym cannot build {name!r} with config {self.config}: {exc}") from exc

    def problems(self, n: int) -> list[Problem]:
        if n < 1:
            raise ValueError(f"the number of problems must be >= 1, got {n}")
        ds = self._rg.create_dataset(self.name, size=n, seed=self.seed, **self.config)
        return [Problem(i, e["question"], str(e["answer"]), e) for i, e in enumerate(ds)]

    def prompt(self, problem: Problem) -> list[dict[str, str]]:
        return [{"role": "user", "content": f"{problem.question}\n{NUMBER_FORMAT}"}]

    def extract(self, completion: str | None) -> Extraction:
        return extract_number(completion)

    def score(self, answer: str | None, problem: Problem) -> float:
        if answer is None:
            return 0.0
        reference = canonical_number(problem.answer) or problem.answer
        entry = dict(problem.entry, answer=reference)
        return float(self._scorer.score_answer(answer, entry))
