"""Throughput and latency of ``llmppl serve`` under concurrent clients (writes JSON).

Starts ``llmppl serve`` on the default model in a subprocess (127.0.0.1, a free port), then drives
it with the official ``openai`` client from threads:

* for each concurrency ``c`` in ``--concurrency`` (default 1, 8, 32): ``max(c, --min-requests)``
  requests, ``c`` at a time; requests/s and p50 / p95 latency, and from the server's ``/health``
  counters how many ``run_batch`` calls served them;
* ``--pair`` requests (default 8) sent all at once against the same requests sent one after the
  other, interleaved ``--reps`` times; ``ratio`` = concurrent / sequential wall time (median).

Every request: SMC, ``--particles`` particles, ``--max-tokens`` tokens, ``alpha`` 4, a chat prompt.

    OMP_NUM_THREADS=1 python benchmarks/serve_bench.py --out benchmarks/results/serve_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai

from llmppl.benchmarking.engine import machine_info

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Write a short poem about the sea.", "Describe a sunrise in two sentences.",
           "Give three tips for learning to cook.", "Explain why the sky is blue.",
           "Name three primary colors and say why.", "Write a haiku about autumn leaves.",
           "What is a good name for a cat?", "Summarise the plot of a fairy tale."]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _git_describe() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def start_server(args: argparse.Namespace, port: int, log: Any) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "llmppl.cli", "serve", "--port", str(port), "--particles", str(args.particles),
           "--max-new-tokens", str(args.max_tokens), "--alpha", "4", "--queue-size", "256",
           "--max-batch-prompts", str(args.max_batch_prompts), "--log-level", "warning"]
    if args.model:
        cmd += ["--model", args.model]
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=log)


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 300.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("llmppl serve exited during start-up")
        try:
            r = httpx.get(base + "/health", timeout=2)
            if r.status_code == 200:
                return r.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"llmppl serve not ready within {timeout} s")


def one_request(client: openai.OpenAI, model: str, i: int) -> float:
    t0 = time.perf_counter()
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                       )
    if not r.choices:
        raise RuntimeError("empty response")
    return time.perf_counter() - t0


def run_wave(client: openai.OpenAI, model: str, n: int, concurrency: int, offset: int = 0) -> tuple[float, list[float]]:
    """``n`` requests with ``concurrency`` in flight; (wall seconds, per-request latencies)."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        lat = list(pool.map(lambda i: one_request(client, model, offset + i), range(n), timeout=1800))
    return time.perf_counter() - t0, lat


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def stats(base: str) -> dict[str, Any]:
    return httpx.get(base + "/health", timeout=10).json()["stats"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--particles", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--min-requests", type=int, default=4, help="requests per concurrency level at least")
    p.add_argument("--pair", type=int, default=8, help="requests in the concurrent-vs-sequential comparison")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--max-batch-prompts", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the server")
    p.add_argument("--code", default=None, help="which code was measured (default: git describe of this checkout)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_cpu.json"))
    args = p.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    proc = start_server(args, port, log)
    try:
        t0 = time.perf_counter()
        health = wait_ready(base, proc)
        startup = time.perf_counter() - t0
        model = health["model"]
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=1800)
        one_request(client, model, 0)  # warm-up
        out: dict[str, Any] = {
            "benchmark": "serve", "code": args.code or _git_describe(), "model": model, "method": "smc",
            "alpha": 4.0, "particles": args.particles, "max_tokens": args.max_tokens,
            "load_average_start": os.getloadavg(), "server_startup_seconds": startup, "levels": {},
        }
        for c in levels:
            n = max(c, args.min_requests)
            before = stats(base)
            wall, lat = run_wave(client, model, n, c, offset=1000 * c)
            after = stats(base)
            calls = after["batches"] - before["batches"]
            out["levels"][str(c)] = {
                "requests": n, "concurrency": c, "wall_seconds": wall, "requests_per_second": n / wall,
                "p50_latency_seconds": statistics.median(lat), "p95_latency_seconds": percentile(lat, 0.95),
                "run_batch_calls": calls, "mean_requests_per_batch": (after["batched_requests"]
                                                                      - before["batched_requests"]) / max(calls, 1),
                "tokens_decoded": after["tokens_decoded"] - before["tokens_decoded"],
            }
            print(f"concurrency {c}: {n / wall:.2f} req/s, p50 {statistics.median(lat):.2f} s, "
                  f"p95 {percentile(lat, 0.95):.2f} s, {calls} run_batch calls", file=sys.stderr)
        seq, conc = [], []
        for r in range(args.reps):  # interleaved: load drifts affect both sides alike
            seq.append(run_wave(client, model, args.pair, 1, offset=50_000 + r)[0])
            conc.append(run_wave(client, model, args.pair, args.pair, offset=50_000 + r)[0])
        out["pair"] = {"requests": args.pair, "sequential_seconds": seq, "concurrent_seconds": conc,
                       "ratios": [c / s for c, s in zip(conc, seq)],
                       "ratio": statistics.median(c / s for c, s in zip(conc, seq))}
        print(f"{args.pair} concurrent / {args.pair} sequential: {out['pair']['ratio']:.2f}", file=sys.stderr)
        import torch

        out["machine"] = {"platform": platform.platform(), "cpu_model": machine_info("cpu").get("cpu_model"),
                          "processor": platform.processor() or platform.machine(),
                          "cpu_count": os.cpu_count(), "torch": torch.__version__, "server_threads": args.threads,
                          "python": sys.version.split()[0], "device": "cpu", "load_average_end": os.getloadavg()}
        out["server_stats"] = stats(base)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
