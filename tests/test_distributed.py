"""``llmppl run --workers K`` / ``pp.distributed.run_dataset`` on a real local Ray cluster.

Two workers, the default model, 20 prompts: every id exactly once; an actor killed
mid-run (``ray.kill``); the driver stopped by SIGTERM and then SIGKILLed mid-run, and
a rerun completing the file; records equal to the single-process ``llmppl run`` with
the same ``--batch-prompts`` and ``--seed`` (torch pinned to one thread in both).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

import llmppl as pp  # noqa: E402
from llmppl.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N = 20
RUN = ["--method", "smc", "--particles", "2", "--max-new-tokens", "4", "--batch-prompts", "2",
       "--seed", "5", "--threads", "1", "--quiet"]

pytestmark = pytest.mark.model


def _rows():
    rows = [{"id": f"p{i:02d}", "prompt": f"Give one word that rhymes with {w}.", "i": i}
            for i, w in enumerate(["cat", "dog", "sun", "tree", "blue"] * 4)]
    rows[7]["prompt"] = [{"role": "user", "content": "Name a fruit."}]
    return rows


def _strip(rec):
    rec = dict(rec)
    rec["stats"] = {k: v for k, v in rec["stats"].items() if k not in ("wall_time", "peak_memory")}
    return rec


def _by_id(path: Path) -> dict:
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    ids = [r["id"] for r in recs]
    assert len(ids) == len(set(ids)), "a duplicated id"
    return {r["id"]: _strip(r) for r in recs}


@pytest.fixture(scope="module")
def cluster():
    """One local Ray instance for the in-process tests (the CLI and run_dataset join it)."""
    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), env_path]) if env_path else str(ROOT)
    from llmppl.distributed.driver import init_local

    init_local(num_cpus=2, include_dashboard=False, log_to_driver=False)  # tried again when Ray's start times out
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    inp = d / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    return d, inp


@pytest.fixture(scope="module")
def reference(data):
    """The single-process ``llmppl run`` of the input (torch on one thread)."""
    d, inp = data
    out = d / "single.jsonl"
    n = torch.get_num_threads()
    try:
        assert main(["run", "--input", str(inp), "--output", str(out), *RUN]) == 0
    finally:
        torch.set_num_threads(n)
    recs = _by_id(out)
    assert sorted(recs) == [f"p{i:02d}" for i in range(N)]
    return recs


def test_two_workers_write_every_id_once_and_the_single_process_records(cluster, data, reference):
    d, inp = data
    out = d / "two.jsonl"
    assert main(["run", "--input", str(inp), "--output", str(out), "--workers", "2", *RUN]) == 0
    got = _by_id(out)
    assert sorted(got) == sorted(reference)
    assert got == reference
    assert got["p07"]["i"] == 7 and got["p07"]["error"] is None


#: a run with no progress for this long has hung.  Progress: a record written, an event of the
#: driver (``run_dataset(on_event=...)``: a replica loaded, a batch dispatched or written, a
#: worker replaced) or CPU time used by the Ray workers (a replica loading or a batch running on
#: a loaded machine is slow, not stalled; a worker blocked forever uses none)
STALL = 240.0
#: CPU seconds the Ray workers must use in a CPU_WINDOW-second window to count as progress
#: (a worker blocked in a sleep or a lock uses ~0.005 s; one loading the model on a 2-core
#: machine at load 20 about 0.4 s)
CPU_PROGRESS, CPU_WINDOW = 0.1, 5.0


class WorkerCPU:
    """CPU seconds used by this test's Ray worker processes (actors, tasks, idle workers: any
    descendant whose command line is a Ray worker's, not Ray's own daemons) since creation,
    counted per process so that a killed worker's time is not lost."""

    def __init__(self) -> None:
        self.seen: dict[int, float] = {}

    def total(self) -> float:
        import psutil

        for proc in psutil.Process().children(recursive=True):
            try:
                cmd = " ".join(proc.cmdline())
                if cmd.startswith("ray::") or "default_worker.py" in cmd:
                    t = proc.cpu_times()
                    self.seen[proc.pid] = max(self.seen.get(proc.pid, 0.0), t.user + t.system)
            except psutil.Error:  # gone meanwhile
                pass
        return sum(self.seen.values())


class Watchdog:
    """Progress of a run (events, output lines, the workers' CPU time: see ``STALL``);
    :meth:`wait` fails when none moves for ``stall`` seconds."""

    def __init__(self, out: Path, stall: float = STALL) -> None:
        self.out, self.stall = out, stall
        self.events: list[str] = []
        self.last = time.monotonic()
        self._lines = 0
        self.cpu = WorkerCPU()
        self._cpu_at, self._cpu = time.monotonic(), self.cpu.total()
        self.cpu_windows = 0     # windows in which the workers' CPU time counted as progress

    def __call__(self, kind: str, info: dict) -> None:
        self.events.append(kind)
        self.last = time.monotonic()

    def lines(self) -> int:
        n = self.out.read_text().count("\n") if self.out.exists() else 0
        if n != self._lines:
            self._lines, self.last = n, time.monotonic()
        return n

    def _busy(self) -> None:
        now = time.monotonic()
        if now - self._cpu_at < CPU_WINDOW:
            return
        cpu = self.cpu.total()
        if cpu - self._cpu >= CPU_PROGRESS:
            self.last = now
            self.cpu_windows += 1
        self._cpu_at, self._cpu = now, cpu

    def check(self) -> None:
        """AssertionError when nothing moved for ``stall`` seconds."""
        self.lines()
        self._busy()
        quiet = time.monotonic() - self.last
        assert quiet < self.stall, (f"the run stalled: no progress for {quiet:.0f} s (events so far: "
                                    f"{self.events}, {self._lines} lines written, workers busy in "
                                    f"{self.cpu_windows} windows of {CPU_WINDOW:g} s)")

    def wait(self, th: threading.Thread, tick=None) -> None:
        """Until ``th`` ends (``tick(self)`` every 20 ms); AssertionError on a stall."""
        while th.is_alive():
            if tick is not None:
                tick(self)
            self.check()
            th.join(timeout=0.02)


def _in_thread(run):
    """``run()`` in a daemon thread; the box gets its value or exception."""
    box: dict = {}

    def target():
        try:
            box["v"] = run()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            box["exc"] = exc

    th = threading.Thread(target=target, daemon=True)
    th.start()
    return th, box


def _ids_in_flight_kill(out: Path, run, kill):
    """Run ``run(on_event)`` in a thread; once two records are on disk call ``kill()``; return
    run's value.  No deadline: a stall (no progress for ``STALL`` s) fails, a slow machine does not."""
    dog = Watchdog(out)
    th, box = _in_thread(lambda: run(dog))
    killed = []

    def tick(d: Watchdog) -> None:
        if not killed and d.lines() >= 2:
            kill()
            killed.append(True)

    dog.wait(th, tick)
    if "exc" in box:
        raise box["exc"]
    assert killed, "the run finished before the kill"
    assert "restarted" in dog.events and "loaded" in dog.events[dog.events.index("restarted"):], dog.events
    return box["v"]


def test_an_actor_killed_mid_run_is_replaced_and_nothing_is_lost(cluster, data, reference):
    d, inp = data
    out = d / "killed_actor.jsonl"
    args = argparse.Namespace(method="smc", particles=2, alpha=4.0, max_new_tokens=4, resampling="systematic",
                              ess_threshold=0.5, block_size=None, n_mcmc=2, top_k=4, rollouts=2, horizon=8,
                              tau=None, model=None, no_chat=False, device="cpu", dtype=None, backend="hf")
    recipe = pp.distributed.MethodRecipe.from_args(args)
    target = pp.distributed.TargetRecipe.from_args(args, sharpened=recipe.sharpened)

    def run(on_event):
        return pp.distributed.run_dataset(recipe, target, inp, out, workers=2, max_new_tokens=4,
                                          batch_prompts=2, seed=5, threads_per_worker=1, progress=False,
                                          on_event=on_event)

    def named():
        return {(a["name"], a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("llmppl-worker-")}

    earlier = named()  # actors of earlier runs (killed; may still be listed for a moment)

    def kill():
        name, namespace = sorted(named() - earlier)[0]
        ray.kill(ray.get_actor(name, namespace=namespace))

    summary = _ids_in_flight_kill(out, run, kill)
    assert summary.restarts >= 1 and summary.done == N
    assert _by_id(out) == reference


def test_the_watchdog_fails_a_run_whose_worker_hangs(cluster, tmp_path):
    """The stall guard of the kill test catches a real hang in bounded time: a worker that
    sleeps forever inside a batch (the driver waits on it, nothing is written) fails the
    watchdog ``stall`` seconds after the last progress; killing the worker ends the run."""
    def engine_factory():
        class Hangs:  # local: pickled by value into the actor
            config = {"method": "hangs"}

            def run_batch(self, target, prompts, max_new_tokens, seed=None):
                if [3, 0] in prompts:
                    time.sleep(3600)
                return pp.baselines.Plain(n=1).run_batch(target, prompts, max_new_tokens, seed=seed)

        return Hangs()

    def target_factory():
        return pp.Target(pp.models.NGramLM(vocab_size=5, seed=1))

    rows = [{"id": i, "prompt": [i % 4, i // 4]} for i in range(4)]  # [3, 0] is id 3, batch 1
    out = tmp_path / "hang.jsonl"
    dog = Watchdog(out)
    th, box = _in_thread(lambda: pp.distributed.run_dataset(
        engine_factory, target_factory, rows, out, workers=1, max_new_tokens=3, batch_prompts=2, seed=0,
        progress=False, max_restarts=0, on_event=dog))

    def short_once_running(d: Watchdog) -> None:   # the actor's start may take long on a loaded machine
        if "written" in d.events:
            d.stall = 10.0

    with pytest.raises(AssertionError, match="the run stalled: no progress for 1[0-9] s"):
        dog.wait(th, short_once_running)
    caught = time.monotonic() - dog.last
    assert 10.0 <= caught < 20.0 and th.is_alive()
    t0 = time.monotonic()
    assert dog.events[-1] == "dispatched" and "written" in dog.events      # batch 0 done, batch 1 hangs
    for a in ray.util.list_named_actors(all_namespaces=True):   # end the hang: the run stops
        if a["name"].startswith("llmppl-worker-"):
            try:
                ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]))
            except ValueError:  # already gone
                pass
    th.join(timeout=60)
    assert not th.is_alive() and isinstance(box.get("exc"), RuntimeError), box
    assert time.monotonic() - t0 < 60   # the hang ended by killing its worker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_cluster_requests_fail_fast(cluster, data, capsys):
    d, inp = data
    base = ["run", "--input", str(inp), "--output", str(d / "bad.jsonl"), "--quiet"]
    t0 = time.monotonic()
    assert main([*base, "--workers", "2", "--gpus-per-worker", "1"]) == 2
    assert "2 workers × 1 GPUs per worker = 2 GPUs asked, but the Ray cluster has 0 GPUs" in capsys.readouterr().err
    port = _free_port()
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        assert main([*base, "--workers", "2", "--ray-address", address]) == 2
        assert f"--ray-address {address}: cannot reach 127.0.0.1:{port}" in capsys.readouterr().err
    assert main([*base, "--workers", "0"]) == 2
    assert "--workers must be >= 1, got 0" in capsys.readouterr().err
    assert time.monotonic() - t0 < 15
    assert not (d / "bad.jsonl").exists()


def test_a_batch_failing_twice_is_written_as_error_records(cluster, tmp_path):
    def engine_factory():
        class Flaky:  # local: pickled by value into the actors
            config = {"method": "flaky"}

            def run_batch(self, target, prompts, max_new_tokens, seed=None):
                if [3, 0] in prompts:
                    raise RuntimeError("bad prompt [3, 0]")
                return pp.baselines.Plain(n=2).run_batch(target, prompts, max_new_tokens, seed=seed)

        return Flaky()

    def target_factory():
        return pp.Target(pp.models.NGramLM(vocab_size=5, seed=1))

    rows = [{"id": i, "prompt": [i % 4, i // 4]} for i in range(8)]  # [3, 0] is id 3, batch 1
    out = tmp_path / "o.jsonl"
    s = pp.distributed.run_dataset(engine_factory, target_factory, rows, out, workers=2, max_new_tokens=3,
                                   batch_prompts=2, seed=0, progress=False)
    recs = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(recs) == list(range(8)) and s.errors == 2
    assert recs[2]["error"] == recs[3]["error"] == "RuntimeError: bad prompt [3, 0]"
    assert all(recs[i]["error"] is None and len(recs[i]["samples"]) == 2 for i in (0, 1, 4, 5, 6, 7))


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _driver(inp: Path, out: Path) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "llmppl.cli", "run", "--input", str(inp), "--output", str(out),
                             "--workers", "2", *RUN], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for_lines(proc: subprocess.Popen, out: Path, n: int, stall: float = STALL) -> bool:
    """Until ``out`` has ``n`` lines: False when the driver exits first or stalls (no line
    written and its Ray workers idle for ``stall`` seconds: a hang, not a slow machine)."""
    dog = Watchdog(out, stall)
    while proc.poll() is None:
        if dog.lines() >= n:
            return True
        try:
            dog.check()
        except AssertionError:
            return False
        time.sleep(0.02)
    return False


def test_driver_sigterm_then_sigkill_mid_run_and_a_rerun_completes(cluster, data, reference):
    d, inp = data
    out = d / "killed_driver.jsonl"
    # SIGTERM: the driver stops its workers, exits 130 and leaves whole batches only
    proc = _driver(inp, out)
    assert _wait_for_lines(proc, out, 2), proc.stderr.read().decode()[-3000:] if proc.poll() is not None else "slow"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130, proc.stderr.read().decode()[-3000:]
    after_term = out.read_text()
    assert after_term.endswith("\n") and 2 <= len(after_term.splitlines()) < N
    assert {k: reference[k] for k in _by_id(out)} == _by_id(out)
    # SIGKILL: nothing cleans up; the records on disk stay, a torn line at most
    proc = _driver(inp, out)
    assert _wait_for_lines(proc, out, len(after_term.splitlines()) + 2)
    children = _descendants(proc.pid)
    proc.kill()
    proc.wait(timeout=30)
    time.sleep(2)
    for c in children:  # Ray processes this driver started and that did not follow it down
        try:
            c.kill()
        except Exception:  # noqa: BLE001 - already gone
            pass
    text = out.read_text()
    before = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]  # minus a torn line
    assert before[:len(after_term.splitlines())] == after_term.splitlines()
    assert main(["run", "--input", str(inp), "--output", str(out), "--workers", "2", *RUN]) == 0
    lines = out.read_text().splitlines()
    assert lines[:len(before)] == before
    assert _by_id(out) == reference
