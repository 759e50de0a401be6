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


def _cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
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
    _one_line_error(_cli(*args), *words)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_cuda_on_a_cpu_only_torch_is_one_line():
    _one_line_error(_cli("--device", "cuda"), "cuda", "not available")


def test_too_many_particles_are_refused_with_both_numbers():
    """100000 particles used to fill the machine until the kernel killed the run; the estimate
    (KV cache + logits from the model config) refuses it at once, with needed and available."""
    line = _one_line_error(_cli("--particles", "100000"), "100000 rows", "needs about", "available")
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
