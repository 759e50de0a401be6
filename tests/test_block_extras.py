"""The block primitive's masks (static, per row, callable), normalisers (``log_norm``,
``log_norm_next``) and delimiters (``end_ids``) on ``HFLM``'s reference token loop, against the
transformers forward of the same tiny random Llama (tests/_block_checks.py; tests/test_vllm_block.py
runs the same checks on vLLM's native path)."""

from __future__ import annotations

import pytest
import torch

from llmppl.models.block import BlockSpec
from llmppl.models.hf import HFLM

import _block_checks as bc
from tiny_models import tiny_vllm_llama

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    model = tiny_vllm_llama()
    return HFLM(model), model


def test_masks_norms_end_ids_parity(tiny):
    lm, model = tiny
    assert bc.run_parity(lm, model) > 100


def test_callable_mask_law(tiny):
    lm, model = tiny
    tv, impostor = bc.run_law(lm, model)
    assert tv < 0.06 and impostor > 0.2, (tv, impostor)


def test_bad_extras(tiny):
    lm, _ = tiny
    state = lm.start([1, 2], n=2, max_new_tokens=4)
    g = torch.Generator().manual_seed(0)
    cases = [
        (dict(allowed=torch.ones((3, bc.V), dtype=torch.bool)), "allowed-token mask must be"),
        (dict(norm_exponent=torch.tensor([1.0])), "norm_exponent must be"),
        (dict(norm_exponent=torch.tensor([1.0, -1.0], dtype=torch.float64)), "norm_exponent must be"),
        (dict(norm_next=True), "norm_next needs norm_exponent"),
        (dict(end_ids=(bc.V,)), "end ids must lie"),
        (dict(mask_fn=lambda k, t: torch.ones(3, dtype=torch.bool)), "mask_fn must return"),
        (dict(mask_fn=lambda k, t: torch.zeros((len(k), bc.V), dtype=torch.bool)), "allows no token for row 0"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            state.sample_block(torch.arange(2), BlockSpec.make(2, 2, 1.0, bc.STOP, **kw), g)
