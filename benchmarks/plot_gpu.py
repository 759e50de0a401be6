"""Plot and tabulate ``llmppl bench gpu`` results: ms/step vs N per model size, floor drawn.

    python3 benchmarks/plot_gpu.py [RESULTS_DIR]   # reads gpu_*.json, writes gpu_latency.png, gpu_table.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(folder: Path) -> list[dict]:
    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("gpu_*.json"))]
    return [r for r in runs if r.get("benchmark") == "gpu"]


def table(results: list[dict]) -> str:
    head = ("| model | resample | N | plain b1 | plain bN | pp.SMC | SMC / b1 | floor | host syncs / step "
            "| dynamic b1 | dynamic bN |\n|---|---|---|---|---|---|---|---|---|---|---|")
    rows = [head]
    fmt = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
    for res in results:
        mode = "every step" if res["force_resample"] else f"ESS < {res['ess_threshold']}N"
        for r in res["runs"]:
            rows.append(f"| {res['model']} | {mode} | {r['n']} | {fmt(res['plain_b1_ms'])} | {fmt(r['plain_bN_ms'])} "
                        f"| {fmt(r['smc_ms'])} | {r['smc_over_plain_b1']:.2f}× | {fmt(r['floor_ms'])} "
                        f"| {fmt(r.get('smc_host_syncs_per_step'))} | {fmt(res.get('dynamic_b1_ms'))} | {fmt(r.get('dynamic_bN_ms'))} |")
    dev = {res["device"] for res in results}
    return f"ms per decode step on {', '.join(sorted(dev))} ({results[0]['dtype']}).\n\n" + "\n".join(rows) + "\n"


def plot(results: list[dict], path: Path) -> None:
    results = [r for r in results if r["force_resample"]] or results
    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.6), squeeze=False)
    for ax, res in zip(axes[0], results):
        ns = [r["n"] for r in res["runs"]]
        ax.plot(ns, [r["plain_bN_ms"] for r in res["runs"]], "o-", label="plain decoder, batch N")
        ax.plot(ns, [r["smc_ms"] for r in res["runs"]], "s-", label="pp.SMC, N particles")
        ax.axhline(res["plain_b1_ms"], color="gray", ls="--", label="plain, batch 1")
        ax.plot(ns, [r["floor_ms"] for r in res["runs"]], "k:", label="bandwidth floor")
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.set_title(f"{res['model']} ({res['dtype']})")
        ax.set_xlabel("N")
        ax.set_ylabel("ms / step")
    axes[0][0].legend(fontsize=7)
    mode = "resampling every step" if results[0]["force_resample"] else "resampling when ESS is low"
    fig.suptitle(f"{results[0]['device']}: {mode}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(folder: str = "benchmarks/results") -> int:
    root = Path(folder)
    results = load(root)
    if not results:
        print(f"no gpu_*.json under {root}", file=sys.stderr)
        return 1
    (root / "gpu_table.md").write_text(table(results))
    plot(results, root / "gpu_latency.png")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
