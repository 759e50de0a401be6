"""The task registry: ``FAMILY:NAME`` -> a :class:`~llmppl.evaluation.tasks.Task`.

``reasoning_gym``: short answers (``Answer: <number>``, :mod:`.tasks`); ``reasoning_gym_cot``,
``jsonl``, ``parquet``, ``hf``: chain-of-thought tasks with ``\\boxed{}`` answers graded by
math-verify (:mod:`.cot`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from .cot import make_task
from .tasks import ReasoningGymTask, Task

#: task family -> factory ``(name, config, seed) -> Task``
FAMILIES: dict[str, Callable[[str, dict[str, Any], int], Task]] = {
    "reasoning_gym": ReasoningGymTask,
    **{f: partial(make_task, f) for f in ("reasoning_gym_cot", "jsonl", "parquet", "hf")},
}


def get_task(spec: str, config: dict[str, Any] | None = None, seed: int = 0) -> Task:
    """``get_task("reasoning_gym:chain_sum", {"max_terms": 3}, seed=0)``."""
    family, sep, name = spec.partition(":")
    if not sep or not name:
        raise ValueError(f"a task is FAMILY:NAME (e.g. reasoning_gym:chain_sum), got {spec!r}")
    if family not in FAMILIES:
        raise ValueError(f"unknown task family {family!r}; choose one of {sorted(FAMILIES)}")
    return FAMILIES[family](name, dict(config or {}), seed)
