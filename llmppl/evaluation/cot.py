"""Chain-of-thought tasks in the papers' format: reason step by step, answer in ``\\boxed{}``.

Every task here prompts with the question followed by :data:`COT_INSTRUCTION` (the
Qwen2.5-Math CoT prompt the power-sampling papers use), extracts the last ``\\boxed{}``
(:func:`~llmppl.evaluation.grading.extract_boxed`) and grades by math-verify equivalence
(:func:`~llmppl.evaluation.grading.equivalent`).  Families (``--task FAMILY:NAME``):

* ``jsonl:PATH`` — one JSON object a line;
* ``parquet:PATH`` — a parquet file (read with pyarrow);
* ``hf:DATASET_ID`` — a hub dataset through ``datasets.load_dataset`` (e.g.
  ``hf:HuggingFaceH4/MATH-500``, ``hf:openai/gsm8k`` with ``{"subset": "main"}``); needs the
  hub (offline it is one clear error line);
* ``reasoning_gym_cot:NAME`` — a reasoning-gym generator (e.g. ``gsm_symbolic``), offline.

Task options (``--task-config`` JSON; for ``reasoning_gym_cot`` every other key goes to the
generator): ``question_field`` (default: the first of ``problem``, ``question`` a row has),
``answer_field`` (default ``answer``), ``split`` (hub, default ``test``), ``subset`` (hub config
name), ``strict`` (only a box counts as an answer; default false), ``instruction`` (replaces
:data:`COT_INSTRUCTION`).  A reference answer written GSM8K-style (``reasoning #### 72``) is
the text after the last ``####``; one with a ``\\boxed{}`` (MATH solutions) is its last box.
Problem ``i`` of a file or hub dataset is its row ``i`` (the seed does not reorder rows).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .grading import equivalent, extract_boxed, last_boxed
from .tasks import Extraction, Problem, Task

#: the instruction after every question (Qwen2.5-Math's chain-of-thought prompt)
COT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

#: task options (all other keys of a reasoning_gym_cot config go to the generator)
TASK_OPTIONS = ("question_field", "answer_field", "split", "subset", "strict", "instruction")


def reference_answer(text: Any) -> str:
    """The gold answer of a dataset row: after the last ``####`` (GSM8K), else the last box, else as is."""
    s = str(text).strip()
    if "####" in s:
        return s.rsplit("####", 1)[1].strip()
    return last_boxed(s) or s


class CoTTask(Task):
    """Problems from ``rows(n)`` (dicts), the CoT prompt, box extraction, math-verify grading."""

    def __init__(self, spec: str, config: dict[str, Any], rows: Any, size_hint: str = "") -> None:
        unknown_types = {k: v for k, v in config.items() if k in ("question_field", "answer_field", "split",
                                                                    "subset", "instruction")
                         and not isinstance(v, str)}
        if unknown_types:
            raise ValueError(f"task options must be strings: {unknown_types}")
        self.spec, self.config = spec, dict(config)
        self.strict = bool(config.get("strict", False))
        self.instruction = config.get("instruction", COT_INSTRUCTION)
        self._rows, self._what = rows, size_hint or spec

    def problems(self, n: int) -> list[Problem]:
        if n < 1:
            raise ValueError(f"the number of problems must be >= 1, got {n}")
        rows = self._rows(n)
        if len(rows) < n:
            raise ValueError(f"{self._what} has {len(rows)} problems, fewer than --n {n}")
        qf, af = self.config.get("question_field"), self.config.get("answer_field", "answer")
        out = []
        for i, row in enumerate(rows[:n]):
            field = qf or next((k for k in ("problem", "question") if k in row), None)
            if field is None or field not in row:
                raise ValueError(f"{self._what} row {i} has no question field "
                                 f"{qf or 'problem/question'!r} (fields: {sorted(row)}); set question_field")
            if af not in row:
                raise ValueError(f"{self._what} row {i} has no answer field {af!r} (fields: {sorted(row)}); "
                                 "set answer_field")
            entry = {k: v for k, v in row.items() if isinstance(v, (str, int, float, bool, type(None)))}
            out.append(Problem(i, str(row[field]), reference_answer(row[af]), entry))
        return out

    def prompt(self, problem: Problem) -> list[dict[str, str]]:
        return [{"role": "user", "content": f"{problem.question}\n{self.instruction}"}]

    def extract(self, completion: str | None) -> Extraction:
        return extract_boxed(completion, strict=self.strict)

    def score(self, answer: str | None, problem: Problem) -> float:
        return float(equivalent(answer, problem.answer))


# ------------------------------------------------------------------ row sources
def _jsonl_rows(path: Path):
    def rows(n: int) -> list[dict]:
        out = []
        with path.open() as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno} is not JSON: {exc}") from None
                if len(out) >= n:
                    break
        return out
    return rows


def _parquet_rows(path: Path):
    def rows(n: int) -> list[dict]:
        try:
            import pyarrow.parquet as pq
        except ModuleNotFoundError as exc:  # pragma: no cover - depends on the install
            raise ModuleNotFoundError("parquet tasks need pyarrow: pip install pyarrow") from exc
        return pq.read_table(path).slice(0, n).to_pylist()
    return rows


def _hub_rows(dataset_id: str, config: dict[str, Any]):
    def rows(n: int) -> list[dict]:
        try:
            import datasets
        except ModuleNotFoundError as exc:  # pragma: no cover - depends on the install
            raise ModuleNotFoundError("hub tasks need the datasets package: pip install datasets") from exc
        split = config.get("split", "test")
        try:
            ds = datasets.load_dataset(dataset_id, config.get("subset"), split=split)
        except Exception as exc:  # offline, unknown id, no such split: one line naming what failed
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ValueError(f"cannot load the hub dataset {dataset_id!r} (split {split!r}); offline or "
                             f"unknown? {type(exc).__name__}: {first}") from None
        return [ds[i] for i in range(min(n, len(ds)))]
    return rows


def _gym_rows(name: str, generator: dict[str, Any], seed: int):
    from .tasks import import_reasoning_gym

    reasoning_gym = import_reasoning_gym()
    try:
        reasoning_gym.create_dataset(name, size=1, seed=seed, **generator)
    except (KeyError, ValueError, TypeError, AssertionError) as exc:
        raise ValueError(f"reasoning_gym cannot build {name!r} with config {generator}: {exc}") from exc

    def rows(n: int) -> list[dict]:
        ds = reasoning_gym.create_dataset(name, size=n, seed=seed, **generator)
        return [{"question": e["question"], "answer": str(e["answer"])} for e in ds]
    return rows


def _file(kind: str, name: str) -> Path:
    path = Path(name).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{kind} task: no file at {name}")
    return path


def make_task(family: str, name: str, config: dict[str, Any], seed: int) -> CoTTask:
    """The CoT task ``family:name`` (see the module docstring)."""
    spec = f"{family}:{name}"
    if family == "jsonl":
        return CoTTask(spec, config, _jsonl_rows(_file("jsonl", name)))
    if family == "parquet":
        return CoTTask(spec, config, _parquet_rows(_file("parquet", name)))
    if family == "hf":
        return CoTTask(spec, config, _hub_rows(name, config), f"hub dataset {name}")
    if family == "reasoning_gym_cot":
        generator = {k: v for k, v in config.items() if k not in TASK_OPTIONS}
        return CoTTask(spec, config, _gym_rows(name, generator, seed))
    raise ValueError(f"unknown CoT task family {family!r}")
