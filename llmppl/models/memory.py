"""How much memory a decoding run needs, checked before it starts (and the device it runs on).

A run of ``R`` rows (prompts × particles or chains) and ``L`` tokens per row (the longest
prompt plus ``max_new_tokens``) holds, at its peak,

    KV cache  = R · L · 2 · Σ_layers kv_heads · head_dim · bytes(dtype)
    logits    = R · V · 4 bytes · LOGIT_COPIES        (float32 logits, log-softmax, the kept row)

(``V`` the vocabulary).  :func:`check_memory` compares the sum with what the device has free
(``torch.cuda.mem_get_info`` on a GPU, ``MemAvailable`` of ``/proc/meminfo`` on the CPU)
and refuses with both numbers, so that a run too large fails in a second with one clear
line instead of being killed by the kernel after filling the machine.  The model's own
weights are already loaded (and counted by the device as used) when this runs.
"""

from __future__ import annotations

from typing import Any

import torch

#: float32 copies of a row of logits alive at once (logits, log-softmax, the state's kept row)
LOGIT_COPIES = 3
#: refuse when the estimate exceeds this fraction of the free memory (fragmentation, activations)
HEADROOM = 0.9


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


def estimate_memory(lm: Any, rows: int, tokens: int) -> dict[str, int]:
    """Bytes a run of ``rows`` rows of up to ``tokens`` tokens (prompt included) needs:
    ``{"kv_cache", "logits", "total"}`` (see the module docstring)."""
    kv = int(rows) * int(tokens) * kv_bytes_per_token(lm)
    logits = int(rows) * int(lm.vocab_size) * 4 * LOGIT_COPIES
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


def check_memory(lm: Any, rows: int, tokens: int, available: int | None = None) -> dict[str, int]:
    """Raise :class:`NotEnoughMemory` (a ``ValueError``) when :func:`estimate_memory` exceeds
    ``HEADROOM`` × the free memory of the LM's device; return the estimate otherwise."""
    est = estimate_memory(lm, rows, tokens)
    free = available_memory(lm.device) if available is None else available
    if free is not None and est["total"] > HEADROOM * free:
        raise NotEnoughMemory(
            f"a run of {rows} rows (prompts x particles) x {tokens} tokens on {lm.name} needs about "
            f"{_gib(est['total'])} (KV cache {_gib(est['kv_cache'])} + logits {_gib(est['logits'])}) "
            f"but {lm.device} has {_gib(free)} available: use fewer particles or prompts per batch, "
            f"or a smaller max_new_tokens")
    return est


__all__ = ["NotEnoughMemory", "check_device", "kv_bytes_per_token", "estimate_memory",
           "available_memory", "check_memory", "LOGIT_COPIES", "HEADROOM"]
