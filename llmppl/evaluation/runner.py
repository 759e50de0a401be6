"""Resumable evaluation on the dataset runner (``llmppl.runner``): one record per (problem, method).

Problems are cut into batches of ``batch_prompts`` in order (batch ``b`` seeded by
``llmppl.runner.batch_seed(seed, b)``); each method runs a batch with ``run_batch`` and its
records are written in one fsync'd append (``llmppl.runner.JsonlStore``), so a killed
run loses at most the batch in progress.  Records are keyed by
``(task, model, problem, method)``; on restart a torn last line is cut off, finished
keys are skipped (a batch with some missing is re-run whole with the same seed), and a
record whose configuration differs from the current one is an error rather than a
silent mix.

Per record (``score_result``): every sample's text, extracted answer, correctness,
normalised weight ``W_i`` and ``log p(y_i|x)``; ``pass1 = Σ_i W_i·1[y_i correct]``
(the probability that the method's returned answer — a draw from its weighted
samples — is correct); ``best_correct`` for the draw actually returned
(``Result.best``); a weighted majority vote; cost (tokens, forward passes, seconds).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import runner as dataset
from ..inference.result import Result
from ..methods import METHODS, Method
from .tasks import Problem, Task

#: the methods ``llmppl eval`` knows: the shared registry of ``llmppl.methods``
EVAL_METHODS = METHODS


# ---------------------------------------------------------------- methods
@dataclass
class MethodSpec:
    """``name[:key=value[:key=value]]``: a method and its per-method option overrides."""

    label: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> "MethodSpec":
        name, *opts = text.strip().split(":")
        options: dict[str, Any] = {}
        for o in opts:
            key, sep, value = o.partition("=")
            if not sep:
                raise ValueError(f"method option must be key=value, got {o!r} in {text!r}")
            try:
                options[key.replace("-", "_")] = json.loads(value)
            except json.JSONDecodeError:
                options[key.replace("-", "_")] = value
        return cls(text.strip(), name, options)


def method_namespace(spec: MethodSpec, args: argparse.Namespace) -> argparse.Namespace:
    """The CLI arguments with ``spec``'s overrides applied (unknown keys are an error)."""
    if spec.name not in METHODS:
        raise ValueError(f"unknown method {spec.name!r}; choose from {sorted(METHODS)}")
    ns = argparse.Namespace(**vars(args))
    for k, v in spec.options.items():
        if not hasattr(ns, k):
            raise ValueError(f"method {spec.label!r}: unknown option {k!r}")
        setattr(ns, k, v)
    ns.quiet = True  # engines' own progress bars would fight the evaluation's
    return ns


def method_config(spec: MethodSpec, ns: argparse.Namespace) -> dict[str, Any]:
    """The options that define ``spec`` (stored with each record, checked on resume)."""
    return {"method": spec.name, **{k: getattr(ns, k, None) for k in METHODS[spec.name].options}}


# ---------------------------------------------------------------- scoring
def _weighted_vote(answers: list[str | None], weights: np.ndarray) -> str | None:
    votes: dict[str, float] = defaultdict(float)
    for a, w in zip(answers, weights):
        if a is not None:
            votes[a] += float(w)
    return max(votes, key=votes.get) if votes else None


def score_result(task: Task, problem: Problem, result: Result) -> dict[str, Any]:
    """Per-sample answers and correctness plus the per-problem metrics of one run.

    A result with ``error`` set (every particle died) scores as wrong, with its error kept.
    """
    if result.error is not None:
        return {"texts": [], "answers": [], "extracted_how": [], "scores": [], "correct": [],
                "weights": [], "log_p": [], "lengths": [], "finished": [], "pass1": 0.0,
                "best_index": None, "best_answer": None, "best_correct": False, "maj_answer": None,
                "maj_correct": False, "n_correct": 0, "n_samples": 0, "log_p_mean": None,
                "log_p_per_token": None, "unique": 0, "log_evidence": None,
                "tokens_decoded": result.stats.get("tokens_decoded"),
                "forward_passes": result.stats.get("forward_passes"), "output_tokens": 0,
                "engine_wall_time": result.stats.get("wall_time"), "engine": result.method,
                "error": result.error}
    texts = result.texts or [None] * result.n
    extracted = [task.extract(t) for t in texts]
    answers = [e.answer for e in extracted]
    scores = [task.score(a, problem) for a in answers]
    correct = [s >= 1.0 for s in scores]
    w = result.weights
    best = result.best_index()
    vote = _weighted_vote(answers, w)
    lengths = [len(s) for s in result.samples]
    log_p = np.asarray(result.log_p, dtype=np.float64) if result.log_p else np.full(result.n, np.nan)
    per_token = log_p / np.maximum(1, np.asarray(lengths) + np.asarray(result.finished, dtype=float))
    return {
        "texts": texts, "answers": answers, "extracted_how": [e.how for e in extracted],
        "scores": scores, "correct": correct, "weights": w.tolist(), "log_p": log_p.tolist(),
        "lengths": lengths, "finished": list(result.finished),
        "pass1": float(np.dot(w, correct)),
        "best_index": best, "best_answer": answers[best], "best_correct": bool(correct[best]),
        "maj_answer": vote, "maj_correct": vote is not None and task.score(vote, problem) >= 1.0,
        "n_correct": int(sum(correct)), "n_samples": result.n,
        "log_p_mean": float(np.dot(w, log_p)), "log_p_per_token": float(np.dot(w, per_token)),
        "unique": len({tuple(s) for s in result.samples}),
        "log_evidence": result.log_evidence,
        "tokens_decoded": result.stats.get("tokens_decoded"),
        "forward_passes": result.stats.get("forward_passes"),
        "output_tokens": int(sum(lengths)),
        "engine_wall_time": result.stats.get("wall_time"),
        "engine": result.method,
        "error": None,
    }


# ---------------------------------------------------------------- storage
Key = tuple[str, str, int, str]  # (task, model, problem, method)


def record_key(rec: dict[str, Any]) -> Key:
    return (rec["task"], rec.get("config", {}).get("model", "?"), int(rec["problem"]), rec["method"])


class ResultStore(dataset.JsonlStore):
    """The evaluation's JSONL file: the runner's crash-safe store keyed by :func:`record_key`."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path, key=record_key)

    def append(self, rec: dict[str, Any]) -> None:
        self.write([rec])


def load_records(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """All records of one or more JSONL files (later files win on duplicate keys)."""
    out: dict[Key, dict[str, Any]] = {}
    for p in paths:
        if not Path(p).exists():
            raise FileNotFoundError(f"no results file at {p}")
        out.update(ResultStore(p).records)
    return list(out.values())


# ---------------------------------------------------------------- the loop
@dataclass
class Job:
    """One method to evaluate: its spec, its engine (a ``Method``: ``run_batch``), its target."""

    spec: MethodSpec
    method: Method
    target: Any
    config: dict[str, Any]


def machine_summary() -> dict[str, Any]:
    """Where a record was computed (kept with it, outside its config, so a run may resume elsewhere)."""
    from ..benchmarking.engine import machine_info

    info = machine_info("cpu")
    return {k: info.get(k) for k in ("cpu_model", "cpu_count", "torch_threads", "torch", "llmppl")}


def single_problem_seed(seed: int, problem: int) -> int:
    """The seed of problem ``problem`` when each batch holds one problem (``batch_prompts=1``).

    ``seed·1000003 + problem``: the seeding of results files written before ``llmppl eval``
    ran through the dataset runner, kept so that they resume with identical records.  Larger
    batches use ``llmppl.runner.batch_seed(seed, batch index)``.
    """
    return int(seed) * 1_000_003 + int(problem)


def run_eval(task: Task, problems: list[Problem], jobs: list[Job], store: ResultStore,
             max_new_tokens: int, seed: int, run_config: dict[str, Any],
             progress: bool = True, time_limit: float | None = None, batch_prompts: int = 1,
             shard: tuple[int, int] = (0, 1)) -> int:
    """Evaluate every (problem, method) pair missing from ``store``; return how many ran.

    Batches of problems are the outer loop and methods the inner one, so a partial run
    has every method on the same problems (paired comparisons).  Every prompt is checked
    against the model's context before any compute.  Stops cleanly (between batches)
    after ``time_limit`` seconds.  ``shard=(k, n)`` runs only the batches ``b`` with
    ``b mod n = k``: a batch's seed depends on ``b`` alone, so ``n`` shards (processes or
    machines, each with its own store) write the records one process would.
    """
    k, n = shard
    if not (isinstance(k, int) and isinstance(n, int) and 0 <= k < n):
        raise ValueError(f"shard must be (k, n) with 0 <= k < n, got {shard!r}")
    model = run_config.get("model", "?")

    def key(index: int, job: Job) -> Key:
        return (task.spec, model, index, job.spec.label)

    for p, j in ((p, j) for p in problems for j in jobs):
        rec = store.records.get(key(p.index, j))
        want = {**run_config, **j.config}
        if rec is not None and rec.get("config") != want:
            raise ValueError(
                f"{store.path} already holds {j.spec.label!r} on problem {p.index} with config "
                f"{rec.get('config')}, not {want}: use another --json file or method label")
    by_index = {p.index: p for p in problems}
    host = machine_summary()
    items = [dataset.Item(p.index, task.prompt(p)) for p in problems]
    shard_batches = [b for b in dataset.make_batches(items, batch_prompts, seed) if b.index % n == k]
    mine = [by_index[it.id] for b in shard_batches for it in b.items]
    batches = [b for b in shard_batches if not all(key(it.id, j) in store for it in b.items for j in jobs)]
    if batch_prompts == 1:  # one problem a batch: the seed results files before the runner used
        for b in batches:
            b.seed = single_problem_seed(seed, b.items[0].id)
    todo_items = [it for b in batches for it in b.items]
    encoded = {id(j): dataset.encode_items(j.target, todo_items, max_new_tokens) for j in jobs}
    total = len(mine) * len(jobs)
    done = sum(1 for p in mine for j in jobs if key(p.index, j) in store)
    bar = dataset.Progress(total, done, progress, desc=task.spec, unit="run")
    t0, ran, offset = time.monotonic(), 0, 0
    hits: dict[str, list[float]] = defaultdict(list)
    try:
        for b in batches:
            if time_limit is not None and time.monotonic() - t0 > time_limit:
                break
            for job in jobs:
                todo = [key(it.id, job) not in store for it in b.items]
                if not any(todo):
                    continue
                ids = encoded[id(job)][offset:offset + len(b.items)]
                start = time.perf_counter()
                results = job.method.run_batch(job.target, ids, max_new_tokens, seed=b.seed)
                wall = (time.perf_counter() - start) / len(b.items)
                recs = []
                for it, result, t in zip(b.items, results, todo):
                    if not t:
                        continue
                    problem = by_index[it.id]
                    recs.append({"task": task.spec, "problem": problem.index, "method": job.spec.label,
                                 "question": problem.question, "reference": problem.answer,
                                 "seed": b.seed, "batch": b.index, "wall_time": wall, "host": host,
                                 "config": {**run_config, **job.config},
                                 **score_result(task, problem, result)})
                recs = [dataset.json_safe(r) for r in recs]
                store.write(recs)
                ran += len(recs)
                for r in recs:
                    hits[job.spec.label].append(r["pass1"])
                bar.update(recs, {k: f"{np.mean(v):.2f}" for k, v in hits.items()})
            offset += len(b.items)
    finally:
        bar.close()
    return ran
