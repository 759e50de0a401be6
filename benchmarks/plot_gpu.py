"""Tabulate (and plot, when matplotlib is installed) what ``benchmarks/gpu_suite.sh`` wrote.

    python3 benchmarks/plot_gpu.py [RESULTS_DIR]   # reads gpu_*.json, writes gpu_table.md (+ gpu_latency.png)

Reads the suite's ``gpu_suite.json``, ``gpu_exact.json``, ``gpu_overhead.json`` and
``gpu_latency-<model>.json`` (and older ``llmppl bench gpu`` files, ``"benchmark": "gpu"``).  Only
numbers in those files are printed; a part that did not finish shows its status.  Needs only the
standard library for the table, so it runs on a machine with nothing but torch installed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _f(v: Any, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def suite_tables(root: Path) -> list[str]:
    """Markdown sections for the suite's files (empty if there is no ``gpu_suite.json``)."""
    suite = _load(root / "gpu_suite.json")
    if suite is None:
        return []
    m = suite.get("machine", {})
    plan = suite.get("plan", {})
    device = m.get("gpu") or f"CPU ({m.get('cpu_model') or m.get('processor')}, {m.get('torch_threads')} threads)"
    out = [f"# GPU suite{' (dry run: CPU, tiny shapes)' if suite.get('dry') else ''}\n",
           f"{device}; torch {m.get('torch')}, transformers {suite.get('transformers')}, llmppl {m.get('llmppl')}; "
           f"{plan.get('dtype')}; started {suite.get('started')}.\n",
           "| part | status | seconds | limit |\n|---|---|---|---|"]
    for name, p in suite.get("parts", {}).items():
        out.append(f"| {name} | {p.get('status')} | {_f(p.get('seconds'), 1)} | {_f(p.get('limit_s'), 0)} |")
    exact = _load(root / "gpu_exact.json")
    if exact and exact.get("checks"):
        out += ["", f"## Exactness smoke ({exact.get('model')}, {exact.get('device')}): {exact.get('target')}", "",
                f"log Z = {_f(exact.get('log_Z'), 4)}; effective support {_f(exact.get('effective_support'), 1)}.", "",
                "| check | value | threshold | passed |\n|---|---|---|---|"]
        for c in exact["checks"]:
            value = c.get("tv", c.get("value", c.get("max_abs_logprob_diff", c.get("effective_support"))))
            out.append(f"| {c['name']} | {_f(value, 4)} | {_f(c.get('threshold'), 3)} | {c.get('passed')} |")
    for path in sorted(root.glob("gpu_latency-*.json")):
        lat = _load(path)
        if not lat:
            continue
        e = lat.get("entropy") or {}
        out += ["", f"## Latency: {lat.get('model')} ({lat.get('dtype')}, {_f((lat.get('parameters') or 0) / 1e9, 2)} B "
                f"parameters, random weights), status {lat.get('status')}", "",
                f"Next-token entropy {_f(e.get('entropy_nats'))} nats along draws from p (target {e.get('target_nats')}; "
                f"{_f(e.get('entropy_nats_unscaled'))} before scaling the logits by {_f(e.get('logit_scale'))}); "
                f"{lat.get('tokens')} tokens per row, median of {lat.get('reps')} repetitions; ms per decoded step.", "",
                "| P × N | static cache + graphs | plain, 1 row | plain, P·N rows | Power-SMC, P·N rows | SMC / plain "
                "| resamplings / step | host syncs / step | peak GiB |\n|---|---|---|---|---|---|---|---|---|"]
        for u in lat.get("units", []):
            shape = f"{u['prompts']} × {u['particles']}"
            if "skipped" in u or "per_step_ms" not in u:
                out.append(f"| {shape} | {u.get('fast_path')} | {u.get('skipped', 'not run')} | | | | | | |")
                continue
            ms = u["per_step_ms"]
            out.append(f"| {shape} | {u['fast_path']} | {_f(ms['plain_1'])} | {_f(ms['plain_batch'])} | {_f(ms['smc_batch'])} "
                       f"| {_f(u['smc_over_plain_same_rows'])}× | {_f(u.get('resampling_per_step'))} "
                       f"| {_f(u.get('host_syncs_per_step'))} | {_f(u.get('peak_memory_GiB'))} |")
    over = _load(root / "gpu_overhead.json")
    if over and over.get("units"):
        out += ["", "## Engine overhead: `pp.SMC.run_batch` over the model's own cached forward loop", "",
                "| model | static cache | rows | model loop ms/step | SMC ms/step (token steps) | ratio | by block |\n"
                "|---|---|---|---|---|---|---|"]
        for u in over["units"]:
            if "per_step_ms" not in u:
                out.append(f"| {u.get('model')} | {u.get('static_cache')} | {u.get('skipped', 'not run')} | | | | |")
                continue
            blocks = ", ".join(f"{k}: {v['smc_over_model_loop']:.2f}×" for k, v in u.get("by_block", {}).items())
            out.append(f"| {u['model']} ({u.get('dtype')}) | {u['static_cache']} | {u['rows']} "
                       f"| {_f(u['per_step_ms']['model_loop'])} | {_f(u['per_step_ms']['smc_batch'])} "
                       f"| {_f(u['smc_over_model_loop'])}× | {blocks} |")
    return out


def legacy_table(results: list[dict]) -> list[str]:
    """The table of ``llmppl bench gpu`` files (ms/step vs N)."""
    if not results:
        return []
    rows = ["", f"## `llmppl bench gpu` on {', '.join(sorted({r['device'] for r in results}))}", "",
            "| model | resample | N | plain b1 | plain bN | pp.SMC | SMC / b1 | floor | host syncs / step |\n"
            "|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        mode = "every step" if res["force_resample"] else f"ESS < {res['ess_threshold']}N"
        for r in res["runs"]:
            rows.append(f"| {res['model']} | {mode} | {r['n']} | {_f(res['plain_b1_ms'])} | {_f(r['plain_bN_ms'])} "
                        f"| {_f(r['smc_ms'])} | {r['smc_over_plain_b1']:.2f}× | {_f(r['floor_ms'])} "
                        f"| {_f(r.get('smc_host_syncs_per_step'))} |")
    return rows


def plot(root: Path, path: Path) -> bool:
    """Per model, ms/step of plain decoding and Power-SMC on the same rows, each shape, fast path
    on and off; False (nothing written) without matplotlib or latency results."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lats = [x for x in (_load(p) for p in sorted(root.glob("gpu_latency-*.json"))) if x and x.get("units")]
    lats = [x for x in lats if any("per_step_ms" in u for u in x["units"])]
    if not lats:
        return False
    fig, axes = plt.subplots(1, len(lats), figsize=(4.8 * len(lats), 3.6), squeeze=False)
    for ax, lat in zip(axes[0], lats):
        units = [u for u in lat["units"] if "per_step_ms" in u]
        labels = [f"{u['prompts']}×{u['particles']}\n{'fast' if u['fast_path'] else 'eager'}" for u in units]
        xs = range(len(units))
        ax.bar([x - 0.2 for x in xs], [u["per_step_ms"]["plain_batch"] for u in units], 0.4, label="plain, same rows")
        ax.bar([x + 0.2 for x in xs], [u["per_step_ms"]["smc_batch"] for u in units], 0.4, label="Power-SMC")
        ax.set_xticks(list(xs), labels, fontsize=7)
        ax.set_title(f"{lat['model']} ({lat['dtype']})", fontsize=9)
        ax.set_ylabel("ms / step")
    axes[0][0].legend(fontsize=7)
    suite = _load(root / "gpu_suite.json") or {}
    fig.suptitle(str((suite.get("machine") or {}).get("gpu") or "CPU (dry run)"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(folder: str = "benchmarks/results/gpu") -> int:
    root = Path(folder)
    legacy = [r for r in (_load(p) for p in sorted(root.glob("gpu_*.json"))) if r and r.get("benchmark") == "gpu"]
    lines = suite_tables(root) + legacy_table(legacy)
    if not lines:
        print(f"no GPU suite results under {root}", file=sys.stderr)
        return 1
    text = "\n".join(lines) + "\n"
    (root / "gpu_table.md").write_text(text)
    drew = plot(root, root / "gpu_latency.png")
    print(text + ("" if drew else "\n(no gpu_latency.png: matplotlib is not installed or nothing was timed)\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
