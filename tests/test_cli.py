"""The command line: method registry and argument handling."""

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llmppl as pp
from llmppl.cli import METHODS, main
from llmppl.methods import PROPOSALS, SCHEDULES, build_method, parse_step
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
    (["--step", "tokens:0"], "--step tokens:K needs an integer K >= 1, got 'tokens:0'"),
    (["--step", "chunks"], "--step must be tokens:K or until:DELIM, got 'chunks'"),
    (["--method", "mh", "--schedule", "linear"], "--schedule applies to --method smc, not mh"),
    (["--method", "plain", "--truncation", "zero"], "--truncation zero needs a method that samples p^alpha"),
    (["--threads", "zero"], "--threads must be an integer >= 1 or auto, got 'zero'"),
    (["--tau", "-1"], "--tau must be finite and > 0"),
])
def test_bad_sampler_options_are_one_line_errors(args, message):
    for command in (["sample", "--prompt", "hi"], ["run", "--input", "missing.jsonl", "--output", "o.jsonl"]):
        out = _cli(*command, *args)
        assert out.returncode == 2, out.stderr
        assert out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr, out.stderr
        assert message in out.stderr


@pytest.mark.parametrize("flag, value", [("--schedule", "fast"), ("--proposal", "foo"), ("--truncation", "maybe"),
                                         ("--resampling", "best")])
def test_named_options_are_choices_in_every_command(flag, value):
    """--schedule, --proposal, --truncation and --resampling are argparse choices wherever they appear:
    a bad value is refused with the usage and one error line listing the choices."""
    for command in (["sample", "--prompt", "hi"], ["run", "--input", "i.jsonl", "--output", "o.jsonl"],
                    ["eval", "--task", "reasoning_gym:chain_sum"], ["serve"]):
        out = _cli(*command, flag, value)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        last = out.stderr.strip().splitlines()[-1]
        assert f"argument {flag}: invalid choice: '{value}'" in last, out.stderr


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
    assert "peak memory" in out.stderr and "bytes" not in out.stderr


# ------------------------------------------------------------------ the first hour (issue 40)
def _fresh_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_import_llmppl_and_help_load_no_torch_and_no_app_layer():
    """``import llmppl`` and every ``--help`` import neither torch nor the app layer (runner, Ray glue,
    the method registry, the CLI's option tables); the public names still resolve on first use."""
    out = _fresh_python(
        "import sys, contextlib, io\n"
        "import llmppl as pp\n"
        "heavy = ('torch', 'transformers', 'llmppl.runner', 'llmppl.methods', 'llmppl.distributed', 'llmppl.options',"
        " 'llmppl.server', 'ray')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
        "from llmppl.cli import main\n"
        "for argv in (['--help'], ['sample', '--help'], ['run', '--help'], ['serve', '--help'], ['eval', '--help']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        main(argv)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'llmppl.methods') if m in sys.modules))\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["[]", "[]"], out.stdout


def test_every_public_name_resolves():
    import llmppl

    for name in llmppl.__all__ + ["inference", "diagnostics", "rewards", "server"]:
        assert getattr(llmppl, name) is not None, name
    assert llmppl.SMC is llmppl.inference.SMC and llmppl.Power is llmppl.targets.Power
    assert set(llmppl.__all__) <= set(dir(llmppl))


def test_option_tables_match_the_registries():
    """llmppl.options (read by --help without torch) names what llmppl.methods builds."""
    from llmppl import options
    from llmppl.inference.resampling import RESAMPLERS
    from llmppl.methods import METHODS

    assert options.METHOD_NAMES == tuple(sorted(METHODS))
    assert options.PROPOSAL_NAMES == tuple(PROPOSALS) and options.SCHEDULE_NAMES == tuple(SCHEDULES)
    assert options.RESAMPLING_NAMES == tuple(sorted(RESAMPLERS))


def test_help_shows_defaults():
    out = _cli("sample", "--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for shown in ("(default: 16)", "(default: constant)", "(default: auto)", "(default: systematic)",
                  "(default: keep)", "(default: sample)"):
        assert shown in text, shown


def test_schedule_linear_without_bridge_steps_uses_the_default(tmp_path):
    """The README's ``--schedule linear`` (no --bridge-steps) used to fail with 'steps must be an int >= 1,
    got None'; sample, run and eval parse it to a 16-step bridge."""
    from llmppl.cli import build_parser
    from llmppl.evaluation.runner import MethodSpec, method_namespace

    for argv in (["sample", "--prompt", "x", "--schedule", "linear"],
                 ["run", "--input", "i", "--output", "o", "--schedule", "geometric"],
                 ["eval", "--task", "t", "--json", "j", "--schedule", "linear"]):
        args = build_parser(argv).parse_args(argv)
        ns = method_namespace(MethodSpec.parse("smc"), args) if argv[0] == "eval" else args
        method = build_method("smc", ns)
        assert method.engine.schedule.steps == 16 and method.config["schedule"] == argv[-1]


def test_method_registry_takes_typed_keywords():
    from llmppl.methods import MethodOptions

    m = build_method("smc", particles=3, alpha=2.0, schedule="linear", bridge_steps=4)
    assert m.engine.n_particles == 3 and m.engine.schedule.steps == 4 and m.sharpened
    mh = build_method("mh", MethodOptions(particles=2, max_new_tokens=8))
    assert mh.batch_kwargs == {"chains": 2} and mh.engine.block_size == 2
    with pytest.raises(ValueError, match="unknown method option"):
        build_method("smc", particle=3)
    with pytest.raises(ValueError, match="--bridge-steps"):
        build_method("smc", schedule="linear", bridge_steps=0)


def test_threads_and_device_resolution():
    from llmppl.options import auto_threads, parse_threads, resolve_device, resolve_dtype

    assert parse_threads("auto") is None and parse_threads("3") == 3
    for bad in ("0", "-1", "x", "1.5"):
        with pytest.raises(ValueError, match="--threads"):
            parse_threads(bad)
    assert 1 <= auto_threads() <= (os.cpu_count() or 1)
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    assert resolve_dtype(None, "cpu") is None and resolve_dtype(None, "cuda") == "bfloat16"
    assert resolve_dtype(None, "cuda", "llamacpp") is None and resolve_dtype("float16", "cuda") == "float16"


def test_every_command_takes_threads():
    """``--threads`` on every command and every benchmark (a busy machine runs all threads 5-15x slower)."""
    from llmppl.cli import build_parser

    def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            yield path, parser
        for action in subs:
            for name, child in action.choices.items():
                yield from commands(child, path + (name,))

    found = dict(commands(build_parser()))
    assert ("bench", "latency") in found and ("sample",) in found
    for path, parser in found.items():
        if path[:1] == ("models",):
            continue     # list, fetch or convert model files: no sampling
        assert any("--threads" in a.option_strings for a in parser._actions), path


def test_vllm_backend_without_vllm_is_one_line():
    """--backend vllm from a venv without vLLM: one error line naming the install, no traceback."""
    pytest.importorskip("torch")
    try:
        import vllm  # noqa: F401
        pytest.skip("vLLM is installed here")
    except ImportError:
        pass
    _one_line_error(_sample_cli("--backend", "vllm"), "vLLM")


def test_run_refuses_a_changed_config_before_loading_the_model(tmp_path):
    """An --output written with another config is refused at once: the model path here does not exist,
    and the error is about the config, not the model (which would have been loaded first before)."""
    (tmp_path / "in.jsonl").write_text('{"id": 1, "prompt": "hi"}\n')
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"id": 1, "text": "x", "config": {"method": "smc", "particles": 99}}) + "\n")
    proc = _cli("run", "--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--model", "/nonexistent/m")
    assert proc.returncode == 2 and "different config" in proc.stderr and "particles: 99 -> 8" in proc.stderr


def test_select_max_prints_the_heaviest_completion():
    """--select max: the completion with the largest summed weight over identical particles."""
    from llmppl.diagnostics.completions import distinct_completions, select_index

    res = pp.Result(method="smc", prompt_ids=[0], samples=[[1], [2], [2], [2]],
                    log_weights=[math.log(0.4), math.log(0.2), math.log(0.2), math.log(0.2)], seed=0)
    comps = distinct_completions(res)
    assert [c.tokens for c in comps] == [[2], [1]] and comps[0].mass == pytest.approx(0.6)
    assert comps[0].count == 3 and select_index(res, "max") == 1
    assert res.best_index("max") == 0  # the single heaviest particle is not the heaviest completion


def test_a_model_verifies_itself_on_its_first_load_only(tmp_path, monkeypatch):
    """HFLM.verify runs its forwards on a model directory's first load; the verdict is cached
    (LLMPPL_CACHE/verified), so the second load skips them; a changed file verifies again."""
    from llmppl.models.hf import HFLM
    from tiny_models import tiny_model

    monkeypatch.setenv("LLMPPL_CACHE", str(tmp_path / "cache"))
    model_dir = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(model_dir)
    calls = []
    real = HFLM.verify
    monkeypatch.setattr(HFLM, "verify", lambda self, tol=None: calls.append(1) or real(self, tol))
    from transformers import AutoModelForCausalLM

    def load():
        return HFLM(AutoModelForCausalLM.from_pretrained(model_dir), eos_token_id=63)

    load()
    load()
    assert len(calls) == 1 and len(list((tmp_path / "cache" / "verified").glob("*.json"))) == 1
    (model_dir / "config.json").touch()   # a newer file: verified again
    import os as _os

    st = (model_dir / "config.json").stat()
    _os.utime(model_dir / "config.json", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    load()
    assert len(calls) == 2
    HFLM(AutoModelForCausalLM.from_config(AutoModelForCausalLM.from_pretrained(model_dir).config), eos_token_id=63)
    assert len(calls) == 3   # the directory's config with other (random) weights: not the verified model
