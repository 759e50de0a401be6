"""How long a user waits before any work: ``import llmppl``, ``llmppl --help``, the core's imports.

Each measurement is a fresh ``python`` process (so nothing is cached in memory), run ``--repeat``
times after one warm-up run (which also writes Python's bytecode cache, as any user's first run
does; ``PYTHONDONTWRITEBYTECODE`` is removed from the environment for that reason).  Reported:
min and median wall seconds, with the 1-minute load average before and after, since a busy
machine slows every import.  The aims (issue 40): ``import llmppl`` <= 3 s and ``llmppl --help``
<= 2 s on the project's 2-core VM.

    python benchmarks/import_time.py --out benchmarks/results/import_time_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: name -> the command it times (run in the repository root)
CASES = {
    "import llmppl": [sys.executable, "-c", "import llmppl"],
    "llmppl --help": [sys.executable, "-m", "llmppl.cli", "--help"],
    "llmppl sample --help": [sys.executable, "-m", "llmppl.cli", "sample", "--help"],
    "import llmppl; pp.SMC, pp.Target, pp.models (the core, torch and transformers included)":
        [sys.executable, "-c", "import llmppl as pp; pp.SMC, pp.Target, pp.models"],
    "import torch (for scale)": [sys.executable, "-c", "import torch"],
}


def _time(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=None, help="write the JSON here too")
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cases = {}
    for name, cmd in CASES.items():
        load0 = os.getloadavg()[0]
        _time(cmd, env)  # warm-up (bytecode cache, page cache)
        times = [_time(cmd, env) for _ in range(args.repeat)]
        cases[name] = {"min_s": round(min(times), 3), "median_s": round(statistics.median(times), 3),
                       "runs_s": [round(t, 3) for t in times], "load_before": round(load0, 2),
                       "load_after": round(os.getloadavg()[0], 2)}
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        pass
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", "HEAD", "--", "llmppl"]).returncode != 0
    out = {"benchmark": "import_time", "aims": {"import llmppl": 3.0, "llmppl --help": 2.0},
           "cases": cases,
           "host": {"cpu_model": cpu, "cpu_count": os.cpu_count(), "python": sys.version.split()[0],
                    "platform": platform.platform(), "llmppl": commit + ("+modified" if dirty else "")}}
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
