"""Datasets on Ray: many model replicas, one output, nothing lost (``pip install llmppl[ray]``).

``run_dataset(engine_factory, target_factory, records, output, workers=K, ...)`` starts
(or joins) a Ray cluster, creates ``K`` actors (:class:`DatasetWorker`, named
``llmppl-worker-<run>-<i>``), each building one model replica with ``target_factory()``
and one engine with ``engine_factory()``, hands them the batches of
``llmppl.runner`` and writes what comes back to ``output`` — same records, same
seeds, same resume as the single-process runner.  The CLI is
``llmppl run ... --workers K [--ray-address auto|HOST:PORT|ray://HOST:PORT]
[--gpus-per-worker G]``.  Ray is imported only when a distributed run starts.

``MethodRecipe`` / ``TargetRecipe`` (from ``llmppl.methods``) are picklable factories
built from the CLI's options.
"""

from ..methods import MethodRecipe, TargetRecipe
from .driver import check_address, connect, resolve_gpus, run_dataset
from .worker import DatasetWorker

__all__ = ["run_dataset", "DatasetWorker", "MethodRecipe", "TargetRecipe", "check_address", "connect",
           "resolve_gpus"]
