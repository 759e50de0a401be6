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
