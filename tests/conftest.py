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
