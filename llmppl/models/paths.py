"""Where llmppl keeps what it converts or downloads (imports nothing from llmppl)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$LLMPPL_CACHE`` or ``$XDG_CACHE_HOME/llmppl`` (default ``~/.cache/llmppl``)."""
    root = os.environ.get("LLMPPL_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llmppl"
