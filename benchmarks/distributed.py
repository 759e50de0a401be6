"""Dataset throughput: the single-process runner vs Ray with 1 and 2 workers (interleaved reps).

    PYTHONPATH=. python benchmarks/distributed.py --out benchmarks/results/distributed_cpu.json

Every configuration runs the same JSONL (``--prompts`` text prompts) with the same method,
``--batch-prompts`` and seed, into a fresh output file; the configurations alternate within
each rep so drifting machine load hits all alike.  Timed: ``seconds`` = the run loop
(``RunSummary.seconds``: first batch dispatched to last record written, every replica loaded) and ``wall`` = the whole call (model
loading, actor start-up, input checks).  Every process (the single-process runner, each Ray
worker) runs torch on ``--threads`` threads (default 1: on a small shared box, several torch
threads per process oversubscribe the cores and spin), so 2 workers use twice the cores of 1.
One local Ray instance serves all the Ray runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import llmppl as pp
from llmppl import runner
from llmppl.benchmarking.engine import machine_info
from llmppl.methods import MethodRecipe, TargetRecipe

def cpu_model() -> str:
    return machine_info("cpu").get("cpu_model") or platform.processor() or platform.machine()


WORDS = ["sea", "mountain", "city", "forest", "river", "desert", "winter", "night"]


def _args(ns: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(method="smc", particles=ns.particles, alpha=4.0, max_new_tokens=ns.max_new_tokens,
                              resampling="systematic", ess_threshold=0.5, block_size=None, n_mcmc=2, top_k=4,
                              rollouts=2, horizon=8, tau=None, model=None, no_chat=False, device="cpu",
                              dtype=None, backend="hf")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--particles", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--batch-prompts", type=int, default=4)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs of the local Ray instance")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--out", default="benchmarks/results/distributed_cpu.json")
    ns = p.parse_args()
    import ray

    rows = [{"id": i, "prompt": f"Write one sentence about the {WORDS[i % len(WORDS)]}."} for i in range(ns.prompts)]
    items = runner.items_from_records(rows)
    args = _args(ns)
    recipe = MethodRecipe.from_args(args)
    target_recipe = TargetRecipe.from_args(args, sharpened=recipe.sharpened)
    kw = dict(max_new_tokens=ns.max_new_tokens, batch_prompts=ns.batch_prompts, seed=0, progress=False)
    load_before = os.getloadavg()
    t = time.perf_counter()
    ray.init(address="local", num_cpus=ns.cpus, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t

    def single(out: Path):
        torch.set_num_threads(ns.threads)
        method, target = recipe(), target_recipe()
        return runner.run_dataset(method, target, items, out, config=target_recipe.config(target), **kw)

    def ray_run(k: int):
        def go(out: Path):
            return pp.distributed.run_dataset(recipe, target_recipe, items, out, workers=k,
                                              threads_per_worker=ns.threads, **kw)
        return go

    configs = {"single_process": single, "ray_1_worker": ray_run(1), "ray_2_workers": ray_run(2)}
    runs: dict[str, list[dict]] = {k: [] for k in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(ns.reps):
            for name, fn in configs.items():
                out = Path(tmp) / f"{name}_{rep}.jsonl"
                t = time.perf_counter()
                s = fn(out)
                wall = time.perf_counter() - t
                assert s.done == ns.prompts and s.errors == 0, s
                runs[name].append({"seconds": s.seconds, "wall": wall, "tokens": s.tokens,
                                   "prompts_per_s": ns.prompts / s.seconds, "tokens_per_s": s.tokens / s.seconds})
                print(f"rep {rep} {name}: {s.seconds:.1f} s loop, {wall:.1f} s wall, "
                      f"{s.tokens / s.seconds:.1f} tok/s", file=sys.stderr)
    ray.shutdown()
    med = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    result = {
        "benchmark": "distributed_runner",
        "command": "PYTHONPATH=. python benchmarks/distributed.py " + " ".join(sys.argv[1:]),
        "model": "smollm2-135m-instruct", "method": "smc", "particles": ns.particles,
        "max_new_tokens": ns.max_new_tokens, "prompts": ns.prompts, "batch_prompts": ns.batch_prompts,
        "reps": ns.reps, "cpus_used": ns.cpus,
        "torch_threads_per_process": ns.threads,
        "ray_version": ray.__version__, "ray_local_start_seconds": ray_start,
        "runs": runs,
        "median_loop_seconds": med,
        "median_tokens_per_s": {k: statistics.median(r["tokens_per_s"] for r in v) for k, v in runs.items()},
        "speedup_2_vs_1_worker": med["ray_1_worker"] / med["ray_2_workers"],
        "ray_1_worker_vs_single_process": med["ray_1_worker"] / med["single_process"],
        "machine": {"platform": platform.platform(), "processor": cpu_model(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": sys.version.split()[0],
                    "load_average_before": load_before, "load_average_after": os.getloadavg(),
                    "note": f"{os.cpu_count()}-core {cpu_model()} shared with other jobs: 2 workers cannot "
                            "beat 1 by more than the cores allow, and load from other jobs adds noise"},
    }
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_loop_seconds", "median_tokens_per_s",
                                             "speedup_2_vs_1_worker", "ray_1_worker_vs_single_process")},
                     indent=2))


if __name__ == "__main__":
    main()
