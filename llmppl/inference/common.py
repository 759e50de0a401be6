"""Shared plumbing of every engine: prompt checks, seeding, cost accounting."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from ..models.streams import RowStreams

from ..targets.target import Target


class AllParticlesDied(ValueError):
    """Every particle (or chain) of one prompt has target density zero: no sample to return."""


def prepare_prompts(target: Target, prompts: Sequence[Any], max_new_tokens: int) -> list[list[int]]:
    """Validate the arguments of ``run_batch``; return each prompt's token ids.

    Errors name the offending prompt by its index, before any compute.
    """
    if not isinstance(target, Target):
        raise ValueError(f"expected a llmppl Target, got {type(target).__name__}")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of prompts (texts, token-id lists or "
                         "chat message lists)")
    out = []
    for i, prompt in enumerate(prompts):
        try:
            ids = target.encode(prompt)
            out.append(target.lm.check_prompt(ids, max_new_tokens))
        except ValueError as exc:
            raise ValueError(f"prompt {i}: {exc}") from None
    return out


def eos_ids(lm: Any) -> tuple[int, ...]:
    """Every token id that ends a completion (``lm.eos_token_ids``, else ``(lm.eos_token_id,)``)."""
    ids = getattr(lm, "eos_token_ids", None)
    return tuple(int(i) for i in ids) if ids else (int(lm.eos_token_id),)


def make_generator(seed: int | None, n_rows: int, device: torch.device | str = "cpu") -> RowStreams:
    """A run's randomness: per-row counter-based streams for ``n_rows`` rows (a row's draws do not
    depend on the other rows) and a ``torch.Generator`` for group-level draws, both from ``seed``
    (a fresh random seed when None); :class:`~llmppl.models.streams.RowStreams`."""
    return RowStreams(seed, n_rows, device)


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

    def __enter__(self) -> Stopwatch:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Stopwatch:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._t0 = time.perf_counter()
        return self

    def stop(self) -> float:
        """Seconds since :meth:`start` (kept in ``seconds``)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - self._t0
        return self.seconds

