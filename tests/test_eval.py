"""Reasoning evaluation: extraction, scoring, statistics, resumable runner, CLI end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import llmppl as pp
from llmppl.methods import Method
from llmppl.evaluation.runner import (Job, MethodSpec, ResultStore, load_records, record_key, run_eval,
                                      score_result)
from llmppl.evaluation.stats import bootstrap_ci, mcnemar_exact, paired_bootstrap, pass_at_k, wilson
from llmppl.evaluation.registry import get_task
from llmppl.evaluation.tasks import Extraction, Problem, Task, canonical_number, extract_number

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------ extraction
@pytest.mark.parametrize("text, answer, how", [
    ("5 - 3 = 2\nAnswer: 2", "2", "answer-line"),
    ("Step 1: 4 - 1 = 3\nStep 2: 3 - 7 = -4\n\nAnswer: -4.", "-4", "answer-line"),
    ("**Answer:** $-1,234$", "-1234", "answer-line"),
    ("Answer: 5 - 3 - 6 = -4", "-4", "answer-line"),
    ("Answer: 12 apples, since 3*4 = 12", "12", "answer-line"),
    ("answer: 7.50", "7.5", "answer-line"),
    ("The answer is 42", "42", "answer-line"),  # 'is' is allowed before ':' / '=' / nothing
    ("Answer: 3\nWait, Answer: 4", "4", "answer-line"),  # the last Answer line wins
    ("so we get \\boxed{17} as the result", "17", "boxed"),
    ("I think it is 3 or maybe 8", "8", "last-number"),
    ("no digits here", None, "none"),
    ("", None, "none"),
    (None, None, "none"),
])
def test_extract_number(text, answer, how):
    assert extract_number(text) == Extraction(answer, how)


def test_canonical_number():
    assert canonical_number(" +1,000.00 ") == "1000"
    assert canonical_number("−4") == "-4"
    assert canonical_number("2.50") == "2.5"
    assert canonical_number("3/4") == "3/4"
    assert canonical_number("abc") is None


def test_reasoning_gym_task_scoring():
    pytest.importorskip("reasoning_gym")
    task = get_task("reasoning_gym:chain_sum", {"max_terms": 3, "max_digits": 2}, seed=5)
    probs = task.problems(4)
    assert [p.index for p in probs] == [0, 1, 2, 3]
    assert task.problems(2)[1].question == probs[1].question  # problem i depends on (seed, i) only
    p = probs[0]
    assert task.score(p.answer, p) == 1.0
    assert task.score(p.answer + ".0", p) == 1.0
    assert task.score(str(int(p.answer) + 1), p) == 0.0
    assert task.score(None, p) == 0.0
    msgs = task.prompt(p)
    assert msgs[0]["role"] == "user" and "Answer: <number>" in msgs[0]["content"]
    with pytest.raises(ValueError, match="FAMILY:NAME"):
        get_task("chain_sum")
    with pytest.raises(ValueError, match="unknown task family"):
        get_task("nope:chain_sum")


# ------------------------------------------------------------ statistics
def test_wilson_hand_values():
    lo, hi = wilson(5, 10)  # p̂ = .5: centre .5, half = 1.96·sqrt(.025 + .0096)/1.384
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson(3, 2)


def test_pass_at_k_hand_values():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 − C(3,2)/C(5,2)
    assert pass_at_k(8, 1, 8) == 1.0 and pass_at_k(8, 0, 3) == 0.0
    assert pass_at_k(4, 3, 2) == 1.0  # n − c < k


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 12).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_is_the_exact_subset_probability(nck):
    n, c, k = nck
    expected = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_mcnemar_exact_hand_values():
    a = [True] * 6 + [False] * 1 + [True] * 3
    b = [False] * 6 + [True] * 1 + [True] * 3
    mc = mcnemar_exact(a, b)  # 6 vs 1 discordant: p = 2·(C(7,0)+C(7,1))/2^7 = 0.125
    assert (mc.n10, mc.n01) == (6, 1) and mc.p_value == pytest.approx(0.125)
    assert mcnemar_exact([True, False], [True, False]).p_value == 1.0
    assert mcnemar_exact([True] * 5, [False] * 5).p_value == pytest.approx(2 / 32)


def test_bootstrap_intervals():
    assert bootstrap_ci([0.5] * 10) == (0.5, 0.5)
    lo, hi = bootstrap_ci(np.r_[np.zeros(50), np.ones(50)], seed=1)
    assert lo < 0.5 < hi and hi - lo == pytest.approx(2 * 1.96 * 0.05, abs=0.03)
    d, lo, hi = paired_bootstrap([1, 1, 0, 1], [0, 1, 0, 0])
    assert d == pytest.approx(0.5) and lo <= d <= hi


# ------------------------------------------------------------ resumable runner
class _ToyTask(Task):
    """Prompts are token ids; the 'answer' of a completion is its length parity."""

    spec = "toy:parity"
    config: dict = {}

    def problems(self, n):
        return [Problem(i, str(i), str(i % 2)) for i in range(n)]

    def prompt(self, problem):
        return [problem.index % 3]

    def extract(self, completion):
        return Extraction(None, "none")

    def score(self, answer, problem):
        return 0.0


class _Killed(RuntimeError):
    pass


def _jobs(kill_after: int | None = None):
    lm = pp.models.NGramLM(vocab_size=5, order=2, seed=0, eos_boost=3.0)
    calls = {"n": 0}

    def make(name, tau):
        sampler = pp.baselines.Plain(n=3) if tau == 1.0 else pp.baselines.LowTemperature(tau=tau, n=3)

        class Killable:
            def run_batch(self, *a, **k):
                calls["n"] += 1
                if kill_after is not None and calls["n"] > kill_after:
                    raise _Killed("simulated kill")
                return sampler.run_batch(*a, **k)

        method = Method(name, Killable(), {"method": name}, sharpened=False)
        return Job(MethodSpec.parse(name), method, pp.Target(lm), {"method": name})

    return [make("plain", 1.0), make("lowtemp", 0.5)]


def test_resume_after_simulated_kill_loses_and_duplicates_nothing(tmp_path):
    path = tmp_path / "r.jsonl"
    task, problems = _ToyTask(), _ToyTask().problems(5)
    with pytest.raises(_Killed):
        run_eval(task, problems, _jobs(kill_after=3), ResultStore(path), 6, 0, {}, progress=False)
    first = path.read_text().splitlines()
    assert len(first) == 3
    # a writer killed mid-line leaves a torn record: it is cut off, not kept or duplicated
    with open(path, "a") as f:
        f.write('{"task": "toy:parity", "problem": 1, "meth')
    ran = run_eval(task, problems, _jobs(), ResultStore(path), 6, 0, {}, progress=False)
    assert ran == 10 - 3
    lines = path.read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    keys = [(r["problem"], r["method"]) for r in recs]
    assert len(keys) == len(set(keys)) == 10
    assert lines[:3] == first  # finished records are never rewritten
    # same seeds => a resumed record equals the one an uninterrupted run writes
    clean = tmp_path / "clean.jsonl"
    run_eval(task, problems, _jobs(), ResultStore(clean), 6, 0, {}, progress=False)
    strip = lambda r: {k: v for k, v in r.items() if "wall_time" not in k}  # noqa: E731
    by_key = {(r["problem"], r["method"]): strip(r) for r in map(json.loads, clean.read_text().splitlines())}
    assert all(by_key[(r["problem"], r["method"])] == strip(r) for r in recs)
    assert run_eval(task, problems, _jobs(), ResultStore(path), 6, 0, {}, progress=False) == 0


def test_eval_batches_problems_through_the_dataset_runner(tmp_path):
    """One problem a batch keeps the seeds of results files written before the runner; larger
    batches are seeded per batch and resume to the same records."""
    from llmppl.runner import batch_seed

    task, problems = _ToyTask(), _ToyTask().problems(5)
    one = tmp_path / "one.jsonl"
    run_eval(task, problems, _jobs(), ResultStore(one), 6, 3, {}, progress=False)
    assert sorted({(r["problem"], r["seed"]) for r in ResultStore(one).records.values()}) == [
        (i, 3 * 1_000_003 + i) for i in range(5)]
    clean, part = tmp_path / "clean.jsonl", tmp_path / "part.jsonl"
    assert run_eval(task, problems, _jobs(), ResultStore(clean), 6, 3, {}, progress=False, batch_prompts=2) == 10
    recs = list(ResultStore(clean).records.values())
    assert {(r["problem"], r["seed"]) for r in recs} == {(i, batch_seed(3, i // 2)) for i in range(5)}
    with pytest.raises(_Killed):  # killed after 3 run_batch calls: batch 0 both methods, batch 1 plain
        run_eval(task, problems, _jobs(kill_after=3), ResultStore(part), 6, 3, {}, progress=False, batch_prompts=2)
    assert len(part.read_text().splitlines()) == 6
    assert run_eval(task, problems, _jobs(), ResultStore(part), 6, 3, {}, progress=False, batch_prompts=2) == 4
    strip = lambda r: {k: v for k, v in r.items() if "wall_time" not in k}  # noqa: E731
    assert {k: strip(r) for k, r in ResultStore(part).records.items()} == {
        k: strip(r) for k, r in ResultStore(clean).records.items()}


def test_shards_write_the_records_of_one_run(tmp_path):
    """Shards k/n run the batches b = k mod n; merged, they are one run's records."""
    from llmppl.evaluation.cli import parse_shard

    task, problems = _ToyTask(), _ToyTask().problems(5)  # batches of 2: 0, 1, 2
    clean = tmp_path / "clean.jsonl"
    run_eval(task, problems, _jobs(), ResultStore(clean), 6, 3, {}, progress=False, batch_prompts=2)
    paths = [tmp_path / f"shard{k}.jsonl" for k in range(2)]
    ran = [run_eval(task, problems, _jobs(), ResultStore(paths[k]), 6, 3, {}, progress=False,
                    batch_prompts=2, shard=(k, 2)) for k in range(2)]
    assert ran == [3 * 2, 2 * 2]  # shard 0: batches 0 and 2 (3 problems), shard 1: batch 1 (2)
    assert {r["batch"] for r in ResultStore(paths[1]).records.values()} == {1}
    strip = lambda r: {k: v for k, v in r.items() if "wall_time" not in k}  # noqa: E731
    merged = {record_key(r): strip(r) for r in load_records(paths)}
    assert merged == {k: strip(r) for k, r in ResultStore(clean).records.items()}
    assert parse_shard("1/2") == (1, 2) and parse_shard(" 0 / 3 ") == (0, 3)
    for bad in ("2/2", "1", "a/b", "-1/2", "1/0"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)
    with pytest.raises(ValueError, match="shard must be"):
        run_eval(task, problems, _jobs(), ResultStore(paths[0]), 6, 3, {}, progress=False, shard=(2, 2))


def test_resume_refuses_a_different_configuration(tmp_path):
    path = tmp_path / "r.jsonl"
    task, problems = _ToyTask(), _ToyTask().problems(1)
    run_eval(task, problems, _jobs(), ResultStore(path), 4, 0, {"max_new_tokens": 4}, progress=False)
    with pytest.raises(ValueError, match="already holds"):
        run_eval(task, problems, _jobs(), ResultStore(path), 8, 0, {"max_new_tokens": 8}, progress=False)


def test_records_of_two_models_do_not_collide(tmp_path):
    path = tmp_path / "r.jsonl"
    task, problems = _ToyTask(), _ToyTask().problems(2)
    for model in ("a", "b"):
        assert run_eval(task, problems, _jobs(), ResultStore(path), 4, 0, {"model": model}, progress=False) == 4
    assert len(ResultStore(path).records) == 8


def test_score_result_weighted_metrics():
    task = get_task("reasoning_gym:chain_sum", seed=0) if _has_rg() else None
    if task is None:
        pytest.skip("reasoning_gym not installed")
    p = Problem(0, "1 + 1 =", "2", {"answer": "2"})
    res = pp.Result(method="x", prompt_ids=[0], samples=[[1], [2, 3], [4]],
                    log_weights=[math.log(0.2), math.log(0.3), math.log(0.5)],
                    texts=["Answer: 2", "Answer: 3", "Answer: 2"], finished=[True] * 3,
                    truncated=[False] * 3, log_p=[-1.0, -2.0, -3.0], seed=0)
    rec = score_result(task, p, res)
    assert rec["correct"] == [True, False, True]
    assert rec["pass1"] == pytest.approx(0.7)
    assert rec["maj_answer"] == "2" and rec["maj_correct"]
    assert rec["log_p_mean"] == pytest.approx(-0.2 - 0.6 - 1.5)
    assert rec["n_correct"] == 2 and rec["unique"] == 3


def _has_rg() -> bool:
    try:
        import reasoning_gym  # noqa: F401
    except ModuleNotFoundError:
        return False
    return True


def test_method_spec_parsing():
    s = MethodSpec.parse("smc:particles=16:alpha=2.5:resampling=multinomial")
    assert (s.label, s.name) == ("smc:particles=16:alpha=2.5:resampling=multinomial", "smc")
    assert s.options == {"particles": 16, "alpha": 2.5, "resampling": "multinomial"}
    with pytest.raises(ValueError, match="key=value"):
        MethodSpec.parse("smc:16")


# ------------------------------------------------------------ CLI end to end
@pytest.mark.model
def test_cli_end_to_end_with_a_kill(tmp_path):
    pytest.importorskip("reasoning_gym")
    out = tmp_path / "r.jsonl"
    args = ["eval", "--task", "reasoning_gym:chain_sum", "--task-config", '{"max_terms": 2, "max_digits": 1}',
            "--n", "3", "--methods", "plain,lowtemp:particles=1", "--particles", "2",
            "--max-new-tokens", "6", "--json", str(out), "--quiet", "--threads", "1"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "llmppl.cli", *args], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 45
    while proc.poll() is None and time.monotonic() < deadline:
        if out.exists() and out.read_text().count("\n") >= 2:
            proc.kill()  # SIGKILL mid-run
            break
        time.sleep(0.05)
    proc.wait()
    killed_lines = out.read_text().splitlines() if out.exists() else []
    from llmppl.cli import main

    assert main(args) == 0
    lines = out.read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    assert lines[:len(killed_lines)] == killed_lines
    assert sorted((r["problem"], r["method"]) for r in recs) == sorted(
        (i, m) for i in range(3) for m in ("plain", "lowtemp:particles=1"))
    assert all(r["n_samples"] == (1 if r["method"].startswith("lowtemp") else 2) for r in recs)
    assert main(["eval", "--plot", str(out), "--out", str(tmp_path / "plots"), "--note", "Made by a test."]) == 0
    table = (tmp_path / "plots" / "table.md").read_text()
    assert table.startswith("Made by a test.")
    assert "McNemar" in table and "lowtemp:particles=1" in table and "Settings" in table
    assert (tmp_path / "plots" / "accuracy_vs_time.png").stat().st_size > 1000
    assert (tmp_path / "plots" / "pass_at_k.png").exists()


@pytest.mark.model
def test_cli_llamacpp_batched_run_killed_resumes_to_the_uninterrupted_records(tmp_path):
    """The reasoning table's shape of run (llama.cpp, problems batched, a must-finish target):
    SIGKILLed mid-run and resumed, it ends with exactly the records of an uninterrupted run."""
    pytest.importorskip("reasoning_gym")
    pytest.importorskip("llama_cpp")
    from llmppl.cli import main

    def args(out):
        return ["eval", "--task", "reasoning_gym:chain_sum", "--task-config", '{"max_terms": 2, "max_digits": 1}',
                "--n", "6", "--methods", "plain,smc,bestofn", "--particles", "2", "--max-new-tokens", "8",
                "--truncation", "zero", "--batch-prompts", "2", "--backend", "llamacpp", "--n-ctx", "1024",
                "--json", str(out), "--quiet", "--threads", "1"]

    killed = tmp_path / "killed.jsonl"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "llmppl.cli", *args(killed)], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    while proc.poll() is None and time.monotonic() < deadline:
        if killed.exists() and killed.read_text().count("\n") >= 4:
            proc.kill()  # SIGKILL after the first batch of some methods
            break
        time.sleep(0.05)
    proc.wait()
    before = killed.read_text().splitlines()
    assert 0 < len(before) < 18, "the run was not killed mid-way"
    assert main(args(killed)) == 0
    clean = tmp_path / "clean.jsonl"
    assert main(args(clean)) == 0
    lines = killed.read_text().splitlines()
    assert lines[:len(before)] == before  # nothing rewritten
    strip = lambda r: {k: v for k, v in r.items() if "wall_time" not in k and k != "host"}  # noqa: E731
    got = {k: strip(r) for k, r in ResultStore(killed).records.items()}
    assert len(lines) == len(got) == 18  # nothing lost, nothing duplicated
    assert got == {k: strip(r) for k, r in ResultStore(clean).records.items()}
    rec = next(iter(ResultStore(clean).records.values()))
    assert rec["config"]["model"] == "default@llamacpp" and rec["host"]["cpu_count"] >= 1
    from llmppl.benchmarking.engine import code_version
    assert rec["host"]["llmppl"] == code_version()
    smc = [r for r in ResultStore(clean).records.values() if r["method"] == "smc"]
    assert all(r["config"]["truncation"] == "zero" for r in smc)


def test_records_name_the_code_that_made_them():
    """The code version is this checkout's commit (``+modified`` when llmppl/ differs from it), and
    table.md's settings list the versions of a group's records and count those that kept none."""
    from llmppl.benchmarking.engine import code_version
    from llmppl.evaluation.plots import settings

    if (ROOT / ".git").exists():
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", "HEAD", "--", "llmppl"]).returncode != 0
        assert code_version() == head[:12] + ("+modified" if dirty else "")

    def record(problem, host):
        return {"task": "t", "method": "plain", "problem": problem, "config": {"model": "m", "method": "plain"},
                "host": host}

    text = settings([record(0, {"cpu_model": "X", "llmppl": "abc"}), record(1, {"cpu_model": "X", "llmppl": "def"}),
                     record(2, {"cpu_model": "X"})])
    assert "llmppl code: abc, def (1 earlier records did not keep it)." in text
    assert "llmppl code" not in settings([record(0, {"cpu_model": "X"})])


# ------------------------------------------------------------ models fetch
def test_fetch_concatenates_and_checks_size_and_sha256(tmp_path):
    import hashlib

    from llmppl.models.fetch import _concat_checked

    parts = [tmp_path / f"part0{i}.bin" for i in (1, 2, 3)]
    for i, p in enumerate(parts):
        p.write_bytes(bytes([i]) * (1000 + i))
    whole = b"".join(p.read_bytes() for p in parts)
    sha = hashlib.sha256(whole).hexdigest()
    dest = tmp_path / "cache" / "m.gguf"
    _concat_checked(parts, dest, len(whole), sha)
    assert dest.read_bytes() == whole
    with pytest.raises(ValueError, match="sha256"):
        _concat_checked(parts[::-1], tmp_path / "bad.gguf", len(whole), sha)  # wrong order
    with pytest.raises(ValueError, match="bytes"):
        _concat_checked(parts[:2], tmp_path / "bad.gguf", len(whole), sha)
    assert not (tmp_path / "bad.gguf").exists() and not list(tmp_path.glob("bad.gguf.tmp*"))


def test_fetchable_model_is_registered_and_says_how_to_fetch(tmp_path, monkeypatch):
    from llmppl.models.fetch import FETCHABLE, model_status

    monkeypatch.setenv("LLMPPL_CACHE", str(tmp_path))
    assert "qwen2.5-coder-0.5b" in FETCHABLE
    assert model_status("qwen2.5-coder-0.5b").startswith("fetchable")
    with pytest.raises(FileNotFoundError, match="llmppl models fetch qwen2.5-coder-0.5b"):
        pp.models.load_model("qwen2.5-coder-0.5b")
    with pytest.raises(FileNotFoundError, match="llmppl models fetch qwen2.5-coder-0.5b"):
        pp.models.load_model("qwen2.5-coder-0.5b", backend="llamacpp")
    with pytest.raises(ValueError, match="llama.cpp backend only"):
        pp.models.load_model("qwen2.5-coder-0.5b", n_ctx=4096)


def test_progress_counts_the_tokens_of_evaluation_and_dataset_records():
    from llmppl.runner import Progress

    bar = Progress(total=3, enabled=False)
    bar.update([{"tokens_decoded": 40}, {"tokens_decoded": 2}])   # evaluation records (top level)
    bar.update([{"stats": {"tokens_decoded": 7}}])                # `llmppl run` records
    assert bar.tokens == 49 and bar.prompts == 3
    bar.close()
