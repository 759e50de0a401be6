"""Resumable evaluation runner: one JSONL record per (problem, method).

Records are keyed by ``(task, model, problem, method)``.  Each record is appended, flushed and fsync'ed as soon as its method finishes on its
problem, so a killed run loses at most the pair in progress.  On restart the store
is re-read (a torn last line is cut off), finished ``(task, problem, method)`` keys
are skipped, and a record whose configuration differs from the current one is an
error rather than a silent mix.

Per record (``score_result``): every sample's text, extracted answer, correctness,
normalised weight ``W_i`` and ``log p(y_i|x)``; ``pass1 = Σ_i W_i·1[y_i correct]``
(the probability that the method's returned answer — a draw from its weighted
samples — is correct); ``best_correct`` for the draw actually returned
(``Result.best``); a weighted majority vote; cost (tokens, forward passes, seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..inference.result import Result
from .tasks import Problem, Task

EngineRun = Callable[..., Result]


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


def _lowtemp(ns: argparse.Namespace) -> EngineRun:
    from ..inference.baselines import LowTemperature

    return LowTemperature(tau=ns.tau if ns.tau is not None else 1.0 / ns.alpha, n=ns.particles).run


def _greedy(ns: argparse.Namespace) -> EngineRun:
    from ..inference.baselines import Greedy

    return Greedy().run


def _from_cli(name: str) -> Callable[[argparse.Namespace], EngineRun]:
    def build(ns: argparse.Namespace) -> EngineRun:
        from ..inference.methods import METHODS

        return METHODS[name](ns)  # MH runs ``particles`` chains, like the CLI

    return build


@dataclass(frozen=True)
class EvalMethod:
    """How ``llmppl eval`` builds a method: its engine and the exponent of its target ``p^a``."""

    build: Callable[[argparse.Namespace], EngineRun]
    sharpened: bool  # target Power(alpha) if True, the base LM Power(1) otherwise
    options: tuple[str, ...] = ("particles", "alpha")


#: method name -> how to build it (engine and target exponent)
EVAL_METHODS: dict[str, EvalMethod] = {
    "plain": EvalMethod(_from_cli("plain"), False, ("particles",)),
    "lowtemp": EvalMethod(_lowtemp, False, ("particles", "alpha", "tau")),
    "greedy": EvalMethod(_greedy, False, ()),
    "smc": EvalMethod(_from_cli("smc"), True, ("particles", "alpha", "resampling", "ess_threshold")),
    "mh": EvalMethod(_from_cli("mh"), True, ("particles", "alpha", "block_size", "n_mcmc")),
    "lookahead": EvalMethod(_from_cli("lookahead"), True, ("particles", "alpha", "top_k", "rollouts", "horizon")),
    "bestofn": EvalMethod(_from_cli("bestofn"), False, ("particles",)),
}


def method_namespace(spec: MethodSpec, args: argparse.Namespace) -> argparse.Namespace:
    """The CLI arguments with ``spec``'s overrides applied (unknown keys are an error)."""
    if spec.name not in EVAL_METHODS:
        raise ValueError(f"unknown method {spec.name!r}; choose from {sorted(EVAL_METHODS)}")
    ns = argparse.Namespace(**vars(args))
    for k, v in spec.options.items():
        if not hasattr(ns, k):
            raise ValueError(f"method {spec.label!r}: unknown option {k!r}")
        setattr(ns, k, v)
    ns.quiet = True  # engines' own progress bars would fight the evaluation's
    return ns


def method_config(spec: MethodSpec, ns: argparse.Namespace) -> dict[str, Any]:
    """The options that define ``spec`` (stored with each record, checked on resume)."""
    m = EVAL_METHODS[spec.name]
    return {"method": spec.name, **{k: getattr(ns, k, None) for k in m.options}}


# ---------------------------------------------------------------- scoring
def _weighted_vote(answers: list[str | None], weights: np.ndarray) -> str | None:
    votes: dict[str, float] = defaultdict(float)
    for a, w in zip(answers, weights):
        if a is not None:
            votes[a] += float(w)
    return max(votes, key=votes.get) if votes else None


def score_result(task: Task, problem: Problem, result: Result) -> dict[str, Any]:
    """Per-sample answers and correctness plus the per-problem metrics of one run."""
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
    }


# ---------------------------------------------------------------- storage
Key = tuple[str, str, int, str]  # (task, model, problem, method)


def record_key(rec: dict[str, Any]) -> Key:
    return (rec["task"], rec.get("config", {}).get("model", "?"), int(rec["problem"]), rec["method"])


class ResultStore:
    """Append-only JSONL file of records, crash-safe (flush + fsync per record)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.records: dict[Key, dict[str, Any]] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        good = 0  # byte offset after the last complete, valid line
        for lineno, line in enumerate(data.split(b"\n")[:-1], start=1):
            end = good + len(line) + 1
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    if end >= len(data.rstrip(b"\n")):  # torn last line: drop it
                        break
                    raise ValueError(f"{self.path}:{lineno} is not valid JSON: {exc}") from None
                self.records[record_key(rec)] = rec
            good = end
        if good < len(data):  # a partial last line (no newline) from a killed writer
            with open(self.path, "r+b") as f:
                f.truncate(good)

    def __contains__(self, key: Key) -> bool:
        return key in self.records

    def append(self, rec: dict[str, Any]) -> None:
        key = record_key(rec)
        if key in self.records:
            raise ValueError(f"record {key} is already in {self.path}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[key] = rec


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
    """One method to evaluate: its spec, its engine's ``run`` and its target."""

    spec: MethodSpec
    run: EngineRun
    target: Any
    config: dict[str, Any]


def run_eval(task: Task, problems: list[Problem], jobs: list[Job], store: ResultStore,
             max_new_tokens: int, seed: int, run_config: dict[str, Any],
             progress: bool = True, time_limit: float | None = None,
             problem_seed: Callable[[int, int], int] = lambda seed, i: seed * 1_000_003 + i,
             ) -> int:
    """Evaluate every (problem, method) pair missing from ``store``; return how many ran.

    Problems are the outer loop, so a partial run has every method on the same problems
    (paired comparisons).  Stops cleanly after ``time_limit`` seconds.
    """
    from tqdm.auto import tqdm

    model = run_config.get("model", "?")
    todo = [(p, j) for p in problems for j in jobs if (task.spec, model, p.index, j.spec.label) not in store]
    for p, j in ((p, j) for p in problems for j in jobs):
        rec = store.records.get((task.spec, model, p.index, j.spec.label))
        want = {**run_config, **j.config}
        if rec is not None and rec.get("config") != want:
            raise ValueError(
                f"{store.path} already holds {j.spec.label!r} on problem {p.index} with config "
                f"{rec.get('config')}, not {want}: use another --json file or method label")
    total = len(problems) * len(jobs)
    bar = tqdm(total=total, initial=total - len(todo), disable=not progress, desc=task.spec,
               unit="run", dynamic_ncols=True)
    t0, ran = time.monotonic(), 0
    hits: dict[str, list[float]] = defaultdict(list)
    try:
        for problem, job in todo:
            if time_limit is not None and time.monotonic() - t0 > time_limit:
                break
            s = problem_seed(seed, problem.index)
            start = time.perf_counter()
            result = job.run(job.target, task.prompt(problem), max_new_tokens, seed=s)
            wall = time.perf_counter() - start
            rec = {"task": task.spec, "problem": problem.index, "method": job.spec.label,
                   "question": problem.question, "reference": problem.answer, "seed": s,
                   "wall_time": wall, "config": {**run_config, **job.config},
                   **score_result(task, problem, result)}
            store.append(rec)
            ran += 1
            hits[job.spec.label].append(rec["pass1"])
            bar.set_postfix({k: f"{np.mean(v):.2f}" for k, v in hits.items()}, refresh=False)
            bar.update(1)
    finally:
        bar.close()
    return ran
