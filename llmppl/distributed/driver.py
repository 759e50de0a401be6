"""The driver of a distributed dataset run: Ray actors run batches, this process writes the output.

The batches, their seeds, the output store, the resume logic and the record format
are those of :mod:`llmppl.runner` (this module only schedules): batch ``b`` of the input
runs with ``runner.batch_seed(seed, b)`` on whichever actor is free, its records come
back to the driver, which alone appends them to the output (one fsync'd write per
batch).  The output of a run with ``workers=K`` therefore holds the same records as the
single-process ``llmppl run`` (in completion order rather than input order), and either
can resume the other's file.

Faults:

* an actor that dies (killed, OOM, node lost) is replaced by a fresh one and its
  in-flight batch goes back to the front of the queue (at most ``max_restarts``
  replacements in a run, default ``2·workers``; after that the run stops with an error,
  everything written so far kept);
* a batch whose ``run_batch`` raises is re-queued once (it may run on another actor);
  failing ``attempts`` times (default 2) it is written as error records;
* SIGTERM / Ctrl-C: the driver stops dispatching, kills its actors (and the local Ray
  instance it started), and raises ``KeyboardInterrupt``; every record on disk is a
  complete batch, so a rerun resumes.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import runner
from .worker import DatasetWorker


# ------------------------------------------------------------------ cluster
def _host_port(address: str) -> tuple[str, int]:
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--ray-address must be auto, HOST:PORT or ray://HOST:PORT, got {address!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def check_address(address: str, timeout: float = 5.0) -> str:
    """Resolve ``auto`` and check that something listens at the address (within ``timeout`` s).

    Returns the address to hand to ``ray.init``; raises ``ValueError`` naming it when
    nothing answers, rather than letting ``ray.init`` wait for a cluster that is not there.
    """
    target = address
    if address == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address_or_die

            target = canonicalize_bootstrap_address_or_die("auto")
        except Exception as exc:  # noqa: BLE001 - ConnectionError and friends
            raise ValueError(f"--ray-address auto: no running Ray cluster found ({exc}); "
                             "start one with `ray start --head` or omit --ray-address") from None
    host, port = _host_port(target)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise ValueError(f"--ray-address {address}: cannot reach {host}:{port} ({exc})") from None
    return address


#: attempts at starting a local Ray instance: Ray gives its raylet a fixed 30 s to register,
#: which a loaded machine can miss (``Exception: The current node timed out during startup``)
LOCAL_START_ATTEMPTS = 3


def init_local(**kwargs: Any) -> None:
    """``ray.init(address="local", **kwargs)``, tried again (up to ``LOCAL_START_ATTEMPTS``
    times) when the node timed out during startup: a slow machine, not a broken one."""
    import ray

    for attempt in range(LOCAL_START_ATTEMPTS):
        try:
            ray.init(address="local", **kwargs)
            return
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception for this
            if "timed out during startup" not in str(exc) or attempt + 1 == LOCAL_START_ATTEMPTS:
                raise
            ray.shutdown()


def connect(address: str | None = None) -> bool:
    """Connect to the Ray cluster at ``address`` or start a new local one; True if this call started it.

    ``None`` always starts a fresh local instance (even when ``ray start`` runs on this
    machine: join that one with ``"auto"``).  A process already connected to Ray
    (``ray.is_initialized()``) keeps its connection.
    """
    import ray

    if address is not None:
        check_address(address)
    if ray.is_initialized():
        return False
    try:
        if address is None:
            init_local(include_dashboard=False, log_to_driver=True)
        else:
            ray.init(address=address, log_to_driver=True)
    except (ConnectionError, TimeoutError) as exc:
        raise ValueError(f"--ray-address {address}: {exc}") from None
    return True


def resolve_gpus(workers: int, gpus_per_worker: float | None) -> float:
    """GPUs per actor: the given number, checked against the cluster; by default 1 when the
    cluster has a GPU per worker, an even share when it has fewer, 0 without GPUs."""
    import ray

    have = float(ray.cluster_resources().get("GPU", 0.0))
    if gpus_per_worker is None:
        if have <= 0:
            return 0.0
        return 1.0 if have >= workers else have / workers
    if gpus_per_worker < 0:
        raise ValueError(f"--gpus-per-worker must be >= 0, got {gpus_per_worker}")
    want = gpus_per_worker * workers
    if want > have + 1e-9:
        raise ValueError(f"{workers} workers × {gpus_per_worker:g} GPUs per worker = {want:g} GPUs asked, "
                         f"but the Ray cluster has {have:g} GPUs")
    return float(gpus_per_worker)


def default_threads(workers: int, gpus: float) -> int | None:
    """Torch threads per actor on CPU: the cluster's CPUs split evenly (None on GPU)."""
    import ray

    if gpus > 0:
        return None
    cpus = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
    return max(1, cpus // workers)


# ------------------------------------------------------------------ the run
def _items(records: Sequence[Any] | str | Path) -> list[runner.Item]:
    if isinstance(records, (str, Path)):
        return runner.read_items(records)
    records = list(records)
    if records and all(isinstance(r, runner.Item) for r in records):
        return records
    return runner.items_from_records(records)


def run_dataset(engine_factory: Callable[[], Any], target_factory: Callable[[], Any],
                records: Sequence[Any] | str | Path, output: str | Path, *, workers: int,
                max_new_tokens: int = 64, batch_prompts: int = 8, seed: int = 0,
                config: dict[str, Any] | None = None, force: bool = False, progress: bool = True,
                ray_address: str | None = None, gpus_per_worker: float | None = None,
                threads_per_worker: int | None = None, attempts: int = 2, max_restarts: int | None = None,
                time_limit: float | None = None,
                on_event: Callable[[str, dict[str, Any]], None] | None = None) -> runner.RunSummary:
    """Run a dataset on ``workers`` Ray actors, each holding one model replica.

    ``engine_factory()``: builds the method (a ``llmppl.methods.Method``, e.g. a
    ``MethodRecipe``, or any object with ``run_batch(target, prompts, max_new_tokens,
    seed=)``); ``target_factory()``: loads the model and returns the ``Target`` (a
    ``TargetRecipe``, or any picklable callable).  Both run inside each actor.
    ``records``: the input (a JSONL path, ``{"id", "prompt", ...}`` dicts, or
    ``runner.Item`` s).  ``output``: the JSONL written by this driver, exactly as by
    ``llmppl.runner.run_dataset`` (same config check, resume and seeds).
    ``ray_address``: ``None`` starts a local Ray instance (or uses the one this process
    is connected to); ``"auto"``, ``"HOST:PORT"`` or ``"ray://HOST:PORT"`` join a cluster.
    ``gpus_per_worker``: ``num_gpus`` of each actor (see :func:`resolve_gpus`);
    ``threads_per_worker``: torch threads of each actor (default: CPUs split evenly).
    ``on_event(kind, info)``: called in this thread at each step of the run's progress (a
    progress signal for watchdogs and logs): ``"loaded"`` (a replica, or a dead one's
    replacement, has loaded), ``"ready"`` (every replica loaded), ``"dispatched"`` /
    ``"written"`` / ``"retried"`` (a batch sent to a worker, its records written, its failure
    re-queued) and ``"restarted"`` (a dead worker replaced).
    """
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    items = _items(records)
    import ray

    owned = connect(ray_address)
    event = on_event if on_event is not None else (lambda kind, info: None)
    actors: dict[int, Any] = {}
    old_handler = None
    if threading.current_thread() is threading.main_thread():
        def _stop(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt(f"signal {signum}")

        old_handler = signal.signal(signal.SIGTERM, _stop)
    try:
        gpus = resolve_gpus(workers, gpus_per_worker)
        if gpus > 0 and hasattr(target_factory, "on_device"):
            target_factory = target_factory.on_device("cuda")
        threads = threads_per_worker if threads_per_worker is not None else default_threads(workers, gpus)
        remote = ray.remote(DatasetWorker)
        run_id = uuid.uuid4().hex[:8]
        spawned = 0

        def spawn() -> Any:
            nonlocal spawned
            handle = remote.options(name=f"llmppl-worker-{run_id}-{spawned}", num_gpus=gpus,
                                    max_concurrency=1).remote(
                engine_factory, target_factory, threads)
            spawned += 1
            return handle

        for i in range(workers):
            actors[i] = spawn()
        loads = {a.describe.remote(): i for i, a in actors.items()}  # replicas load in parallel
        described: dict[int, dict[str, Any]] = {}
        while loads:
            done, _ = ray.wait(list(loads), num_returns=1)
            for ref in done:
                i = loads.pop(ref)
                described[i] = d = ray.get(ref)
                if "error" in d:
                    raise ValueError(f"a worker failed to build the method or the model: {d['error']}")
                event("loaded", {"worker": i})
        event("ready", {"workers": len(described)})
        first = described[0]
        cfg = runner.run_config(first["method_config"], max_new_tokens, batch_prompts, seed,
                                {**first["target_config"], **(config or {})})
        plan = runner.plan_dataset(items, output, cfg, max_new_tokens=max_new_tokens,
                                   batch_prompts=batch_prompts, seed=seed, force=force)
        todo = [it for b in plan.batches for it in b.items]
        if todo:  # every prompt checked against the context before any compute
            enc = ray.get(actors[0].encode.remote(todo, max_new_tokens))
            if "error" in enc:
                raise ValueError(enc["error"])
            k = 0
            for b in plan.batches:
                b.prompt_ids, k = enc["ids"][k:k + len(b.items)], k + len(b.items)
        return _schedule(plan, actors, spawn, max_new_tokens, attempts,
                         2 * workers if max_restarts is None else max_restarts, progress, time_limit, event)
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
        for a in actors.values():
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - already dead
                pass
        if owned:
            ray.shutdown()


def _schedule(plan: runner.Plan, actors: dict[int, Any], spawn: Callable[[], Any], max_new_tokens: int,
              attempts: int, max_restarts: int, progress: bool, time_limit: float | None,
              event: Callable[[str, dict[str, Any]], None] = lambda kind, info: None) -> runner.RunSummary:
    """Hand batches to idle actors, write each batch's records as they come back."""
    import ray
    from ray.exceptions import RayError, RayTaskError

    queue = deque(plan.batches)
    idle = deque(actors)
    inflight: dict[Any, tuple[int, runner.Batch]] = {}
    loading: dict[Any, int] = {}   # a replacement's describe() call: done once its replica is loaded
    failures: Counter[int] = Counter()
    restarts = written = errors = 0
    bar = runner.Progress(plan.total, plan.done, progress)
    t0 = time.monotonic()
    try:
        while queue or inflight:
            if time_limit is not None and time.monotonic() - t0 > time_limit:
                queue.clear()  # finish what is in flight, start nothing new
            while queue and idle:
                slot, b = idle.popleft(), queue.popleft()
                inflight[actors[slot].run.remote(b, max_new_tokens, plan.config)] = (slot, b)
                event("dispatched", {"batch": b.index, "worker": slot})
            if not inflight:
                break
            ready, _ = ray.wait(list(inflight) + list(loading), num_returns=1, timeout=1.0)
            for ref in ready:
                if ref in loading:
                    slot = loading.pop(ref)
                    try:
                        ray.get(ref)
                        event("loaded", {"worker": slot})
                    except RayError:  # died while loading: its batch's call reports it
                        pass
                    continue
                slot, b = inflight.pop(ref)
                try:
                    out = ray.get(ref)
                except RayTaskError as exc:  # the call itself failed (not run_batch): count as a failure
                    out = {"index": b.index, "error": f"{type(exc).__name__}: {exc}"}
                except RayError as exc:  # the actor died: replace it, run its batch again
                    restarts += 1
                    if restarts > max_restarts:
                        raise RuntimeError(f"{restarts} workers died in this run (last: {exc}); stopping. "
                                           "Everything written so far is kept: rerun to resume.") from None
                    actors[slot] = spawn()
                    loading[actors[slot].describe.remote()] = slot   # runs before the batch (in order)
                    queue.appendleft(b)
                    idle.append(slot)
                    event("restarted", {"batch": b.index, "worker": slot, "restarts": restarts})
                    continue
                idle.append(slot)
                if "error" in out:
                    failures[b.index] += 1
                    if failures[b.index] < attempts:
                        queue.append(b)
                        event("retried", {"batch": b.index, "error": out["error"]})
                        continue
                    recs = runner.error_records(b, out["error"], plan.config)
                else:
                    recs = out["records"]
                plan.store.write(recs)
                written += len(recs)
                errors += sum(r["error"] is not None for r in recs)
                bar.update(recs, {"workers": len(actors)})
                event("written", {"batch": b.index, "records": len(recs)})
    finally:
        bar.close()
    return runner.RunSummary(written, plan.done, plan.total, errors, time.monotonic() - t0, bar.tokens, restarts)
