"""Summaries of results files: a markdown table, paired tests, and two figures.

``summarise(records)`` gives one row per (task, model, method), on the problems that
every method of the (task, model) finished: pass@1 (mean of the
per-problem ``Σ W_i·correct_i``) with a bootstrap 95 % interval over problems, the
accuracy of the returned answer with a Wilson interval, weighted majority vote,
pass@N, pass@1 under a box-only grader (an answer counts only if it came from a
``\\boxed{}``) and the share of samples with a box, mean ``log p``, the share of outputs cut
at ``max_new_tokens`` (weighted, as the method returns them, and of all samples drawn), the
share of problems a must-finish method answered nothing (every sample cut: no weight left),
tokens and seconds per problem.  ``paired_tests`` compares
every two methods on the problems both finished (McNemar exact on the returned
answers, paired bootstrap on pass@1, and how often the two return the same answer:
does one method reproduce the other's answers?).  ``report`` writes ``table.md``,
``accuracy_vs_time.png`` and ``pass_at_k.png``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from .grading import equivalent
from .runner import load_records
from .stats import bootstrap_ci, mcnemar_exact, paired_bootstrap, pass_at_k, wilson

Group = tuple[str, str]  # (task, model)


def _groups(records: Iterable[dict[str, Any]]) -> dict[Group, dict[str, dict[int, dict[str, Any]]]]:
    """(task, model) -> method -> problem -> record."""
    out: dict[Group, dict[str, dict[int, dict[str, Any]]]] = defaultdict(lambda: defaultdict(dict))
    for r in records:
        out[(r["task"], r["config"].get("model", "?"))][r["method"]][int(r["problem"])] = r
    return out


def pass_at_k_curve(recs: Iterable[dict[str, Any]]) -> np.ndarray:
    """Mean over problems of the unbiased pass@k, ``k = 1..min_n`` (samples treated as draws);
    ``min_n`` over the records that have samples, a failed run (no samples) counting as 0."""
    recs = list(recs)
    sizes = [r["n_samples"] for r in recs if r["n_samples"] > 0]
    if not sizes:
        return np.zeros(0)
    return np.array([np.mean([pass_at_k(r["n_samples"], r["n_correct"], k) if r["n_samples"] else 0.0
                              for r in recs]) for k in range(1, min(sizes) + 1)])


def _mean(values: list[float | None]) -> float:
    """Mean of the values that are not None (a failed run has no log p); NaN if none are."""
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else float("nan")


def _boxed(r: dict[str, Any]) -> list[bool]:
    return [h == "boxed" for h in r.get("extracted_how") or []]


def boxed_pass1(r: dict[str, Any]) -> float:
    """``Σ_i W_i·1[y_i correct and its answer came from a \\boxed{}]``: pass@1 under a box-only grader."""
    return float(sum(w * (c and b) for w, c, b in zip(r["weights"], r["correct"], _boxed(r))))


def summarise(records: list[dict[str, Any]], common: bool = True) -> list[dict[str, Any]]:
    """One summary row per (task, model, method); ``common``: only problems every method finished."""
    rows = []
    for (task, model), methods in sorted(_groups(records).items()):
        shared = set.intersection(*(set(m) for m in methods.values()))
        for method, by_problem in methods.items():
            recs = [r for i, r in sorted(by_problem.items()) if not common or i in shared]
            if not recs:
                continue
            n = len(recs)
            pass1 = [r["pass1"] for r in recs]
            k_best = sum(r["best_correct"] for r in recs)
            rows.append({
                "task": task, "model": model, "method": method, "problems": n,
                "samples": max(r["n_samples"] for r in recs),
                "pass1": float(np.mean(pass1)), "pass1_ci": bootstrap_ci(pass1),
                "pass1_boxed": float(np.mean([boxed_pass1(r) for r in recs])),
                "boxed": float(np.mean([np.mean(_boxed(r)) if r["n_samples"] else 0.0 for r in recs])),
                "failed": float(np.mean([r.get("error") is not None for r in recs])),
                "answer_acc": k_best / n, "answer_ci": wilson(k_best, n),
                "maj": float(np.mean([r["maj_correct"] for r in recs])),
                "pass_n": float(np.mean([r["n_correct"] > 0 for r in recs])),
                "log_p": _mean([r["log_p_mean"] for r in recs]),
                "log_p_tok": _mean([r["log_p_per_token"] for r in recs]),
                "truncated": float(np.mean([np.dot(r["weights"], np.logical_not(r["finished"])) for r in recs])),
                "cut": float(np.mean([np.mean(np.logical_not(r["finished"])) if r["finished"] else 0.0
                                      for r in recs])),
                "tokens": float(np.mean([r["tokens_decoded"] or r["output_tokens"] for r in recs])),
                "seconds": float(np.mean([r["wall_time"] for r in recs])),
                "pass_at_k": pass_at_k_curve(recs).tolist(),
            })
    return rows


def same_answer(a: str | None, b: str | None) -> bool:
    """Two returned answers agree: both given and equal as text or as mathematical objects
    (math-verify; an answer it cannot parse agrees only with its own text; without
    math-verify installed, text alone)."""
    if a is None or b is None:
        return False
    if a.strip() == b.strip():
        return True
    try:
        return equivalent(a, b)
    except (ValueError, ModuleNotFoundError):   # b is no parseable expression / no math-verify
        return False


def paired_tests(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every pair of methods on the same (task, model), on the problems both finished."""
    out = []
    for (task, model), methods in sorted(_groups(records).items()):
        for a, b in combinations(sorted(methods), 2):
            common = sorted(set(methods[a]) & set(methods[b]))
            if not common:
                continue
            ra, rb = [methods[a][i] for i in common], [methods[b][i] for i in common]
            mc = mcnemar_exact([r["best_correct"] for r in ra], [r["best_correct"] for r in rb])
            diff, lo, hi = paired_bootstrap([r["pass1"] for r in ra], [r["pass1"] for r in rb])
            both = [(x["best_answer"], y["best_answer"]) for x, y in zip(ra, rb)
                    if x.get("best_answer") is not None and y.get("best_answer") is not None]
            out.append({"task": task, "model": model, "a": a, "b": b, "problems": len(common),
                        "a_only": mc.n10, "b_only": mc.n01, "mcnemar_p": mc.p_value,
                        "pass1_diff": diff, "pass1_diff_ci": (lo, hi),
                        "both_answered": len(both), "same_answer": sum(same_answer(x, y) for x, y in both)})
    return out


def settings(records: list[dict[str, Any]]) -> str:
    """Markdown bullets: per (task, model) the shared run settings, each method's options, the machines."""
    lines = []
    for (task, model), methods in sorted(_groups(records).items()):
        recs = [r for by_problem in methods.values() for r in by_problem.values()]
        shared = {k: v for k, v in recs[0]["config"].items() if k not in ("model", "method")
                  and all(r["config"].get(k) == v for r in recs)}
        per_method = "; ".join(
            f"{m}: " + ", ".join(f"{k}={v}" for k, v in sorted(next(iter(ps.values()))["config"].items())
                                if k not in shared and k not in ("model", "method") and v is not None)
            for m, ps in sorted(methods.items())).replace(": ;", ": defaults;")
        hosts = sorted({f"{h.get('cpu_model')} ({h.get('cpu_count')} CPUs, {h.get('torch_threads')} threads)"
                        for r in recs if (h := r.get("host"))}) or ["not recorded"]
        versions = [(r.get("host") or {}).get("llmppl") for r in recs]
        codes, older = sorted({v for v in versions if v}), sum(not v for v in versions)
        code = ""
        if codes:
            code = f" llmppl code: {', '.join(codes)}" + (f" ({older} earlier records did not keep it)" if older else "") + "."
        lines.append(f"- **{task} — {model}**: {', '.join(f'{k}={v}' for k, v in sorted(shared.items()))}. "
                     f"Methods: {per_method}. Machine: {'; '.join(hosts)}.{code}")
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict[str, Any]], tests: list[dict[str, Any]]) -> str:
    """The summary table and the paired tests as markdown."""
    head = ("Rows use the problems that every method of the task finished. pass@1 is *weighted*: "
            "Σ_i W_i·1[y_i correct], the probability that the answer the method returns (a draw from its "
            "weighted samples) is right. pass_at_k.png's k = 1 is *unweighted* (the share of correct samples, "
            "each sample a draw): the two agree when a method's weights are uniform (plain sampling) and "
            "differ when they are not (SMC's weighted particles).\n\n| task | model | method | problems | N | pass@1 [95% CI] | returned answer [Wilson 95%] "
            "| maj@N | pass@N | pass@1 box only | boxed (samples) | mean log p | log p / token | truncated (weight) "
            "| cut (samples) | no answer (all cut) | tokens / problem "
            "| s / problem |\n|---|---|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    body = "".join(
        f"| {r['task']} | {r['model']} | {r['method']} | {r['problems']} | {r['samples']} "
        f"| {r['pass1']:.3f} [{r['pass1_ci'][0]:.3f}, {r['pass1_ci'][1]:.3f}] "
        f"| {r['answer_acc']:.3f} [{r['answer_ci'][0]:.3f}, {r['answer_ci'][1]:.3f}] "
        f"| {r['maj']:.3f} | {r['pass_n']:.3f} | {r['pass1_boxed']:.3f} | {r['boxed']:.2f} "
        f"| {r['log_p']:.2f} | {r['log_p_tok']:.3f} | {r['truncated']:.2f} "
        f"| {r['cut']:.2f} | {r['failed']:.2f} "
        f"| {r['tokens']:.0f} | {r['seconds']:.1f} |\n" for r in rows)
    text = head + body
    if tests:
        text += ("\nPaired tests on common problems (McNemar exact on the returned answers; "
                 "paired bootstrap 95% CI of the pass@1 difference a − b; same answer: of the problems "
                 "both methods answered, those where the two returned answers agree):\n\n"
                 "| task | model | a | b | problems | a right, b wrong | b right, a wrong | McNemar p "
                 "| pass@1 a − b [95% CI] | same answer |\n|---|---|---|---|---:|---:|---:|---:|---|---:|\n")
        text += "".join(
            f"| {t['task']} | {t['model']} | {t['a']} | {t['b']} | {t['problems']} | {t['a_only']} "
            f"| {t['b_only']} | {t['mcnemar_p']:.3g} | {t['pass1_diff']:+.3f} "
            f"[{t['pass1_diff_ci'][0]:+.3f}, {t['pass1_diff_ci'][1]:+.3f}] "
            f"| {t['same_answer']}/{t['both_answered']} |\n" for t in tests)
    return text


def plot(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """``accuracy_vs_time.png`` (pass@1 ± CI vs seconds and vs tokens per problem) and ``pass_at_k.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["task"], r["model"]) for r in rows})
    figures = (("accuracy_vs_time.png", (_accuracy_vs("seconds", "wall time per problem (s)"),
                                         _accuracy_vs("tokens", "tokens decoded per problem"))),
               ("pass_at_k.png", (_draw_pass_at_k,)))
    paths = []
    for fname, draws in figures:
        fig, axes = plt.subplots(len(draws), len(groups), figsize=(4.5 * len(groups) + 2.5, 3.4 * len(draws)),
                                 squeeze=False)
        for row, draw in zip(axes, draws):
            for ax, g in zip(row, groups):
                group_rows = [r for r in rows if (r["task"], r["model"]) == g]
                draw(ax, group_rows)
                n = max(r["problems"] for r in group_rows)
                ax.set_title(f"{g[0].split(':')[-1]} — {g[1]}\n(n = {n} problems)", fontsize=9)
        legend: dict[str, Any] = {}     # every group's methods, once each (groups may differ)
        for ax in axes[0]:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                legend.setdefault(label, handle)
        fig.legend(list(legend.values()), list(legend), loc="center right", fontsize=7)
        fig.tight_layout(rect=(0, 0, 0.78, 1))
        path = out / fname
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


#: the colour of each method in every figure (others: the colours after these)
_COLOURS = ("plain", "lowtemp", "bestofn", "smc", "mh", "greedy", "lookahead", "reweight")


def _colour(method: str) -> str:
    base = method.split(":")[0]
    return f"C{_COLOURS.index(base) if base in _COLOURS else len(_COLOURS) + sum(map(ord, base)) % 3}"


def _accuracy_vs(key: str, label: str):
    """Draw pass@1 (95 % CI) against ``key`` on a log axis; the variants of one method (e.g.
    ``smc`` and ``smc:particles=16``) share a colour and are joined: a compute curve."""
    import matplotlib.ticker

    def draw(ax: Any, rows: list[dict[str, Any]]) -> None:
        colours: dict[str, str] = {}
        for r in sorted(rows, key=lambda r: r[key]):
            base = r["method"].split(":")[0]
            colour = colours.setdefault(base, _colour(base))
            lo, hi = r["pass1_ci"]
            ax.errorbar(r[key], r["pass1"], yerr=[[r["pass1"] - lo], [hi - r["pass1"]]], fmt="o", color=colour,
                        capsize=3, label=f"{r['method']} (N={r['samples']})")
        for base, colour in colours.items():
            pts = sorted((r[key], r["pass1"]) for r in rows if r["method"].split(":")[0] == base)
            if len(pts) > 1:
                ax.plot(*zip(*pts), color=colour, lw=1, alpha=0.6)
        xs = [r[key] for r in rows if r[key] > 0]
        ax.set_xlabel(label)
        ax.set_ylabel("pass@1 (95% CI)")
        ax.set_xscale("log")
        if xs:
            ax.set_xlim(min(xs) / 1.3, max(xs) * 1.3)
            ticks = [m * 10.0 ** e for e in range(-2, 6) for m in (1, 2, 5) if min(xs) / 1.3 <= m * 10.0 ** e <= max(xs) * 1.3]
            ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
            ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_ylim(0, 1)

    return draw


def _draw_pass_at_k(ax: Any, rows: list[dict[str, Any]]) -> None:
    for r in rows:
        ks = np.arange(1, len(r["pass_at_k"]) + 1)
        ax.plot(ks, r["pass_at_k"], marker="o", ms=3, label=r["method"], color=_colour(r["method"]),
                ls="--" if ":" in r["method"] else "-")
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k (unbiased, samples unweighted)")
    ax.set_ylim(0, 1)


def report(paths: list[str | Path], out: str | Path, common: bool = True, note: str | None = None) -> str:
    """Write ``table.md`` (``note`` first, e.g. the command that made the records) and the
    figures under ``out``; return the markdown."""
    records = load_records(paths)
    if not records:
        raise ValueError(f"no records in {', '.join(map(str, paths))}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, tests = summarise(records, common), paired_tests(records)
    text = markdown(rows, tests) + "\nSettings:\n\n" + settings(records)
    if note:
        text = note.strip() + "\n\n" + text
    (out / "table.md").write_text(text)
    plot(rows, out)
    return text
