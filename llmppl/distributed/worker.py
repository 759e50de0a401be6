"""The Ray actor of ``llmppl.distributed``: one model replica running batches of a dataset.

Plain class (``ray.remote`` is applied by the driver, so importing this module does not
import Ray).  Every method returns plain data; a failure inside ``run_batch`` comes back
as ``{"error": "Type: message"}`` rather than an exception, so the driver can tell a
batch that failed (the data) from an actor that died (the machine).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from .. import runner


class DatasetWorker:
    """Builds ``engine_factory()`` and ``target_factory()`` once, then runs batches on them.

    ``threads``: torch intra-op threads of this replica (``None``: torch's default).
    """

    def __init__(self, engine_factory: Callable[[], Any], target_factory: Callable[[], Any],
                 threads: int | None = None) -> None:
        import torch

        if threads:
            torch.set_num_threads(int(threads))
        self.error: str | None = None
        try:
            self.method = engine_factory()
            self.target = target_factory()
            self.target_config = target_factory.config(self.target) if hasattr(target_factory, "config") else {}
        except Exception as exc:  # noqa: BLE001 - reported by describe() as bad input
            self.error = runner.describe_failure(exc)

    def describe(self) -> dict[str, Any]:
        """The method's and the target's config (they go into every record) and this process."""
        import torch

        if self.error is not None:
            return {"error": self.error}
        return {"method_config": dict(getattr(self.method, "config", {}) or {}),
                "target_config": dict(self.target_config), "pid": os.getpid(),
                "threads": torch.get_num_threads(), "device": str(self.target.lm.device)}

    def encode(self, items: list[runner.Item], max_new_tokens: int) -> dict[str, Any]:
        """Every prompt's ids, checked against the context: ``{"ids": ...}`` or ``{"error": ...}``."""
        try:
            return {"ids": runner.encode_items(self.target, items, max_new_tokens)}
        except ValueError as exc:
            return {"error": str(exc)}

    def run(self, batch: runner.Batch, max_new_tokens: int, config: dict[str, Any]) -> dict[str, Any]:
        """``{"index", "records"}`` for the batch's pending prompts, or ``{"index", "error"}``."""
        if self.error is not None:
            return {"index": batch.index, "error": self.error}
        try:
            recs = runner.run_batch_records(self.method, self.target, batch, max_new_tokens, config)
            return {"index": batch.index, "records": recs}
        except Exception as exc:  # noqa: BLE001 - reported to the driver, which decides
            return {"index": batch.index, "error": runner.describe_failure(exc)}
