"""The dataset runner (``llmppl.runner`` and ``llmppl run``): records, carried fields, bad input,
config mismatch, per-prompt failures, and resume — including a real SIGKILL mid-run."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import llmppl as pp
from llmppl import runner
from llmppl.cli import main
from llmppl.methods import build_method
from llmppl.models import NGramLM

ROOT = Path(__file__).resolve().parents[1]
TOY = "toy-runner-ngram"


def _toy_lm(device="cpu", dtype=None):
    lm = NGramLM(vocab_size=6, order=2, seed=3, eos_boost=2.0)
    lm.max_context = 12
    return lm


pp.models.register_model(TOY, _toy_lm)


def _ns(**kw):
    base = dict(particles=3, alpha=2.0, resampling="systematic", ess_threshold=0.5, quiet=True,
                block_size=2, n_mcmc=1, top_k=2, rollouts=1, horizon=2, max_new_tokens=5, tau=None)
    base.update(kw)
    return argparse.Namespace(**base)


def _write(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _rows(n: int):
    return [{"id": f"q{i}", "prompt": [i % 5, (2 * i) % 5], "topic": f"t{i % 3}", "meta": {"k": i}}
            for i in range(n)]


def _strip(rec):
    """A record without its timings (the only fields two identical runs may differ in)."""
    rec = dict(rec)
    rec["stats"] = {k: v for k, v in (rec.get("stats") or {}).items() if k not in ("wall_time", "peak_memory")}
    return rec


def _read(path: Path):
    return [json.loads(x) for x in path.read_text().splitlines()]


# ------------------------------------------------------------------ records
@pytest.mark.parametrize("name", ["smc", "mh", "plain", "greedy", "lowtemp", "bestofn", "lookahead"])
def test_every_method_writes_one_record_per_prompt_with_its_fields(tmp_path, one_thread, name):
    items = runner.items_from_records(_rows(5))
    method = build_method(name, _ns())
    target = pp.Target(_toy_lm(), pp.Power(method.target_alpha(2.0)))
    out = tmp_path / "out.jsonl"
    s = runner.run_dataset(method, target, items, out, max_new_tokens=5, batch_prompts=2, seed=7,
                           config={"model": TOY}, progress=False)
    recs = _read(out)
    assert s.written == s.done == s.total == 5 and s.errors == 0
    assert [r["id"] for r in recs] == [f"q{i}" for i in range(5)]
    n = 1 if name == "greedy" else 3
    for i, r in enumerate(recs):
        assert r["topic"] == f"t{i % 3}" and r["meta"] == {"k": i}  # carried unchanged
        assert r["error"] is None and r["prompt_tokens"] == 2
        assert len(r["samples"]) == len(r["weights"]) == n
        assert r["tokens"] in r["samples"]
        assert sum(r["weights"]) == pytest.approx(1.0)
        assert 1.0 - 1e-9 <= r["ess"] <= n + 1e-9
        assert r["n_finished"] + r["n_truncated"] == n
        assert isinstance(r["finished"], bool) and r["truncated"] == (not r["finished"])
        assert r["stats"]["tokens_decoded"] >= 0 and r["stats"]["forward_passes"] > 0
        assert r["batch"] == i // 2 and r["seed"] == runner.batch_seed(7, i // 2)
        assert r["config"]["method"] == name and r["config"]["seed"] == 7
        assert r["config"]["batch_prompts"] == 2 and r["config"]["model"] == TOY
    if name == "smc":
        assert all(isinstance(r["log_evidence"], float) for r in recs)


def test_records_are_the_engines_run_batch_results(tmp_path, one_thread):
    """A record is ``run_batch`` of its batch with the batch's seed (nothing else decides it)."""
    items = runner.items_from_records(_rows(4))
    method = build_method("smc", _ns())
    target = pp.Target(_toy_lm(), pp.Power(2.0))
    out = tmp_path / "out.jsonl"
    runner.run_dataset(method, target, items, out, max_new_tokens=5, batch_prompts=3, seed=1, progress=False)
    recs = _read(out)
    direct = method.run_batch(target, [it.prompt for it in items[3:]], 5, seed=runner.batch_seed(1, 1))
    assert recs[3]["samples"] == direct[0].samples
    assert recs[3]["log_evidence"] == pytest.approx(direct[0].log_evidence)


def test_batch_seeds_are_distinct_and_reproducible():
    seeds = [runner.batch_seed(0, b) for b in range(100)]
    assert len(set(seeds)) == 100 and seeds == [runner.batch_seed(0, b) for b in range(100)]
    assert runner.batch_seed(1, 0) != runner.batch_seed(0, 1)


# ------------------------------------------------------------------ resume
def test_resume_writes_the_same_records_as_an_uninterrupted_run(tmp_path, one_thread):
    items = runner.items_from_records(_rows(7))
    method = build_method("smc", _ns())
    target = pp.Target(_toy_lm(), pp.Power(2.0))
    kw = dict(max_new_tokens=5, batch_prompts=3, seed=4, progress=False)
    clean = tmp_path / "clean.jsonl"
    runner.run_dataset(method, target, items, clean, **kw)
    full = clean.read_text().splitlines()
    # a kill mid-write: batch 0 complete, one record of batch 1, then a torn line
    part = tmp_path / "part.jsonl"
    part.write_text("\n".join(full[:4]) + "\n" + full[4][: len(full[4]) // 2])
    s = runner.run_dataset(method, target, items, part, **kw)
    assert s.written == 3  # q4, q5 (batch 1 re-run whole, q3 not rewritten) and q6
    lines = part.read_text().splitlines()
    assert lines[:4] == full[:4]
    got = {r["id"]: _strip(r) for r in map(json.loads, lines)}
    assert len(lines) == len(got) == 7
    assert got == {r["id"]: _strip(r) for r in map(json.loads, full)}
    assert runner.run_dataset(method, target, items, part, **kw).written == 0


# ------------------------------------------------------------------ failures
class _ForkLM(pp.models.LanguageModel):
    """After a prompt starting with token 2 the completion ends at once (EOS, probability ~1);
    after any other prompt the first token is never EOS, later ones uniform."""

    def __init__(self):
        super().__init__(vocab_size=6, eos_token_id=5, name="ForkLM")

    def next_logprobs(self, sequences):
        tiny = math.log(1e-12)
        rows = []
        for s in sequences:
            if s[0] == 2:
                row = [tiny] * 5 + [0.0]
            elif len(s) == 2:
                row = [math.log(0.2)] * 5 + [tiny]
            else:
                row = [math.log(1 / 6)] * 6
            rows.append(row)
        return torch.log_softmax(torch.tensor(rows), dim=-1)


def test_a_prompt_whose_particles_all_die_gets_an_error_record_and_the_run_goes_on(tmp_path, one_thread):
    items = runner.items_from_records(_rows(5))  # q2's prompt starts with token 2: every particle ends empty
    target = pp.Target(_ForkLM(), pp.Power(2.0) * pp.Constraint(lambda c: len(c.token_ids) > 0))
    out = tmp_path / "out.jsonl"
    s = runner.run_dataset(build_method("smc", _ns()), target, items, out, max_new_tokens=5,
                           batch_prompts=2, seed=0, progress=False)
    recs = {r["id"]: r for r in _read(out)}
    assert s.errors == 1 and len(recs) == 5
    assert "weight zero" in recs["q2"]["error"] or "died" in recs["q2"]["error"], recs["q2"]["error"]
    assert recs["q2"]["samples"] == [] and recs["q2"]["text"] is None and recs["q2"]["topic"] == "t2"
    assert all(recs[k]["error"] is None and all(recs[k]["samples"]) for k in ("q0", "q1", "q3", "q4"))


def test_a_batch_that_raises_twice_is_written_as_error_records(tmp_path, one_thread):
    class Flaky:
        config = {"method": "flaky"}
        calls = 0

        def run_batch(self, target, prompts, max_new_tokens, seed=None):
            Flaky.calls += 1
            if [1, 2] in prompts:
                raise RuntimeError("cannot do this batch")
            return pp.baselines.Plain(n=2).run_batch(target, prompts, max_new_tokens, seed=seed)

    items = runner.items_from_records(_rows(6))  # q1 = [1, 2] is in batch 0
    out = tmp_path / "out.jsonl"
    s = runner.run_dataset(Flaky(), pp.Target(_toy_lm()), items, out, max_new_tokens=4,
                           batch_prompts=2, seed=0, progress=False)
    recs = {r["id"]: r for r in _read(out)}
    assert Flaky.calls == 2 + 2  # batch 0 tried twice, batches 1 and 2 once each
    assert s.errors == 2 and recs["q0"]["error"] == recs["q1"]["error"] == "RuntimeError: cannot do this batch"
    assert all(recs[f"q{i}"]["error"] is None for i in range(2, 6))


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("lines, message", [
    (['{"id": 1, "prompt": [1]}', '{"id": 2, "prompt": [1]'], r"in\.jsonl:2: malformed JSON line"),
    (['{"id": 1, "prompt": [1]}', '', '{"prompt": [1]}'], "line 3: missing 'id'"),
    (['{"id": "a", "prompt": [1]}', '{"id": "b", "prompt": [2]}', '{"id": "a", "prompt": [3]}'],
     "line 3: duplicate id 'a' \\(first on line 1\\)"),
    (['{"id": 1}'], "line 1: id 1 has no 'prompt'"),
    (['{"id": 1, "prompt": 5}'], "line 1: id 1: 'prompt' must be a text"),
    (['{"id": null, "prompt": [1]}'], "line 1: 'id' must be a string or an integer"),
    (['{"id": 1, "prompt": [1], "text": "mine"}'], r"field\(s\) \['text'\] would be overwritten"),
    (['[1, 2]'], "line 1: expected a JSON object"),
    ([''], "holds no prompts"),
])
def test_bad_input_names_the_line_and_id(tmp_path, capsys, lines, message):
    import re

    inp = _write(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    assert main(["run", "--input", str(inp), "--output", str(out), "--model", TOY, "--quiet"]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


def test_a_prompt_over_the_context_is_named_before_any_compute(tmp_path, capsys):
    rows = _rows(3) + [{"id": "long", "prompt": [1] * 10}]  # 10 + 5 > the toy context of 12
    inp = _write(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    args = ["run", "--input", str(inp), "--output", str(out), "--model", TOY, "--max-new-tokens", "5",
            "--batch-prompts", "1", "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "prompt id 'long' (line 4)" in err and "exceeds the model's context of 12" in err
    assert not out.exists() or out.read_text() == ""  # nothing ran, not even the prompts before it


def test_an_output_written_with_another_config_is_refused_unless_forced(tmp_path, capsys, one_thread):
    inp = _write(tmp_path / "in.jsonl", _rows(3))
    out = tmp_path / "out.jsonl"
    base = ["run", "--input", str(inp), "--output", str(out), "--model", TOY, "--method", "plain",
            "--particles", "2", "--max-new-tokens", "4", "--quiet"]
    assert main(base) == 0
    before = out.read_text()
    assert main(base + ["--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "was written with a different config (seed: 0 -> 1)" in err and "--force" in err
    assert out.read_text() == before
    assert main(base + ["--particles", "3"]) == 2
    assert "particles: 2 -> 3" in capsys.readouterr().err
    assert main(base + ["--seed", "1", "--force"]) == 0
    recs = _read(out)
    assert len(recs) == 3 and all(r["config"]["seed"] == 1 for r in recs)


def test_cli_arguments_are_checked_before_the_model_loads(tmp_path, capsys):
    inp = _write(tmp_path / "in.jsonl", _rows(2))
    base = ["run", "--input", str(inp), "--output", str(tmp_path / "o.jsonl"), "--model", "no-such-model"]
    for extra, msg in [(["--workers", "0"], "--workers must be >= 1, got 0"),
                       (["--batch-prompts", "0"], "--batch-prompts must be >= 1"),
                       (["--alpha", "0"], "--alpha must be finite and > 0"),
                       (["--ray-address", "auto"], "--ray-address and --gpus-per-worker need --workers")]:
        assert main(base + extra) == 2
        assert msg in capsys.readouterr().err
    assert main(["run", "--input", str(tmp_path / "missing.jsonl"), "--output", "o.jsonl"]) == 2
    assert "no input file at" in capsys.readouterr().err


def test_run_without_workers_never_imports_ray(tmp_path):
    inp = _write(tmp_path / "in.jsonl", _rows(2))
    code = (
        "import sys, llmppl as pp\n"
        "from llmppl.models import NGramLM\n"
        f"pp.models.register_model('{TOY}', lambda device='cpu', dtype=None: NGramLM(vocab_size=6, seed=3))\n"
        "from llmppl.cli import main\n"
        f"assert main(['run', '--input', {str(inp)!r}, '--output', {str(tmp_path / 'o.jsonl')!r}, "
        f"'--model', '{TOY}', '--method', 'plain', '--max-new-tokens', '3', '--quiet']) == 0\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(_read(tmp_path / "o.jsonl")) == 2


# ------------------------------------------------------------------ default model, real kill
@pytest.mark.model
def test_sigkill_mid_run_then_resume_loses_and_duplicates_nothing(tmp_path):
    rows = [{"id": i, "prompt": f"Say the number {i}.", "n": i} for i in range(8)]
    rows[3]["prompt"] = [{"role": "user", "content": "Name a colour."}]
    inp = _write(tmp_path / "in.jsonl", rows)
    out, clean = tmp_path / "out.jsonl", tmp_path / "clean.jsonl"
    args = ["run", "--input", str(inp), "--method", "smc", "--particles", "2", "--max-new-tokens", "6",
            "--batch-prompts", "2", "--seed", "3", "--threads", "1", "--quiet"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "llmppl.cli", *args, "--output", str(out)], env=env,
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    killed = False
    while proc.poll() is None and time.monotonic() < deadline:
        if out.exists() and out.read_text().count("\n") >= 2:
            proc.kill()  # SIGKILL mid-run
            killed = True
            break
        time.sleep(0.02)
    proc.wait(timeout=30)
    assert killed, "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
    before = out.read_text().splitlines()
    assert 2 <= len(before) < 8
    torch.set_num_threads(1)
    assert main([*args, "--output", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[:len(before)] == before  # finished records are never rewritten
    ids = [json.loads(x)["id"] for x in lines]
    assert sorted(ids) == list(range(8))  # none lost, none duplicated
    assert main([*args, "--output", str(clean)]) == 0
    resumed = {r["id"]: _strip(r) for r in map(json.loads, lines)}
    assert resumed == {r["id"]: _strip(r) for r in _read(clean)}
    assert resumed[3]["n"] == 3 and isinstance(resumed[3]["text"], str)
