"""How much memory a decoding run needs, checked before it starts (and the device it runs on).

An engine declares what it holds at its peak as a :class:`Footprint` per LM: ``rows`` rows of
KV cache of up to ``tokens`` tokens each (the longest prompt plus ``max_new_tokens``, the
rows of every decoding state it keeps alive at once: MH's proposal copies, look-ahead forks,
resample-move copies), ``logit_rows`` rows of next-token log-probabilities, and whether rows
are cut and re-grown (``regrow``: MH, resample-move).  The inference engines compute theirs in
``llmppl.inference.footprint``; a bare ``lm.start`` checks ``Footprint(rows, tokens)``.
The LM turns a footprint into bytes (:meth:`~llmppl.models.base.LanguageModel.memory_needed`;
``None`` where the backend manages its own memory):

    KV cache  = rows · columns · 2 · Σ_layers kv_heads · head_dim · bytes(dtype)
    logits    = logit_rows · V · 4 bytes · LOGIT_COPIES   (float32 logits, log-softmax, the kept row)

(``V`` the vocabulary; ``columns`` = ``tokens``, + 1 for the static cache's trash column, and
for a dynamic cache whose rows are cut up to ``2·tokens + COMPACT_MARGIN + 1 + regrow``: the
columns a cut masks stay until the cache is compacted).  :func:`check_footprints` sums the needs of every
LM on a device, compares the sum with what the device has free (``torch.cuda.mem_get_info`` on
a GPU, ``MemAvailable`` of ``/proc/meminfo`` on the CPU) and refuses with both numbers, so that
a run too large fails in a second with one clear line instead of being killed by the kernel
after filling the machine.  The models' own weights are already loaded (and counted by the
device as used) when this runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

#: float32 copies of a row of logits alive at once (logits, log-softmax, the state's kept row)
LOGIT_COPIES = 3
#: refuse when the estimate exceeds this fraction of the free memory (fragmentation, activations)
HEADROOM = 0.9
#: a dynamic cache (``HFState``) drops its masked columns (those a cut left behind) only once it
#: is wider than twice its longest row plus this many columns
COMPACT_MARGIN = 32


@dataclass(frozen=True)
class Footprint:
    """What a run holds at its peak on one LM: ``rows`` rows of KV cache of up to ``tokens``
    tokens each (every decoding state alive at once: copies and forks included),
    ``logit_rows`` rows of next-token log-probabilities (default: ``rows``), and ``regrow``:
    0 when rows are never cut, else the most tokens decoded between two re-feeds of cut rows
    (MH's block; the token steps between SMC's moves), which a dynamic cache pays in masked
    columns (see :meth:`columns`).
    ``what`` says whose footprint it is (it goes into the refusal).  ``a + b``: both held at
    once (rows and logit rows add, the longer rows count for all)."""

    rows: int
    tokens: int
    logit_rows: int | None = None
    regrow: int = 0
    what: str = ""

    def __post_init__(self) -> None:
        for name in ("rows", "tokens", "regrow"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"Footprint.{name} must be an int >= 0, got {v!r}")
        if self.logit_rows is None:
            object.__setattr__(self, "logit_rows", self.rows)

    def __add__(self, other: "Footprint") -> "Footprint":
        what = " + ".join(w for w in (self.what, other.what) if w)
        return Footprint(self.rows + other.rows, max(self.tokens, other.tokens),
                         self.logit_rows + other.logit_rows, max(self.regrow, other.regrow), what)

    def columns(self, static: bool = False) -> int:
        """KV columns per row of a cache holding this footprint: a static cache ``tokens`` and
        its trash column; a dynamic one ``tokens``, and when rows are cut up to
        ``2·tokens + COMPACT_MARGIN + 1 + regrow`` (masked columns stay until the cache is wider
        than ``2·longest row + COMPACT_MARGIN``; a re-fed token and the tokens decoded before
        the next re-feed add theirs)."""
        if static:
            return self.tokens + 1
        return 2 * self.tokens + COMPACT_MARGIN + 1 + self.regrow if self.regrow else self.tokens


class NotEnoughMemory(ValueError):
    """A run needs more memory than the device has free."""


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``, or ``ValueError`` naming why this torch cannot use it."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA support" if torch.version.cuda is None
                   else "no CUDA GPU is visible")
            raise ValueError(f"device {str(device)!r} is not available: {why} "
                             f"(torch {torch.__version__}); use --device cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} is not available: "
                             f"{torch.cuda.device_count()} CUDA device(s) visible")
    elif d.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r} is not available: this torch has no MPS backend")
    return d


def kv_bytes_per_token(lm: Any) -> int:
    """Bytes of KV cache one row holds per token (0 when the LM has no transformers config)."""
    model = getattr(lm, "model", None)
    config = getattr(model, "config", None)
    if config is None:
        return 0
    config = getattr(config, "get_text_config", lambda: config)()
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    if not layers or not heads:
        return 0
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    itemsize = torch.empty((), dtype=getattr(lm, "dtype", torch.float32)).element_size()
    return int(2 * layers * kv_heads * head_dim * itemsize)


def _footprint(rows: int | Footprint, tokens: int | None) -> Footprint:
    if isinstance(rows, Footprint):
        if tokens is not None:
            raise ValueError("give a Footprint or rows and tokens, not both")
        return rows
    return Footprint(int(rows), int(tokens or 0))


def estimate_memory(lm: Any, rows: int | Footprint, tokens: int | None = None) -> dict[str, int]:
    """Bytes a run needs on ``lm``: ``{"kv_cache", "logits", "total"}`` for a :class:`Footprint`,
    or for ``rows`` rows of up to ``tokens`` tokens (prompt included) (see the module docstring)."""
    fp = _footprint(rows, tokens)
    kv = fp.rows * fp.columns(bool(getattr(lm, "static_cache", False))) * kv_bytes_per_token(lm)
    logits = int(fp.logit_rows) * int(lm.vocab_size) * 4 * LOGIT_COPIES
    return {"kv_cache": kv, "logits": logits, "total": kv + logits}


def available_memory(device: str | torch.device) -> int | None:
    """Free bytes on ``device`` (None when unknown)."""
    d = torch.device(device)
    if d.type == "cuda":
        return int(torch.cuda.mem_get_info(d)[0])
    if d.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**28 else f"{n / 2**20:.0f} MiB"


def _needed(lm: Any, fp: Footprint) -> dict[str, int] | None:
    """``lm.memory_needed(fp)`` (an LM that is not a ``LanguageModel``: the generic estimate)."""
    method = getattr(lm, "memory_needed", None)
    return method(fp) if method is not None else estimate_memory(lm, fp)


def check_footprints(needs: Sequence[tuple[Any, Footprint]],
                     available: int | None = None) -> dict[str, int]:
    """Raise :class:`NotEnoughMemory` (a ``ValueError``) when what the ``(lm, footprint)`` pairs
    need on one device (summed: a target LM and its draft on one GPU share it) exceeds
    ``HEADROOM`` × that device's free memory (``available``: the free bytes, for every device);
    return the summed estimate otherwise.  LMs whose ``memory_needed`` is ``None`` (a backend
    that sizes its own memory) are not counted."""
    by_device: dict[str, list[tuple[Any, Footprint, dict[str, int]]]] = {}
    total = {"kv_cache": 0, "logits": 0, "total": 0}
    for lm, fp in needs:
        est = _needed(lm, fp)
        if est is None:
            continue
        by_device.setdefault(str(lm.device), []).append((lm, fp, est))
        for k in total:
            total[k] += est[k]
    for device, parts in by_device.items():
        need = sum(est["total"] for _, _, est in parts)
        free = available_memory(device) if available is None else available
        if free is None or need <= HEADROOM * free:
            continue
        described = [f"{lm.name} ({fp.what or 'prompts x particles'}): {fp.rows} rows x {fp.tokens} tokens, "
                     f"about {_gib(est['total'])} (KV cache {_gib(est['kv_cache'])} + logits {_gib(est['logits'])})"
                     for lm, fp, est in parts]
        raise NotEnoughMemory(
            f"a run needs about {_gib(need)} on {device} ({'; '.join(described)}) but {device} has "
            f"{_gib(free)} available: use fewer particles or prompts per batch, or a smaller max_new_tokens")
    return total


def check_memory(lm: Any, rows: int | Footprint, tokens: int | None = None,
                 available: int | None = None) -> dict[str, int]:
    """:func:`check_footprints` of one LM: a :class:`Footprint`, or ``rows`` rows of up to
    ``tokens`` tokens; returns the estimate (:func:`estimate_memory`)."""
    fp = _footprint(rows, tokens)
    est = estimate_memory(lm, fp)
    check_footprints([(lm, fp)], available)
    return est


__all__ = ["Footprint", "NotEnoughMemory", "check_device", "check_footprints", "kv_bytes_per_token", "estimate_memory",
           "available_memory", "check_memory", "LOGIT_COPIES", "HEADROOM", "COMPACT_MARGIN"]
