"""Datasets through an engine: JSONL in -> batches of prompts -> ``run_batch`` -> JSONL out.

Input (:func:`read_items`): one JSON object a line, ``{"id": ..., "prompt": ...}`` plus
any other fields, which are carried to the output record unchanged.  ``prompt`` is a
text, a list of token ids, or a chat ``messages`` list.  Blank lines are skipped.

Batches (:func:`make_batches`) are cut from the *input order*: batch ``b`` holds items
``b·P .. b·P+P-1`` and runs with seed :func:`batch_seed` ``(seed, b)`` (a numpy
``SeedSequence`` of both), so a batch's results depend only on its items, the seed and
the method — never on which batches ran before.  A resumed run therefore writes the
same records as an uninterrupted one.

Output (:class:`JsonlStore`): one record a line per prompt (:func:`result_record`),
written with one ``write`` per batch, flushed and fsync'd before the next batch
starts, so a kill loses at most the batch in flight.  On restart the file is re-read,
a torn last line (a writer killed mid-line) is cut off, ids already on disk are
skipped (a batch with some ids missing is re-run whole — same seed, same results —
and only the missing records are written), and a file written with a different
``config`` is refused unless ``force`` (then it is started afresh).

Bad input is a ``ValueError`` raised before any compute: a malformed line (its line
number), a missing or duplicate ``id``, a missing or ill-typed ``prompt``, a field
that collides with an output field, a prompt over the model's context (its id).
A prompt whose particles all die gets a record whose ``error`` holds the reason; a
batch whose ``run_batch`` raises twice gets error records for each of its prompts;
the run goes on in both cases.

:func:`run_dataset` is the single-process loop; ``llmppl.distributed`` runs the same
batches on Ray actors and writes through the same store.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .inference.result import _jsonable

#: fields every output record has (an input field with one of these names is an error)
OUTPUT_FIELDS = (
    "text", "tokens", "texts", "samples", "weights", "log_evidence", "ess", "finished", "truncated",
    "n_finished", "n_truncated", "log_p", "prompt_tokens", "stats", "method", "batch", "seed",
    "config", "error",
)


# ------------------------------------------------------------------ input
@dataclass
class Item:
    """One input prompt: its ``id``, ``prompt``, the other fields (``extra``) and its line."""

    id: Any
    prompt: Any
    extra: dict[str, Any] = field(default_factory=dict)
    line: int | None = None

    @property
    def where(self) -> str:
        return f"id {self.id!r}" + (f" (line {self.line})" if self.line is not None else "")


def _check_prompt_type(prompt: Any) -> str | None:
    """Why ``prompt`` is not a text, a token-id list or a messages list (None if it is one)."""
    if isinstance(prompt, str):
        return None
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return None
        if all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
            return None
    return ("'prompt' must be a text, a non-empty list of token ids or a list of "
            f"{{'role', 'content'}} messages, got {json.dumps(prompt)[:80]}")


def items_from_records(records: Iterable[dict[str, Any]], lines: Sequence[int] | None = None,
                       source: str = "input") -> list[Item]:
    """Validate ``{"id", "prompt", ...}`` records; errors name the line (or index) and id."""
    items: list[Item] = []
    seen: dict[Any, str] = {}
    for i, rec in enumerate(records):
        line = lines[i] if lines is not None else None
        where = f"{source} line {line}" if line is not None else f"{source} record {i}"
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        if "id" not in rec:
            raise ValueError(f"{where}: missing 'id'")
        rid = rec["id"]
        if not isinstance(rid, (str, int)) or isinstance(rid, bool):
            raise ValueError(f"{where}: 'id' must be a string or an integer, got {json.dumps(rid)}")
        key = json.dumps(rid)
        if key in seen:
            raise ValueError(f"{where}: duplicate id {rid!r} (first on {seen[key]})")
        seen[key] = where.removeprefix(f"{source} ")
        if "prompt" not in rec:
            raise ValueError(f"{where}: id {rid!r} has no 'prompt'")
        why = _check_prompt_type(rec["prompt"])
        if why:
            raise ValueError(f"{where}: id {rid!r}: {why}")
        clash = sorted(set(rec) & set(OUTPUT_FIELDS))
        if clash:
            raise ValueError(f"{where}: id {rid!r}: field(s) {clash} would be overwritten by the "
                             "output record; rename them")
        extra = {k: v for k, v in rec.items() if k not in ("id", "prompt")}
        items.append(Item(rid, rec["prompt"], extra, line))
    if not items:
        raise ValueError(f"{source} holds no prompts")
    return items


def read_items(path: str | Path) -> list[Item]:
    """The validated items of a JSONL file (see module docstring)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no input file at {path}")
    records, lines = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: malformed JSON line: {exc}") from None
            lines.append(lineno)
    return items_from_records(records, lines, source=str(path))


def encode_items(target: Any, items: Sequence[Item], max_new_tokens: int) -> list[list[int]]:
    """Every item's prompt token ids, checked against the model's context (errors name the id)."""
    out = []
    for it in items:
        try:
            out.append(target.lm.check_prompt(target.encode(it.prompt), max_new_tokens))
        except ValueError as exc:
            raise ValueError(f"prompt {it.where}: {exc}") from None
    return out


# ------------------------------------------------------------------ batches
def batch_seed(seed: int, index: int) -> int:
    """The seed of batch ``index``: ``SeedSequence([seed, index])`` (independent streams)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


@dataclass
class Batch:
    """Batch ``index`` of the input: all its items (run together) and which ids to write."""

    index: int
    seed: int
    items: list[Item]
    todo: list[bool]
    prompt_ids: list[list[int]] | None = None

    @property
    def pending(self) -> list[Item]:
        return [it for it, t in zip(self.items, self.todo) if t]


def make_batches(items: Sequence[Item], batch_prompts: int, seed: int,
                 done: Callable[[Item], bool] = lambda it: False) -> list[Batch]:
    """Cut ``items`` into batches of ``batch_prompts`` in order; keep those with an undone item."""
    if not isinstance(batch_prompts, int) or batch_prompts < 1:
        raise ValueError(f"batch_prompts must be an int >= 1, got {batch_prompts!r}")
    out = []
    for b, start in enumerate(range(0, len(items), batch_prompts)):
        chunk = list(items[start:start + batch_prompts])
        todo = [not done(it) for it in chunk]
        if any(todo):
            out.append(Batch(b, batch_seed(seed, b), chunk, todo))
    return out


# ------------------------------------------------------------------ output
def json_safe(x: Any) -> Any:
    """``x`` with numpy/torch values made plain and non-finite floats as ``"inf"``/``"-inf"``/``"nan"``."""
    return _jsonable(x)


def result_record(item: Item, result: Any, batch: Batch, config: dict[str, Any]) -> dict[str, Any]:
    """The output record of one prompt's ``Result`` (or its error, when ``result.error`` is set)."""
    stats = {k: v for k, v in result.stats.items() if isinstance(v, (int, float, str, bool))}
    rec: dict[str, Any] = {"id": item.id, **item.extra}
    err = result.error
    weights = None
    if err is None:
        try:
            weights = result.weights
        except ValueError as exc:  # no particle with positive weight
            err = str(exc)
    if err is not None:
        rec.update({f: None for f in OUTPUT_FIELDS})
        rec.update(tokens=[], texts=[], samples=[], weights=[], n_finished=0, n_truncated=0,
                   prompt_tokens=len(result.prompt_ids), stats=stats, method=result.method,
                   batch=batch.index, seed=batch.seed, config=config, error=err)
        return json_safe(rec)
    best = result.best_index()
    rec.update(
        text=result.texts[best] if result.texts else None,
        tokens=result.samples[best],
        texts=result.texts or [],
        samples=result.samples,
        weights=weights,
        log_evidence=result.log_evidence,
        ess=result.final_ess,
        finished=bool(result.finished[best]) if result.finished else None,
        truncated=bool(result.truncated[best]) if result.truncated else None,
        n_finished=int(sum(result.finished)),
        n_truncated=int(sum(result.truncated)),
        log_p=result.log_p[best] if result.log_p else None,
        prompt_tokens=len(result.prompt_ids),
        stats=stats, method=result.method, batch=batch.index, seed=batch.seed, config=config,
        error=None,
    )
    return json_safe(rec)


def error_records(batch: Batch, message: str, config: dict[str, Any]) -> list[dict[str, Any]]:
    """Records for every pending item of ``batch`` saying it failed with ``message``."""
    out = []
    for it in batch.pending:
        rec = {"id": it.id, **it.extra, **{f: None for f in OUTPUT_FIELDS}}
        rec.update(tokens=[], texts=[], samples=[], weights=[], n_finished=0, n_truncated=0,
                   stats={}, batch=batch.index, seed=batch.seed, config=config, error=message)
        out.append(json_safe(rec))
    return out


def run_batch_records(method: Any, target: Any, batch: Batch, max_new_tokens: int,
                      config: dict[str, Any]) -> list[dict[str, Any]]:
    """Run all of ``batch`` with its seed (``method.run_batch``); the pending items' records."""
    prompts = batch.prompt_ids if batch.prompt_ids is not None else [it.prompt for it in batch.items]
    results = method.run_batch(target, prompts, max_new_tokens, seed=batch.seed)
    if len(results) != len(batch.items):
        raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch.items)} prompts")
    return [result_record(it, r, batch, config) for it, r, t in zip(batch.items, results, batch.todo) if t]


def describe_failure(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class JsonlStore:
    """An append-only JSONL file of records keyed by ``key(record)``; crash-safe.

    ``write(records)`` appends them with one ``write`` call, then flush + fsync.  Loading
    cuts a torn last line (no newline, or invalid JSON at the very end); an invalid line
    elsewhere is an error naming it.
    """

    def __init__(self, path: str | Path, key: Callable[[dict[str, Any]], Any] = lambda r: r["id"]) -> None:
        self.path = Path(path)
        self.key = key
        self.records: dict[Any, dict[str, Any]] = {}
        self.dropped_torn_line = False
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        good = 0  # byte offset after the last complete, valid line
        body = data.split(b"\n")
        for lineno, line in enumerate(body[:-1], start=1):
            end = good + len(line) + 1
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    if end >= len(data.rstrip(b"\n")):  # torn last line: drop it
                        break
                    raise ValueError(f"{self.path}:{lineno} is not valid JSON: {exc}") from None
                self.records[self._key(rec, lineno)] = rec
            good = end
        if good < len(data):  # a partial last line (no newline) from a killed writer
            self.dropped_torn_line = True
            with open(self.path, "r+b") as f:
                f.truncate(good)

    def _key(self, rec: Any, lineno: int) -> Any:
        try:
            k = self.key(rec)
            hash(k)
            return k
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{self.path}:{lineno} is not a record of this runner") from None

    def __contains__(self, key: Any) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        if not records:
            return
        keys = [self.key(r) for r in records]
        dup = [k for k in keys if k in self.records]
        if dup or len(set(keys)) != len(keys):
            raise ValueError(f"record(s) {dup or keys} already in {self.path}")
        text = "".join(json.dumps(r) + "\n" for r in records)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        for k, r in zip(keys, records):
            self.records[k] = r

    def reset(self) -> None:
        """Start the file afresh (``--force``)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", encoding="utf-8") as f:
            f.flush()
            os.fsync(f.fileno())
        self.records.clear()


def config_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(set(old) | set(new))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))


def check_config(store: JsonlStore, config: dict[str, Any], force: bool = False) -> None:
    """Refuse an output written with another config (``force``: start it afresh instead)."""
    config = json_safe(config)
    for rec in store.records.values():
        if rec.get("config") != config:
            if force:
                store.reset()
                return
            raise ValueError(
                f"{store.path} was written with a different config ({config_difference(rec.get('config') or {}, config)}):"
                " use another --output, or --force to overwrite it")


def check_output_config(output: str | Path, config: dict[str, Any], force: bool = False,
                        unknown: Sequence[str] = ()) -> None:
    """Refuse, before any model loads, an ``output`` whose records were written with another
    config (:func:`check_config`'s message); the keys in ``unknown`` (known only once the model
    has loaded, e.g. ``chat``) are left to the full check.  Nothing to do with ``force``."""
    if force or not Path(output).exists():
        return
    store = JsonlStore(output)
    drop = set(unknown)
    config = {k: v for k, v in json_safe(config).items() if k not in drop}
    for rec in store.records.values():
        old = {k: v for k, v in (rec.get("config") or {}).items() if k not in drop}
        if old != config:
            raise ValueError(
                f"{store.path} was written with a different config ({config_difference(old, config)}):"
                " use another --output, or --force to overwrite it")


# ------------------------------------------------------------------ progress
class Progress:
    """A tqdm bar over prompts with prompts/s and tokens/s (tokens decoded, all particles)."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, desc: str = "prompts",
                 unit: str = "prompt") -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit=unit,
                        dynamic_ncols=True)
        self.t0 = time.monotonic()
        self.prompts = 0
        self.tokens = 0
        self.errors = 0

    def update(self, records: Sequence[dict[str, Any]], extra: dict[str, Any] | None = None) -> None:
        self.prompts += len(records)
        # dataset records keep the engine's stats under "stats", evaluation records at the top level
        self.tokens += sum(int((r.get("stats") or r).get("tokens_decoded") or 0) for r in records)
        self.errors += sum(r.get("error") is not None for r in records)
        dt = max(time.monotonic() - self.t0, 1e-9)
        post = {"prompts/s": f"{self.prompts / dt:.2f}", "tok/s": f"{self.tokens / dt:.1f}"}
        if self.errors:
            post["errors"] = self.errors
        post.update(extra or {})
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(len(records))

    def close(self) -> None:
        self.bar.close()


# ------------------------------------------------------------------ the run
@dataclass
class Plan:
    """What a run will do: the store (done ids loaded), the full config and the batches to run."""

    store: JsonlStore
    items: list[Item]
    config: dict[str, Any]
    batches: list[Batch]
    max_new_tokens: int

    @property
    def total(self) -> int:
        return len(self.items)

    @property
    def done(self) -> int:
        return sum(1 for it in self.items if it.id in self.store)


def run_config(method_config: dict[str, Any], max_new_tokens: int, batch_prompts: int, seed: int,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config stored with every record: the method's options, the run's and ``extra``."""
    return json_safe({**(extra or {}), **method_config, "max_new_tokens": max_new_tokens,
                       "batch_prompts": batch_prompts, "seed": seed})


def plan_dataset(items: Sequence[Item], output: str | Path, config: dict[str, Any], *,
                 max_new_tokens: int, batch_prompts: int, seed: int, force: bool = False) -> Plan:
    """Load ``output`` (cutting a torn line), check its config, and list the batches still to run.

    Records in ``output`` whose id is not in ``items`` are kept and ignored.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    store = JsonlStore(output)
    check_config(store, config, force)
    batches = make_batches(list(items), batch_prompts, seed, done=lambda it: it.id in store)
    return Plan(store, list(items), json_safe(config), batches, max_new_tokens)


@dataclass
class RunSummary:
    """What a run did: records written now, prompts done in total, error records written now,
    seconds, tokens decoded, and (distributed runs) how many dead workers were replaced."""

    written: int
    done: int
    total: int
    errors: int
    seconds: float
    tokens: int
    restarts: int = 0


def run_dataset(method: Any, target: Any, items: Sequence[Item], output: str | Path, *,
                max_new_tokens: int, batch_prompts: int = 8, seed: int = 0,
                config: dict[str, Any] | None = None, force: bool = False, progress: bool = True,
                time_limit: float | None = None, attempts: int = 2) -> RunSummary:
    """Run every item of ``items`` missing from ``output`` through ``method.run_batch``.

    ``method``: a :class:`llmppl.methods.Method` or any object with
    ``run_batch(target, prompts, max_new_tokens, seed=)`` (and optionally ``config``).
    ``config``: extra fields defining the run (model, chat, ...), stored with each record
    next to the method's config, ``max_new_tokens``, ``batch_prompts`` and ``seed``.
    A batch whose ``run_batch`` raises ``attempts`` times gets error records.
    ``time_limit``: stop cleanly (between batches) after this many seconds.
    """
    cfg = run_config(getattr(method, "config", {}), max_new_tokens, batch_prompts, seed, config)
    plan = plan_dataset(items, output, cfg, max_new_tokens=max_new_tokens, batch_prompts=batch_prompts,
                        seed=seed, force=force)
    todo = [it for b in plan.batches for it in b.items]
    ids = encode_items(target, todo, max_new_tokens)  # every prompt checked before any compute
    k = 0
    for b in plan.batches:
        b.prompt_ids, k = ids[k:k + len(b.items)], k + len(b.items)
    return execute_plan(plan, lambda b: run_batch_records(method, target, b, max_new_tokens, plan.config),
                        progress=progress, time_limit=time_limit, attempts=attempts)


def execute_plan(plan: Plan, run: Callable[[Batch], list[dict[str, Any]]], *, progress: bool = True,
                 time_limit: float | None = None, attempts: int = 2) -> RunSummary:
    """The single-process loop: each batch through ``run`` (retried), written before the next."""
    bar = Progress(plan.total, plan.done, progress)
    t0 = time.monotonic()
    written = errors = 0
    try:
        for b in plan.batches:
            if time_limit is not None and time.monotonic() - t0 > time_limit:
                break
            for attempt in range(attempts):
                try:
                    recs = run(b)
                    break
                except Exception as exc:  # noqa: BLE001 - a failure of this batch's data or engine
                    if attempt + 1 == attempts:
                        recs = error_records(b, describe_failure(exc), plan.config)
            plan.store.write(recs)
            written += len(recs)
            errors += sum(r["error"] is not None for r in recs)
            bar.update(recs)
    finally:
        bar.close()
    return RunSummary(written, plan.done, plan.total, errors, time.monotonic() - t0, bar.tokens)
