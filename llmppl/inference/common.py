"""Shared plumbing of every engine: prompt checks, seeding, cost accounting."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from ..targets.target import Target


def prepare_run(
    target: Target, prompt: str | Sequence[int] | Sequence[dict], max_new_tokens: int,
    seed: int | None,
) -> tuple[list[int], torch.Generator]:
    """Validate the arguments of ``run``; return the prompt ids and the run's generator."""
    if not isinstance(target, Target):
        raise ValueError(f"expected a llmppl Target, got {type(target).__name__}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    ids = target.encode(prompt)
    ids = target.lm.check_prompt(ids, max_new_tokens)
    return ids, make_generator(seed, target.lm.device)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed`` (a fresh random seed when None)."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    return gen


def peak_memory(device: torch.device | str = "cpu") -> int:
    """Peak memory in bytes: CUDA allocator peak on GPU, the process's max RSS on CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.max_memory_allocated(dev))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


class Stopwatch:
    """Wall time of a block, synchronising CUDA so GPU work is counted."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.seconds = 0.0

    def __enter__(self) -> "Stopwatch":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - self._t0
