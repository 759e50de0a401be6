"""The README's and docs/' vLLM snippets, run as written in the vLLM venv (.venv-vllm).

tests/test_docs.py extracts every block of README.md and docs/*.md and runs what the main venv can;
the blocks that need vLLM it skips, and this file runs them here, with the same extraction, the same
small settings (``prepare_python``: 2 particles, 4 tokens, ...) and the same stand-ins for placeholder
paths (the bundled SmolLM2: its GGUF for ``"model.gguf"``, its converted safetensors directory for
``"path/to/model_dir"``).  The engine runs in this process with 1 GiB of CPU KV space, as the other
vLLM tests (``make test`` sets the environment).
"""

from __future__ import annotations

import gc
import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

import pytest

pytest.importorskip("vllm")   # the skip reason says where it runs (tests/conftest.py)
pytestmark = [pytest.mark.vllm, pytest.mark.model]

import test_docs as docs  # noqa: E402  (the module, not its test functions: pytest would collect those here)

BLOCKS = [b for b in docs.BLOCKS
          if (b[2] == "python" and docs.needs(b[3], "python") == "vllm")
          or (b[2] == "bash" and any(docs.needs(c, "bash") == "vllm" for c in docs.bash_commands(b[3])))]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "prompts.jsonl").write_text(docs.PROMPTS_JSONL)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    docs.NAMESPACES.clear()   # each block's engines go before the next block starts its own
    gc.collect()


def test_the_docs_have_vllm_snippets():
    """The README and docs/vllm.md show vLLM in Python: this file has something to run."""
    where = {str(p.relative_to(docs.ROOT)) for p, *_ in BLOCKS}
    assert {"README.md", "docs/vllm.md"} <= where, where


@pytest.mark.parametrize("path, line, lang, text", BLOCKS,
                         ids=[f"{p.relative_to(docs.ROOT)}:{line}" for p, line, _, _ in BLOCKS])
def test_vllm_doc_block_runs(path, line, lang, text, workdir, request):
    docs.run_doc_block(path, line, lang, text, workdir, request, venv="vllm")
