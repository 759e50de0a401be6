"""The engine's overhead, this working tree against an earlier commit, in one interleaved sitting.

``llmppl bench overhead`` times ``pp.SMC.run_batch`` against the model's own cached forward loop
(a ratio measured inside one process, so the machine's speed cancels).  This script runs that
benchmark alternately for a base commit (a detached ``git worktree``) and for the working tree,
``--runs`` times each (A B A B …), and reports per block size the median of each version's
``paired_median_ratio`` and their quotient (new / base: below 1 is faster).

    python benchmarks/overhead_ab.py --base f33e52a --runs 3 -- --config tiny --prompts 16 \\
        --particles 16 --max-new-tokens 32 --reps 5 --blocks 1,8,32

Writes ``benchmarks/results/overhead_ab_cpu.json`` (``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench(code: Path, args: list[str]) -> dict:
    """One ``llmppl bench overhead`` run with ``code`` first on the import path."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        env = dict(os.environ, PYTHONPATH=str(code), HF_HUB_OFFLINE="1")
        subprocess.run([sys.executable, "-m", "llmppl.cli", "bench", "overhead", *args, "--json", out.name],
                       cwd=code, env=env, check=True, stdout=subprocess.DEVNULL)
        return json.loads(Path(out.name).read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the git commit to compare against")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json", default=str(ROOT / "benchmarks/results/overhead_ab_cpu.json"))
    p.add_argument("bench_args", nargs="*", help="arguments of `llmppl bench overhead` (after --)")
    a = p.parse_args()
    base_dir = Path(tempfile.mkdtemp(prefix="llmppl-base-"))
    subprocess.run(["git", "worktree", "add", "--detach", "-f", str(base_dir), a.base], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs: dict[str, list[dict]] = {"base": [], "new": []}
    try:
        for _ in range(a.runs):
            runs["base"].append(bench(base_dir, a.bench_args))
            runs["new"].append(bench(ROOT, a.bench_args))
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base_dir)], cwd=ROOT,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    blocks = list(runs["new"][0]["by_block"])
    out: dict = {"benchmark": "engine_overhead_ab", "base": a.base,
                 "new": runs["new"][0].get("machine", {}).get("llmppl"),
                 "command": f"python benchmarks/overhead_ab.py --base {a.base} --runs {a.runs} -- "
                            + " ".join(a.bench_args),
                 "machine": runs["new"][0].get("machine"), "by_block": {}}
    for k in blocks:
        ratio = {v: [r["by_block"][k]["paired_median_ratio"] for r in runs[v]] for v in runs}
        med = {v: statistics.median(x) for v, x in ratio.items()}
        out["by_block"][k] = {"base_over_model_loop": ratio["base"], "new_over_model_loop": ratio["new"],
                              "median_base": med["base"], "median_new": med["new"],
                              "new_over_base": med["new"] / med["base"]}
    text = json.dumps(out, indent=2)
    print(text)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
