"""The command line: method registry and argument handling."""

import argparse

import llmppl as pp
from llmppl.cli import METHODS, main
from llmppl.models import NGramLM


def test_cli_methods_use_particles_as_chains_and_samples(tmp_path):
    """``--particles`` sets the number of SMC particles, MH chains and look-ahead samples."""
    target = pp.Target(NGramLM(vocab_size=4, seed=0), pp.Power(2.0))
    ns = argparse.Namespace(particles=3, alpha=2.0, resampling="systematic", ess_threshold=0.5,
                            quiet=True, block_size=2, n_mcmc=1, top_k=2, rollouts=1, horizon=2,
                            max_new_tokens=4)
    for name, build in METHODS.items():
        method = build(ns, name)
        res = method.run(target, [0], 4, seed=0)
        (batched,) = method.run_batch(target, [[0]], 4, seed=0)
        assert batched.samples == res.samples, name
        assert res.n == (1 if name == "greedy" else 3), name


def test_bad_alpha_is_a_clear_error(capsys):
    assert main(["sample", "--prompt", "hi", "--alpha", "-1", "--quiet"]) == 2
    assert "alpha must be finite and > 0" in capsys.readouterr().err


# ------------------------------------------------------------------ bad input: one clear line
import os
import subprocess
import sys

import pytest
import torch


def _sample_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "llmppl.cli", "sample", "--prompt", "hi", "--quiet",
                           "--max-new-tokens", "4", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _one_line_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr and "Exception" not in proc.stderr, proc.stderr
    # one error line, the last one (transformers may draw its weight-loading bar before it)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("llmppl: error:"), proc.stderr
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize("args,words", [
    (("--model", "/nonexistent/model"), ("/nonexistent/model",)),
    (("--method", "mh", "--block-size", "0"), ("--block-size", "0")),
], ids=["model", "block-size"])
def test_bad_input_is_one_line(args, words):
    _one_line_error(_sample_cli(*args), *words)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_cuda_on_a_cpu_only_torch_is_one_line():
    _one_line_error(_sample_cli("--device", "cuda"), "cuda", "not available")


def test_too_many_particles_are_refused_with_both_numbers():
    """100000 particles used to fill the machine until the kernel killed the run; the estimate
    (KV cache + logits from the model config) refuses it at once, with needed and available."""
    line = _one_line_error(_sample_cli("--particles", "100000"), "100000 rows", "needs about", "available")
    assert line.count("GiB") >= 3


def test_memory_estimate_matches_a_real_cache(smollm, chat_prompt):
    """kv_bytes_per_token (from the config) against the bytes of a real HFState's KV cache."""
    from llmppl.models.memory import NotEnoughMemory, check_memory, estimate_memory, kv_bytes_per_token

    state = smollm.start(chat_prompt, 3, max_new_tokens=4)
    state.extend([[1], [2], [3]])
    layers = state.cache.layers
    per_row_token = sum(la.keys.nbytes + la.values.nbytes for la in layers) / (
        layers[0].keys.shape[0] * layers[0].keys.shape[2])
    assert kv_bytes_per_token(smollm) == per_row_token
    est = estimate_memory(smollm, 10, 100)
    assert est["kv_cache"] == 1000 * per_row_token and est["logits"] == 10 * smollm.vocab_size * 12
    with pytest.raises(NotEnoughMemory, match="needs about .* available"):
        check_memory(smollm, 10, 100, available=est["total"] // 2)
    assert check_memory(smollm, 10, 100, available=2 * est["total"]) == est
    with pytest.raises(NotEnoughMemory):
        smollm.start(chat_prompt, 10**6, max_new_tokens=64)     # the library refuses it too


# ------------------------------------------------------------------ sampler options
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from llmppl.methods import PROPOSALS, SCHEDULES, build_method, parse_step  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "llmppl.cli", *args], capture_output=True, text=True,
                          env=env, timeout=600)


def test_parse_step():
    assert repr(parse_step("tokens:3")) == "Tokens(3)" and repr(parse_step("token")) == "Tokens(1)"
    assert parse_step("until:\\n\\n").delimiter == "\n\n"
    assert parse_step("until:.").delimiter == "."
    for bad in ("tokens:0", "tokens:x", "tokens", "until:", "segments:3", ""):
        with pytest.raises(ValueError, match="--step"):
            parse_step(bad)


def _ns(**kw):
    base = dict(particles=2, alpha=2.0, resampling="systematic", ess_threshold=0.5, quiet=True, block_size=2,
                n_mcmc=1, top_k=2, rollouts=1, horizon=2, max_new_tokens=4)
    return argparse.Namespace(**{**base, **kw})


def test_every_proposal_and_schedule_builds_the_engine_it_names():
    classes = {"temperature": "Temperature", "base": "Base", "locally-optimal": "LocallyOptimal",
               "lookahead": "Lookahead"}
    assert set(PROPOSALS) == set(classes)
    for name, cls in classes.items():
        assert type(build_method("smc", _ns(proposal=name)).engine.proposal).__name__ == cls
    assert build_method("smc", _ns(proposal="temperature")).engine.proposal.tau == pytest.approx(0.5)
    for name, cls in zip(SCHEDULES, ("Constant", "Linear", "Geometric", "AdaptiveESS")):
        method = build_method("smc", _ns(schedule=name, bridge_steps=3))
        assert type(method.engine.schedule).__name__ == cls
        assert (method.config.get("schedule") == name) == (name != "constant")   # defaults stay out of config
    assert build_method("smc", _ns(step="tokens:4")).config["step"] == "tokens:4"


def test_the_options_change_the_run_on_a_toy_target():
    """A linear bridge from p^1 reports its exponents; the constant schedule stays at alpha."""
    target = pp.Target(NGramLM(vocab_size=4, seed=0), pp.Power(2.0))
    lin = build_method("smc", _ns(schedule="linear", bridge_steps=3)).run(target, [0], 4, seed=0)
    const = build_method("smc", _ns()).run(target, [0], 4, seed=0)
    assert lin.steps["exponent"][0] == pytest.approx(1.0 + (2.0 - 1.0) / 3)
    assert all(a == pytest.approx(2.0) for a in const.steps["exponent"])


@pytest.mark.parametrize("args, message", [
    (["--schedule", "fast"], "unknown --schedule 'fast'; choose from constant, linear, geometric, adaptive"),
    (["--proposal", "foo"], "unknown --proposal 'foo'; choose from temperature, base, locally-optimal, lookahead"),
    (["--step", "tokens:0"], "--step tokens:K needs an integer K >= 1, got 'tokens:0'"),
    (["--step", "chunks"], "--step must be tokens:K or until:DELIM, got 'chunks'"),
    (["--truncation", "maybe"], "--truncation must be keep or zero, got 'maybe'"),
    (["--method", "mh", "--schedule", "linear"], "--schedule applies to --method smc, not mh"),
    (["--method", "plain", "--truncation", "zero"], "--truncation zero needs a method that samples p^alpha"),
])
def test_bad_sampler_options_are_one_line_errors(args, message):
    for command in (["sample", "--prompt", "hi"], ["run", "--input", "missing.jsonl", "--output", "o.jsonl"]):
        out = _cli(*command, *args)
        assert out.returncode == 2, out.stderr
        assert out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr, out.stderr
        assert message in out.stderr


@pytest.mark.model
def test_sample_with_every_option_on_the_default_model():
    """The real CLI on SmolLM2 with tiny settings: it prints an answer, and stderr holds the
    one-line summary and nothing else (no warning, no progress bar)."""
    out = _cli("sample", "--prompt", "Name three primary colors.", "--particles", "2", "--max-new-tokens", "6",
               "--schedule", "linear", "--bridge-steps", "3", "--proposal", "locally-optimal",
               "--step", "tokens:2", "--truncation", "keep", "--quiet")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    assert out.stderr.strip().startswith("smc: n=2") and out.stderr.strip().count("\n") == 0, out.stderr
