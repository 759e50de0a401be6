"""Chain-of-thought tasks: local JSONL / parquet datasets, hub ids offline, reasoning-gym's
gsm_symbolic offline, and the evaluation loop scoring CoT replies with the math-verify grader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import llmppl as pp
from llmppl.evaluation.cot import COT_INSTRUCTION, reference_answer
from llmppl.evaluation.runner import Job, MethodSpec, ResultStore, run_eval
from llmppl.evaluation.registry import get_task
from llmppl.methods import Method

pytest.importorskip("math_verify")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
JSONL = DATA / "gsm_mini.jsonl"
GOLD = ["72", "10", "5,000", "\\frac{5}{2}"]


def test_reference_answers():
    assert reference_answer("48+24 = <<48+24=72>>72\n#### 72") == "72"          # GSM8K
    assert reference_answer("so the area is $\\boxed{\\frac{\\pi}{4}}$.") == "\\frac{\\pi}{4}"  # MATH
    assert reference_answer(" 3\\sqrt{13} ") == "3\\sqrt{13}"                  # MATH-500's answer field
    assert reference_answer(17) == "17"


def test_jsonl_task_prompt_extract_score():
    task = get_task(f"jsonl:{JSONL}")
    probs = task.problems(4)
    assert [p.answer for p in probs] == GOLD
    assert probs[0].question.startswith("Natalia sold clips")
    (msg,) = task.prompt(probs[0])
    assert msg["role"] == "user" and msg["content"].endswith(COT_INSTRUCTION) and "\\boxed{}" in msg["content"]
    assert task.score(task.extract("48/2 = 24, 48 + 24 = 72. \\boxed{72}").answer, probs[0]) == 1.0
    assert task.score(task.extract("\\boxed{5000}").answer, probs[2]) == 1.0   # gold written 5,000
    assert task.score(task.extract("\\boxed{2.5}").answer, probs[3]) == 1.0    # gold written \frac{5}{2}
    assert task.score(task.extract("\\boxed{71}").answer, probs[0]) == 0.0
    assert task.score(None, probs[0]) == 0.0
    strict = get_task(f"jsonl:{JSONL}", {"strict": True})
    assert strict.extract("so 72 clips").answer is None and task.extract("so 72 clips").answer == "72"


def test_parquet_task_reads_the_fixture_as_parquet(tmp_path):
    """The JSONL fixture written as parquet (pyarrow: no binary fixture is committed) loads the same problems."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in JSONL.read_text().splitlines()]
    path = tmp_path / "gsm_mini.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    a = get_task(f"jsonl:{JSONL}").problems(4)
    b = get_task(f"parquet:{path}").problems(4)
    assert [(p.question, p.answer) for p in a] == [(p.question, p.answer) for p in b]


def test_field_names_and_bad_input(tmp_path):
    path = tmp_path / "math.jsonl"
    path.write_text(json.dumps({"problem": "What is $1/2 + 1/4$?", "solution": "$\\boxed{\\frac34}$"}) + "\n")
    task = get_task(f"jsonl:{path}", {"answer_field": "solution"})
    (p,) = task.problems(1)
    assert p.question == "What is $1/2 + 1/4$?" and p.answer == "\\frac34"  # the question field found
    assert task.score("0.75", p) == 1.0
    with pytest.raises(ValueError, match="no answer field 'answer'"):
        get_task(f"jsonl:{path}").problems(1)
    with pytest.raises(ValueError, match="no question field 'q'"):
        get_task(f"jsonl:{path}", {"question_field": "q", "answer_field": "solution"}).problems(1)
    with pytest.raises(ValueError, match="has 1 problems, fewer than --n 3"):
        task.problems(3)
    with pytest.raises(FileNotFoundError, match="no file at"):
        get_task("jsonl:/nonexistent/x.jsonl")
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"math.jsonl:1 is not JSON"):
        get_task(f"jsonl:{path}").problems(1)


def test_hub_dataset_offline_is_one_clear_error():
    """Offline (or without the datasets package) a hub id is one error line naming what failed."""
    code = ("from llmppl.evaluation.registry import get_task\n"
            "try:\n    get_task('hf:HuggingFaceH4/MATH-500').problems(2)\n"
            "except (ValueError, ModuleNotFoundError) as e:\n    print('ERR', e)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    line = out.stdout.strip()
    try:
        import datasets  # noqa: F401
        expected = "ERR cannot load the hub dataset 'HuggingFaceH4/MATH-500'"
    except ModuleNotFoundError:
        expected = "ERR hub tasks need the datasets package"
    assert line.startswith(expected), out
    assert "\n" not in line


def test_gsm_symbolic_offline():
    pytest.importorskip("reasoning_gym")
    task = get_task("reasoning_gym_cot:gsm_symbolic", seed=0)
    probs = task.problems(3)
    assert task.problems(2)[1].question == probs[1].question  # problem i depends on (seed, i) only
    for p in probs:
        assert p.question and task.score(p.answer, p) == 1.0
        assert task.score(task.extract(f"... so \\boxed{{{p.answer}}}").answer, p) == 1.0
        assert task.score(str(float(p.answer) + 1), p) == 0.0
    assert get_task("reasoning_gym_cot:gsm_symbolic", {"strict": True}, seed=0).strict
    with pytest.raises(ValueError, match="reasoning_gym cannot build"):
        get_task("reasoning_gym_cot:gsm_symbolic", {"nonsense_option": 3})


def test_run_eval_scores_cot_replies_and_reweights(tmp_path, monkeypatch):
    """A fake engine returning fixed replies: the records hold the boxed answers, their grades
    (an equivalent form counts), the weights and the weighted pass@1."""
    task = get_task(f"jsonl:{JSONL}")
    problems = task.problems(2)
    replies = {0: ["48+24 = 72 so \\boxed{72}", "\\boxed{70}", "it is 72"],
               1: ["\\boxed{\\frac{20}{2}}", "\\boxed{10.5}", "no idea"]}

    class Fixed:
        def run_batch(self, target, prompts, max_new_tokens, seed=None):
            out = []
            for i, _ in enumerate(prompts):
                texts = replies[i]
                out.append(pp.Result(method="fixed", prompt_ids=[0], samples=[[1], [2], [3]],
                                     log_weights=[0.0, -1.0, -2.0], texts=texts, finished=[True] * 3,
                                     truncated=[False] * 3, log_p=[-1.0, -2.0, -3.0], seed=seed))
            return out

    lm = pp.models.NGramLM(vocab_size=5, order=2, seed=0)
    job = Job(MethodSpec.parse("fixed"), Method("fixed", Fixed(), {"method": "fixed"}, False),
              pp.Target(lm), {"method": "fixed"})
    from llmppl import runner as dataset

    # the toy LM has no tokenizer: every prompt is encoded as one token
    monkeypatch.setattr(dataset, "encode_items", lambda target, items, T: [[0]] * len(items))
    store = ResultStore(tmp_path / "r.jsonl")
    assert run_eval(task, problems, [job], store, 8, 0, {}, progress=False, batch_prompts=2) == 2
    recs = sorted(store.records.values(), key=lambda r: r["problem"])
    assert recs[0]["answers"] == ["72", "70", "72"] and recs[0]["correct"] == [True, False, True]
    assert recs[0]["extracted_how"] == ["boxed", "boxed", "last-number"]
    assert recs[1]["answers"] == ["\\frac{20}{2}", "10.5", None] and recs[1]["correct"] == [True, False, False]
    import math

    w = [math.exp(-k) for k in range(3)]
    assert recs[0]["pass1"] == pytest.approx((w[0] + w[2]) / sum(w))
    assert recs[1]["pass1"] == pytest.approx(w[0] / sum(w))


def test_table_reports_box_only_pass1_and_failed_runs(tmp_path):
    """The summary of CoT records: pass@1 under a box-only grader, the boxed share, and a
    must-finish run whose every sample was cut (no answer) counted as wrong, not dropped."""
    from llmppl.evaluation.plots import markdown, paired_tests, summarise
    from llmppl.evaluation.runner import score_result

    task = get_task(f"jsonl:{JSONL}")
    p = task.problems(1)[0]
    ok = pp.Result(method="x", prompt_ids=[0], samples=[[1], [2]], log_weights=[0.0, 0.0],
                   texts=["\\boxed{72}", "so 72"], finished=[True, True], truncated=[False, False],
                   log_p=[-1.0, -2.0], seed=0)
    dead = pp.Result(method="x", prompt_ids=[0], samples=[[1], [2]], log_weights=[-float("inf")] * 2,
                     texts=["...", "..."], finished=[False, False], truncated=[True, True],
                     log_p=[-1.0, -2.0], seed=0, error="every particle has weight zero")

    def rec(method, problem, res):
        return {"task": task.spec, "problem": problem, "method": method, "wall_time": 1.0,
                "config": {"model": "m", "method": method}, **score_result(task, p, res)}

    recs = [rec("plain", 0, ok), rec("plain", 1, ok), rec("reweight", 0, ok), rec("reweight", 1, dead)]
    rows = {r["method"]: r for r in summarise(recs)}
    assert rows["plain"]["pass1"] == 1.0 and rows["plain"]["pass1_boxed"] == 0.5 and rows["plain"]["boxed"] == 0.5
    assert rows["reweight"]["pass1"] == 0.5 and rows["reweight"]["failed"] == 0.5
    assert rows["reweight"]["samples"] == 2 and rows["reweight"]["pass_at_k"] == [0.5, 0.5]
    tests = paired_tests(recs)
    text = markdown(list(rows.values()), tests)
    header, align = text.splitlines()[2:4]
    assert header.count("|") == align.count("|") == text.splitlines()[4].count("|")
    assert "pass@1 box only" in header and "no answer (all cut)" in header
    # the dead run answered nothing: only problem 0 counts, where both returned 72
    assert (tests[0]["both_answered"], tests[0]["same_answer"]) == (1, 1) and "| 1/1 |" in text


def test_same_answer_is_equivalence_not_text():
    from llmppl.evaluation.plots import same_answer

    assert same_answer("72", " 72") and same_answer("\\frac{1}{2}", "0.5") and same_answer("1,000", "1000")
    assert not same_answer("72", "27") and not same_answer("0.51", "0.5") and not same_answer("2", "-2")
    assert not same_answer(None, "72") and not same_answer("72", None) and not same_answer("72", "seventy")


@pytest.mark.model
def test_cli_cot_run_on_the_default_model_pairs_reweight_with_plain(tmp_path):
    """``llmppl eval`` on the JSONL fixture with llama.cpp: CoT prompt, records graded, and
    ``reweight`` holding exactly plain's samples (same seed), only weighted."""
    pytest.importorskip("llama_cpp")
    from llmppl.cli import main

    out = tmp_path / "r.jsonl"
    assert main(["eval", "--task", f"jsonl:{JSONL}", "--n", "2", "--methods", "plain,reweight",
                 "--particles", "3", "--max-new-tokens", "12", "--backend", "llamacpp",
                 "--batch-prompts", "2", "--n-ctx", "2048", "--threads", "1", "--quiet", "--json", str(out)]) == 0
    recs = {(r["problem"], r["method"]): r for r in map(json.loads, out.read_text().splitlines())}
    assert len(recs) == 4
    for i in range(2):
        plain, rew = recs[(i, "plain")], recs[(i, "reweight")]
        assert plain["reference"] == GOLD[i] and plain["config"]["task_config"] == {}
        assert rew["error"] is None and rew["texts"] == plain["texts"] and rew["answers"] == plain["answers"]
        assert rew["weights"] != plain["weights"]  # p(y)^(alpha-1), not uniform
