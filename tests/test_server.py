"""``llmppl serve``: a real uvicorn server on 127.0.0.1 driven by the official ``openai`` client and httpx.

Error paths, queueing and disconnects run on a toy LM whose forward pass sleeps (so a batch lasts
long enough to queue behind it); completions, batching of 32 concurrent clients and the CLI run
on the default SmolLM2 model.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn

import llmppl as pp
from llmppl.models import LanguageModel, NGramLM
from llmppl.server import ServerConfig, create_app

KEY = "test-key"


class SlowLM(LanguageModel):
    """A toy LM whose forward pass takes ``delay`` seconds (a stand-in for a big model's cost).

    Tokens 1-3 and EOS (5) follow a seeded bigram table, except that a sequence starting with 2
    never ends (it runs ``max_tokens`` steps: a request of known duration), and after token 0 the
    next token is always 4, which the toy server's potential forbids: a prompt ending in 0 kills
    every particle.  A batch holding a sequence that starts with 3, 3, 3 makes the forward raise.
    """

    def __init__(self, delay: float = 0.0, max_context: int = 32) -> None:
        super().__init__(vocab_size=6, eos_token_id=5, max_context=max_context, name="toy")
        self.delay = delay
        self.table = NGramLM(vocab_size=6, seed=0, eos_token_id=5)

    def next_logprobs(self, sequences):
        if self.delay:
            time.sleep(self.delay)
        if any(s[:3] == [3, 3, 3] for s in sequences):
            raise RuntimeError("toy forward failure")
        rows = []
        for s in sequences:
            lp = torch.full((6,), -torch.inf)
            if s[-1] == 0:
                lp[4] = 0.0
            else:
                allowed = [1, 2, 3] if s[0] == 2 else [1, 2, 3, 5]
                lp[allowed] = self.table.distribution((s[-1],))[allowed]
                lp = torch.log_softmax(lp, -1)
            rows.append(lp)
        return torch.stack(rows)


#: the toy server's extra factor: token 4 is forbidden
NO_FOUR = pp.Constraint(mask=[0, 1, 2, 3, 5])


@contextlib.contextmanager
def running_server(lm, config, potential=None):
    """A uvicorn server in a thread on a free 127.0.0.1 port; yields (base_url, app)."""
    app = create_app(lm, config, potential)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start within 30 s"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def _client(base, key=KEY, timeout=60.0):
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=timeout)


def _health(base):
    r = httpx.get(base + "/health", timeout=10)
    assert r.status_code == 200
    return r.json()


def _wait_for(base, pred, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = _health(base)
        if pred(h):
            return h
        time.sleep(0.01)
    raise AssertionError(f"server state not reached within {timeout} s: {_health(base)}")


# ================================================================ toy LM: errors, queue, disconnects
@pytest.fixture(scope="module")
def toy():
    lm = SlowLM()
    config = ServerConfig(model_name="toy", particles=4, max_tokens=4, max_tokens_limit=16, max_particles=8,
                          api_key=KEY, max_body_bytes=4096, queue_size=8)
    with running_server(lm, config, potential=NO_FOUR) as (base, _):
        yield base, lm


def test_text_completion_with_extra_body_and_n(toy):
    base, _ = toy
    r = _client(base).completions.create(model="toy", prompt=[1, 2], max_tokens=5, n=3,
                                         extra_body={"alpha": 2.0, "particles": 5, "resampling": "multinomial"})
    assert r.object == "text_completion" and r.model == "toy"
    info = r.model_extra["llmppl"]
    # n > 1: the n heaviest *distinct* completions (fewer when the particles hold fewer)
    assert 1 <= len(r.choices) <= 3 and [c.index for c in r.choices] == list(range(len(r.choices)))
    assert len(r.choices) == min(3, info["distinct_completions"])
    assert len({tuple(d["tokens"]) for d in info["choices"]}) == len(r.choices)
    assert info["method"] == "smc" and info["alpha"] == 2.0 and info["particles"] == 5
    assert info["n_particles"] == 5 and 1.0 <= info["ess"] <= 5.0 + 1e-9
    masses = [c["mass"] for c in info["choices"]]
    assert masses == sorted(masses, reverse=True) and sum(masses) <= 1 + 1e-9
    assert all(c["mass"] >= c["weight"] - 1e-12 and c["particles_with_it"] >= 1 for c in info["choices"])
    for c, d in zip(r.choices, info["choices"]):
        assert c.finish_reason == ("length" if len(d["tokens"]) == 5 else "stop")
        assert 1 <= len(d["tokens"]) <= 5 or c.finish_reason == "stop"
    assert r.usage.prompt_tokens == 2
    assert r.usage.completion_tokens == info["tokens_decoded"] >= max(len(d["tokens"]) for d in info["choices"])
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_several_prompts_in_one_request(toy):
    base, _ = toy
    r = _client(base).completions.create(model="toy", prompt=[[1, 2], [3, 1, 2]], n=2, max_tokens=3)
    per_prompt = r.model_extra["llmppl"]["prompts"]
    assert [c.index for c in r.choices] == list(range(len(r.choices)))
    assert len(r.choices) == sum(min(2, p["distinct_completions"]) for p in per_prompt)
    assert len(per_prompt) == 2 and r.usage.prompt_tokens == 5
    assert r.usage.completion_tokens == sum(p["tokens_decoded"] for p in per_prompt)


def test_seed_makes_a_request_reproducible(toy):
    base, _ = toy
    c = _client(base)
    a, b = (c.completions.create(model="toy", prompt=[2, 3], max_tokens=6, n=4, seed=11,
                                 extra_body={"particles": 4}) for _ in range(2))
    toks = lambda r: [d["tokens"] for d in r.model_extra["llmppl"]["choices"]]
    assert toks(a) == toks(b) and a.model_extra["llmppl"]["seed"] == 11


def test_stream_sends_progress_then_the_answer(toy):
    """SMC's answer exists only when the run ends: the stream says where the request is (progress
    events, no choices), then sends the answer, then the usage."""
    base, lm = toy
    lm.delay = 0.3
    try:
        chunks = list(_client(base).completions.create(model="toy", prompt=[2, 1], max_tokens=6, stream=True,
                                                       stream_options={"include_usage": True}))
    finally:
        lm.delay = 0.0
    progress = [c for c in chunks if not c.choices and c.usage is None]
    answer = [c for c in chunks if c.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert len(answer) == 1 and chunks.index(answer[0]) == len(chunks) - 2
    assert answer[0].choices[0].finish_reason in ("stop", "length") and "llmppl" in answer[0].model_extra
    statuses = [c.model_extra["llmppl"]["progress"]["status"] for c in progress]
    assert statuses[0] in ("queued", "running") and "running" in statuses, statuses  # a 2 s run: progress seen


def test_api_key_required_except_health(toy):
    base, _ = toy
    with pytest.raises(openai.AuthenticationError) as e:
        _client(base, key="wrong").models.list()
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        _client(base, key="wrong").completions.create(model="toy", prompt=[1], max_tokens=2)
    r = httpx.post(base + "/v1/completions", json={"model": "toy", "prompt": [1]})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert [m.id for m in _client(base).models.list().data] == ["toy"]
    assert httpx.get(base + "/health").json()["status"] == "ok"  # no key needed


@pytest.mark.parametrize("extra, param, words", [
    ({"alpha": 0}, "alpha", "greater than 0"),
    ({"alpha": -1.5}, "alpha", "greater than 0"),
    ({"alpha": "4"}, "alpha", "must be a number"),
    ({"method": "beam"}, "method", "unknown method 'beam'"),
    ({"particles": 0}, "particles", "greater than or equal to 1"),
    ({"particles": 9}, "particles", "limit of 8"),
    ({"particles": 2.5}, "particles", "integer"),
    ({"resampling": "magic"}, "resampling", "unknown resampling"),
    ({"ess_threshold": 1.5}, "ess_threshold", "less than or equal to 1"),
    ({"method": "plain", "alpha": 2.0}, "alpha", "does not apply to method 'plain'"),
    ({"n_mcmc": 2}, "n_mcmc", "does not apply to method 'smc'"),
    ({"method": "mh", "n_mcmc": 1000}, "n_mcmc", "limit"),
    ({"particlez": 4}, "particlez", "unknown field"),
    ({"temperature": 0.7}, "temperature", "alpha"),
    ({"logprobs": 2}, "logprobs", "not supported"),
    ({"stop": ["\n"]}, "stop", "target"),
    ({"n": 5}, "n", "particles"),
    ({"max_tokens": 17}, "max_tokens", "limit of 16"),
    ({"seed": -1}, "seed", "greater than or equal to 0"),
])
def test_bad_fields_are_400_naming_the_field(toy, extra, param, words):
    base, _ = toy
    body = dict(extra)
    std = {k: body.pop(k) for k in ("n", "max_tokens", "seed", "stop", "temperature", "logprobs") if k in body}
    with pytest.raises(openai.BadRequestError) as e:
        _client(base).completions.create(model="toy", prompt=[1, 2], extra_body=body, **std)
    assert e.value.status_code == 400 and e.value.param == param, e.value.body
    assert words in e.value.body["message"], e.value.body


def test_bad_bodies_are_400_not_422_or_500(toy):
    base, _ = toy
    h = {"Authorization": f"Bearer {KEY}"}
    cases = [
        (b'{"model": "toy", "prompt": [1], "alpha": NaN}', "alpha", "finite"),
        (b'{"model": "toy", "prompt": [1], "alpha": Infinity}', "alpha", "finite"),
        (b'{"model": "toy", "prompt": [1], "alpha": 1e999}', "alpha", "finite"),
        (b'{"model": "toy", "prompt": [1]', None, "not valid JSON"),
        (b'[1, 2]', None, "JSON object"),
        (b'{"model": "toy"}', "prompt", "required"),
        (b'{"model": "toy", "prompt": []}', "prompt", "empty"),
        (b'{"model": "toy", "prompt": [1.5]}', "prompt", "token ids"),
        (b'{"model": "toy", "prompt": "text"}', "prompt", "no tokenizer"),
        (b'{"model": "toy", "prompt": [7]}', "prompt", "out of range"),
        (b'{"model": "toy", "prompt": [1], "n": true}', "n", "integer"),
        (b'{"model": "toy", "messages": []}', "messages", "at least 1"),
        (b'{"model": "toy", "messages": [{"role": "user"}]}', "messages", "chat template"),
        (b'{"model": "toy", "messages": [{"role": "wizard", "content": "x"}]}', "messages", "role"),
    ]
    for raw, param, words in cases:
        ep = "/v1/chat/completions" if b"messages" in raw else "/v1/completions"
        r = httpx.post(base + ep, content=raw, headers=h, timeout=30)  # no Content-Type, like curl -d
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == param and words in err["message"], (raw, err)
        assert err["type"] == "invalid_request_error"


def test_prompt_over_the_context_is_400(toy):
    base, lm = toy
    with pytest.raises(openai.BadRequestError) as e:
        _client(base).completions.create(model="toy", prompt=[1] * (lm.max_context - 3), max_tokens=4)
    assert e.value.param == "prompt" and e.value.code == "context_length_exceeded"
    assert "context of 32 tokens" in e.value.body["message"]


def test_unknown_model_and_route_are_404(toy):
    base, _ = toy
    with pytest.raises(openai.NotFoundError) as e:
        _client(base).completions.create(model="gpt-4", prompt=[1], max_tokens=2)
    assert e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        _client(base).models.retrieve("gpt-4")
    r = httpx.get(base + "/v2/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_body_over_the_limit_is_413(toy):
    base, _ = toy
    r = httpx.post(base + "/v1/completions", json={"model": "toy", "prompt": [1] * 3000},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 413 and "4096 bytes" in r.json()["error"]["message"]


def _post(base, body, timeout=30.0):
    return httpx.post(base + "/v1/completions", json={"model": "toy", **body},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=timeout)


def test_dead_prompt_fails_only_its_own_request(toy):
    """Batched with a healthy request, a request whose particles all die gets its own 422."""
    base, lm = toy
    lm.delay = 0.1
    try:
        with ThreadPoolExecutor(3) as pool:
            blocker = pool.submit(_post, base, {"prompt": [2], "max_tokens": 8})
            _wait_for(base, lambda h: h["running"] == 1)
            good = pool.submit(_post, base, {"prompt": [2, 3], "max_tokens": 3})
            bad = pool.submit(_post, base, {"prompt": [3, 0], "max_tokens": 3})
            _wait_for(base, lambda h: h["queued"] == 2)
            good, bad = good.result(30), bad.result(30)
            assert blocker.result(30).status_code == 200
    finally:
        lm.delay = 0.0
    assert good.status_code == 200, good.text
    assert good.json()["llmppl"]["batch"]["requests"] == 2  # they shared one run_batch
    assert bad.status_code == 422
    err = bad.json()["error"]
    assert err["code"] == "all_particles_died" and "weight zero" in err["message"]


def test_a_batch_that_raises_is_rerun_request_by_request(toy):
    """If run_batch raises, each request of the batch runs alone: only the culprit fails (a 500)."""
    base, lm = toy
    lm.delay = 0.1
    try:
        with ThreadPoolExecutor(3) as pool:
            blocker = pool.submit(_post, base, {"prompt": [2], "max_tokens": 8})
            _wait_for(base, lambda h: h["running"] == 1)
            before = _health(base)["stats"]
            good = pool.submit(_post, base, {"prompt": [1, 2], "max_tokens": 2})
            broken = pool.submit(_post, base, {"prompt": [3, 3, 3], "max_tokens": 2})
            _wait_for(base, lambda h: h["queued"] == 2)
            good, broken = good.result(30), broken.result(30)
            assert blocker.result(30).status_code == 200
    finally:
        lm.delay = 0.0
    assert good.status_code == 200 and good.json()["choices"]
    assert broken.status_code == 500 and broken.json()["error"]["code"] == "sampling_failed"
    assert "toy forward failure" in broken.json()["error"]["message"]
    after = _health(base)["stats"]
    assert after["batch_failures"] - before["batch_failures"] == 1


def test_full_queue_is_429_and_a_disconnected_client_is_dropped(toy):
    """queue_size=1: one request runs, one waits, the next is refused; clients that leave are dropped."""
    lm = SlowLM(delay=0.05)
    config = ServerConfig(model_name="toy", particles=2, max_tokens=4, api_key=KEY, queue_size=1)
    with running_server(lm, config) as (base, _), ThreadPoolExecutor(4) as pool:
        first = pool.submit(_post, base, {"prompt": [2], "max_tokens": 10})
        _wait_for(base, lambda h: h["running"] == 1)
        second = pool.submit(_post, base, {"prompt": [1], "max_tokens": 2})
        _wait_for(base, lambda h: h["queued"] == 1)
        with pytest.raises(openai.RateLimitError) as e:
            _client(base).completions.create(model="toy", prompt=[3], max_tokens=2)
        assert e.value.status_code == 429 and e.value.code == "queue_full"
        assert first.result(30).status_code == 200 and second.result(30).status_code == 200
        assert _health(base)["stats"]["rejected"] == 1

        # a client that gives up while its request runs, and one that gives up while queued
        running = pool.submit(_post, base, {"prompt": [2], "max_tokens": 16})
        _wait_for(base, lambda h: h["running"] == 1)
        with pytest.raises(httpx.ReadTimeout):
            _post(base, {"prompt": [1], "max_tokens": 10}, timeout=0.3)  # queued behind it, then gone
        _wait_for(base, lambda h: h["stats"]["disconnected"] == 1 and h["queued"] == 0)
        assert running.result(30).status_code == 200  # the batch it was waiting for is undisturbed
        with pytest.raises(httpx.ReadTimeout):
            _post(base, {"prompt": [2], "max_tokens": 10}, timeout=0.3)  # leaves mid-batch
        h = _wait_for(base, lambda h: h["stats"]["disconnected"] == 2 and h["running"] == 0)
        assert h["status"] == "ok"
        after = _post(base, {"prompt": [1, 2], "max_tokens": 2})
        assert after.status_code == 200 and after.json()["choices"]
        stats = _health(base)["stats"]
        assert stats["requests"] == 6 and stats["batched_requests"] == 5  # the one dropped while queued never ran


# ================================================================ the default model
@pytest.fixture(scope="module")
def smol_server(smollm):
    # one intra-op thread: on a shared 2-core box, two OpenMP threads spin against other loads (10x slower)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    config = ServerConfig(model_name="smollm2", particles=2, max_tokens=6, max_tokens_limit=32, api_key=KEY,
                          queue_size=64, max_batch_prompts=32)
    try:
        with running_server(smollm, config) as (base, _):
            yield base
    finally:
        torch.set_num_threads(threads)


@pytest.mark.model
def test_chat_completion_on_the_default_model(smol_server):
    r = _client(smol_server).chat.completions.create(
        model="smollm2", messages=[{"role": "system", "content": "Answer briefly."},
                                   {"role": "user", "content": "Name a primary color."}],
        max_tokens=6, n=2, extra_body={"method": "smc", "alpha": 4.0, "particles": 3, "ess_threshold": 0.9})
    info = r.model_extra["llmppl"]
    # n = 2 distinct completions, or fewer when the particles collapsed onto one
    assert r.object == "chat.completion" and len(r.choices) == min(2, info["distinct_completions"]) >= 1
    for c in r.choices:
        assert c.message.role == "assistant" and isinstance(c.message.content, str)
        assert c.finish_reason in ("stop", "length")
    assert any(c.message.content.strip() for c in r.choices)
    info = r.model_extra["llmppl"]
    assert info["particles"] == 3 and info["alpha"] == 4.0
    assert info["log_evidence"] is not None and info["log_evidence"] < 0
    assert 1.0 <= info["ess"] <= 3.0 + 1e-9 and isinstance(info["resampling_count"], int)
    assert info["wall_time"] > 0
    longest = max(len(d["tokens"]) for d in info["choices"])
    assert r.usage.completion_tokens == info["tokens_decoded"] >= max(longest, 3)  # every particle's tokens

    chunks = list(_client(smol_server).chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Hi!"}], max_tokens=4, stream=True,
        extra_body={"particles": 2}))
    answer = [c for c in chunks if c.choices]
    assert len(answer) == 1 and answer[0].object == "chat.completion.chunk"  # the whole answer, once
    assert all("progress" in c.model_extra["llmppl"] for c in chunks if not c.choices)
    delta = answer[0].choices[0].delta
    assert delta.role == "assistant" and isinstance(delta.content, str)
    assert answer[0].choices[0].finish_reason in ("stop", "length")


@pytest.mark.model
def test_text_completion_mh_and_context_limit_on_the_default_model(smol_server):
    c = _client(smol_server)
    r = c.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=4,
                             extra_body={"method": "mh", "particles": 2, "block_size": 2, "n_mcmc": 1})
    assert len(r.choices) == 1 and r.choices[0].text and r.model_extra["llmppl"]["method"] == "mh"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="smollm2", prompt=" hello" * 8190, max_tokens=8)
    assert e.value.code == "context_length_exceeded" and "8192" in e.value.body["message"]


@pytest.mark.model
def test_32_concurrent_clients_are_served_in_batches(smol_server):
    before = _health(smol_server)["stats"]
    prompts = [f"Say the number {i}." for i in range(32)]

    def ask(i):
        c = _client(smol_server, timeout=120)
        if i % 2:
            return c.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": prompts[i]}],
                                             max_tokens=3, extra_body={"particles": 2})
        return c.completions.create(model="smollm2", prompt=prompts[i], max_tokens=3, extra_body={"particles": 2})

    def leave():  # a client that disconnects mid-request does not break the batch
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(smol_server + "/v1/completions", json={"model": "smollm2", "prompt": "Hi", "max_tokens": 3},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=httpx.Timeout(10, read=0.5))

    with ThreadPoolExecutor(33) as pool:
        futures = [pool.submit(ask, i) for i in range(32)]
        gone = pool.submit(leave)
        answers = [f.result(timeout=180) for f in futures]
        gone.result(timeout=30)
    assert all(a.choices and a.usage.completion_tokens > 0 for a in answers)
    after = _wait_for(smol_server, lambda h: h["running"] == 0 and h["queued"] == 0)
    calls = after["stats"]["batches"] - before["batches"]
    served = after["stats"]["batched_requests"] - before["batched_requests"]
    assert served >= 32 and calls < 32 / 2, after["stats"]  # served together, not one run_batch each
    assert max(a.model_extra["llmppl"]["batch"]["requests"] for a in answers) > 1
    assert after["stats"]["disconnected"] - before["disconnected"] == 1
    r = _client(smol_server).completions.create(model="smollm2", prompt="Hello", max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")  # still healthy


# ================================================================ the command line
def test_serve_rejects_bad_flags_before_loading_a_model(capsys):
    from llmppl.cli import main

    assert main(["serve", "--alpha", "nan"]) == 2
    assert "alpha must be finite and > 0" in capsys.readouterr().err
    assert main(["serve", "--particles", "100", "--max-particles", "64"]) == 2
    assert "exceeds max_particles" in capsys.readouterr().err


@pytest.mark.model
def test_llmppl_serve_command(tmp_path):
    """``llmppl serve`` as a user starts it, answering the openai client; the sampler flags reach the
    server (``/health`` shows them); Ctrl-C with a request in flight answers it with a 503 JSON error
    and logs no traceback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "LLMPPL_API_KEY": KEY,
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    base = f"http://127.0.0.1:{port}"
    with open(tmp_path / "serve.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "llmppl.cli", "serve", "--port", str(port), "--particles", "2",
                                 "--max-new-tokens", "4", "--log-level", "warning", "--schedule", "linear",
                                 "--bridge-steps", "3", "--step", "tokens:2", "--proposal", "locally-optimal",
                                 "--threads", "1"], env=env, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 150
            while True:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                assert time.monotonic() < deadline, "llmppl serve did not come up within 150 s"
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(base + "/health", timeout=2).status_code == 200:
                        break
                time.sleep(0.5)
            h = _health(base)
            assert h["config"]["particles"] == 2 and h["config"]["auth"] and h["model"] == "smollm2-135m-instruct"
            assert (h["config"]["schedule"], h["config"]["bridge_steps"], h["config"]["step"],
                    h["config"]["proposal"]) == ("linear", 3, "tokens:2", "locally-optimal")
            with pytest.raises(openai.AuthenticationError):
                _client(base, key="nope").models.list()
            r = _client(base).chat.completions.create(model="smollm2-135m-instruct",
                                                      messages=[{"role": "user", "content": "Hi!"}])
            assert r.choices[0].message.content and r.model_extra["llmppl"]["particles"] == 2

            # Ctrl-C while a long request runs: it gets an OpenAI-style 503, the server exits cleanly
            with ThreadPoolExecutor(1) as pool:
                pending = pool.submit(httpx.post, base + "/v1/completions", timeout=120,
                                      headers={"Authorization": f"Bearer {KEY}"},
                                      json={"model": "smollm2-135m-instruct", "prompt": "Once upon a time",
                                            "max_tokens": 256, "particles": 8})
                _wait_for(base, lambda h: h["running"] == 1, timeout=60)
                proc.send_signal(signal.SIGINT)
                answer = pending.result(timeout=60)
            assert answer.status_code == 503, answer.text
            assert answer.json()["error"]["code"] == "server_shutting_down"
            assert proc.wait(30) == 0
            text = (tmp_path / "serve.log").read_text()
            assert "CancelledError" not in text and "Traceback" not in text, text
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
