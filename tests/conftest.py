import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def smollm():
    """The bundled default model (loaded once per test session)."""
    from llmppl.models import default_lm

    return default_lm()


@pytest.fixture(scope="session")
def chat_prompt(smollm):
    return smollm.encode_prompt("Name three primary colors.", chat=True)


@pytest.fixture
def one_thread():
    """Toy-LM tensors are tiny: intra-op threads only add overhead (and contention)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _vllm_tests() -> set[str]:
    """The test files the Makefile's ``VLLM_TESTS`` runs in the vLLM venv (``make test``'s second pytest)."""
    import re
    from pathlib import Path

    makefile = Path(__file__).resolve().parents[1] / "Makefile"
    m = re.search(r"^VLLM_TESTS\s*=\s*((?:.*\\\n)*.*)$", makefile.read_text(), re.M)
    return set(m.group(1).replace("\\\n", " ").split()) if m else set()


def pytest_collectreport(report):
    """A test file that needs vLLM skips in the main venv; its skip reason says where it runs (the vLLM venv,
    when the Makefile's ``VLLM_TESTS`` lists it) instead of only ``could not import 'vllm'``."""
    if not (report.skipped and isinstance(report.longrepr, tuple) and "could not import 'vllm'" in report.longrepr[2]):
        return
    path, line, _ = report.longrepr
    name = "tests/" + report.nodeid.rsplit("/", 1)[-1]
    where = ("; make test runs it in .venv-vllm (the Makefile's VLLM_TESTS)" if name in _vllm_tests()
             else ", and make test never runs it: add it to the Makefile's VLLM_TESTS")
    report.longrepr = (path, line, f"needs vLLM, which is not in this venv{where}")
