"""``--backend vllm`` through the real command line: ``sample``, ``run``, ``eval``, ``serve`` (a
real server on 127.0.0.1 driven by the ``openai`` client) and ``bench latency``, each a fresh
process on the bundled SmolLM2 through vLLM's CPU engine.

stdout carries what the command promises and nothing of vLLM's own logging; what vLLM cannot
run natively is one clear error (the CLI's one line; HTTP 400 from the server).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

VLLM_LOG = ("(MainProcess pid=", " INFO ", "Traceback")


def _env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
                PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))


def _cli(*args: str, timeout: float = 300.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmppl.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=_env())


def _clean(text: str) -> None:
    for marker in VLLM_LOG:
        assert marker not in text, text


def test_sample_prints_the_answer_and_the_summary_only():
    out = _cli("sample", "--backend", "vllm", "--prompt", "Name three primary colors.", "--alpha", "4",
               "--particles", "2", "--max-new-tokens", "12", "--step", "tokens:4", "--quiet")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    _clean(out.stdout)
    _clean(out.stderr)
    assert out.stderr.strip().splitlines()[-1].startswith("smc: n=2"), out.stderr


def test_sample_refuses_what_vllm_cannot_run_natively():
    # the look-ahead proposal under segment steps needs full-vocabulary log-probabilities
    out = _cli("sample", "--backend", "vllm", "--prompt", "hi", "--method", "smc", "--proposal", "lookahead",
               "--step", "until:.", "--particles", "2", "--max-new-tokens", "4", "--quiet")
    assert out.returncode == 2, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("llmppl: error:") and "full-vocabulary" in last and "HFLM" in last, out.stderr
    _clean(out.stderr)


def test_run_and_eval_write_their_records(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n"
                           for i, p in enumerate(["Name a planet.", "What is 2+2?"])))
    dst = tmp_path / "out.jsonl"
    out = _cli("run", "--backend", "vllm", "--input", str(src), "--output", str(dst), "--method", "mh",
               "--particles", "2", "--max-new-tokens", "8", "--block-size", "4", "--quiet")
    assert out.returncode == 0, out.stderr
    recs = [json.loads(line) for line in dst.read_text().splitlines()]
    assert sorted(r["id"] for r in recs) == [0, 1] and all(r.get("error") is None for r in recs), recs
    assert all(r["text"] for r in recs)

    rec_path = tmp_path / "eval.jsonl"
    out = _cli("eval", "--backend", "vllm", "--task", "reasoning_gym_cot:gsm_symbolic", "--n", "1",
               "--methods", "plain,smc", "--particles", "2", "--alpha", "4", "--max-new-tokens", "16",
               "--json", str(rec_path), "--quiet")
    assert out.returncode == 0, out.stderr
    recs = [json.loads(line) for line in rec_path.read_text().splitlines()]
    assert sorted(r["method"] for r in recs) == ["plain", "smc"], recs
    assert all(r["error"] is None and r["tokens_decoded"] > 0 for r in recs), recs


def test_serve_answers_and_refuses_by_name():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "llmppl.cli", "serve", "--backend", "vllm", "--port", str(port),
                             "--particles", "2", "--max-new-tokens", "8", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(1)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": "Name a planet."}]
        reply = client.chat.completions.create(model="smollm2-135m-instruct", messages=messages, max_tokens=8)
        assert reply.choices[0].message.content
        assert reply.model_extra["llmppl"]["method"] == "smc"
        with pytest.raises(openai.BadRequestError, match="alpha"):
            client.chat.completions.create(model="smollm2-135m-instruct", messages=messages, max_tokens=8,
                                           extra_body={"alpha": -1})
        ok = client.chat.completions.create(model="smollm2-135m-instruct", messages=messages, max_tokens=8,
                                            extra_body={"method": "mh"})
        assert ok.choices[0].message.content      # the server goes on after a refused request
        # look-ahead power sampling runs natively on vLLM (top-k recorded in the engine, rollouts as blocks)
        la = client.chat.completions.create(model="smollm2-135m-instruct", messages=messages, max_tokens=4,
                                            extra_body={"method": "lookahead", "particles": 2})
        assert la.choices[0].message.content and la.model_extra["llmppl"]["method"] == "lookahead"
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=60)
    _clean(out)


def test_bench_latency_times_vllm_beside_hf(tmp_path):
    path = tmp_path / "latency.json"
    out = _cli("bench", "latency", "--backend", "vllm", "--compare", "hf", "--block", "2", "--prompts", "2",
               "--particles", "2", "--max-new-tokens", "4", "--reps", "1", "--json", str(path))
    assert out.returncode == 0, out.stderr
    res = json.loads(path.read_text())
    assert res["backend"] == "vllm" and res["compare"]["backend"] == "hf", res
    assert res["smc_over_plain_same_rows"] > 0 and res["compare"]["smc_over_plain_same_rows"] > 0
