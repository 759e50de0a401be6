"""``VLLMLM`` where users run it: the engine choices vLLM makes on CUDA, forced on CPU as far as
they can be, and the batches that killed the CPU engine.

* CUDA: vLLM 0.32 selects Model Runner V2 whenever Triton imports (``VllmConfig.use_v2_model_runner``),
  and MRV2's processor loader rejects our v1 recorder.  Here Triton's presence is simulated
  (``vllm.config.vllm.HAS_TRITON = True``) with ``VLLM_USE_V2_MODEL_RUNNER`` unset: vLLM's own
  choice becomes V2, and the backend still starts on the V1 runner (it pins it) and says so.
* A user's ``VLLM_USE_V2_MODEL_RUNNER=1`` is refused with one line before any engine starts.
* CPU: a batch whose prompts exceed ``max_num_batched_tokens`` (28 distinct 151-token prompts × 4
  particles: the smallest that killed the engine with ``CPU Generator does not use offset``) runs.
* An engine error is one line naming the request's prompt, and the engine stays usable.
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

import llmppl as pp  # noqa: E402
from llmppl.models.block import BlockSpec  # noqa: E402
from llmppl.models.vllm import VLLMLM, recorder_class  # noqa: E402

from tiny_models import tiny_vllm_llama  # noqa: E402

PROMPTS, LENGTH = 28, 151


@pytest.fixture(scope="module")
def cuda_like(tmp_path_factory):
    """A VLLMLM started with vLLM's CUDA default choice simulated (Triton present, no
    VLLM_USE_V2_MODEL_RUNNER in the environment): (lm, path)."""
    import vllm.config.vllm as cfg

    path = tmp_path_factory.mktemp("tiny-llama-256")
    tiny_vllm_llama(max_position_embeddings=256).save_pretrained(path)
    mp = pytest.MonkeyPatch()
    mp.setattr(cfg, "HAS_TRITON", True)
    mp.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    try:
        lm = VLLMLM(path)
        yield lm, path
    finally:
        mp.undo()


def test_cuda_default_choice_starts_on_v1(cuda_like, monkeypatch):
    lm, _ = cuda_like
    config = lm.llm.llm_engine.vllm_config
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"       # pinned by VLLMLM
    assert config.use_v2_model_runner is False
    # without the pin, vLLM's own choice under the simulated CUDA condition is Model Runner V2
    # (vLLM caches its environment once an engine runs: read it afresh)
    import vllm.envs as envs

    envs.disable_envs_cache()
    try:
        monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER")
        assert config.use_v2_model_runner is True
        monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
        assert config.use_v2_model_runner is False
    finally:
        envs.enable_envs_cache()
    runner = lm.llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    assert type(runner).__module__ == "vllm.v1.worker.cpu_model_runner"
    assert any(isinstance(p, recorder_class()) for p in runner.input_batch.logitsprocs.all)
    assert lm.verify() < 1e-4


def test_conflicting_runner_or_chunking_is_refused_before_any_engine(cuda_like, monkeypatch):
    _, path = cuda_like
    for value in ("1", "true"):
        monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", value)
        with pytest.raises(ValueError, match=f"VLLM_USE_V2_MODEL_RUNNER={value} is set; unset it or set it to 0"):
            VLLMLM(path)
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    with pytest.raises(ValueError, match="turns chunked prefill off on CPU"):
        VLLMLM(path, enable_chunked_prefill=True)


def test_batch_beyond_the_step_budget_runs(cuda_like):
    """28 distinct 151-token prompts × 4 particles in Tokens(2) steps: 16912 prompt tokens, more
    than vLLM's 4096-token step; with chunked prefill (vLLM's default) this died with
    ``RuntimeError: CPU Generator does not use offset``."""
    lm, _ = cuda_like
    sc = lm.llm.llm_engine.vllm_config.scheduler_config
    assert sc.enable_chunked_prefill is False and sc.max_num_batched_tokens == 4096
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 7, (LENGTH,), generator=g).tolist() for _ in range(PROMPTS)]
    assert len({tuple(p) for p in prompts}) == PROMPTS and PROMPTS * LENGTH > sc.max_num_batched_tokens
    res = pp.SMC(4, step=pp.steps.Tokens(2)).run_batch(pp.Target(lm, pp.Power(2.0)), prompts, 4, seed=0)
    assert len(res) == PROMPTS and all(r.error is None and len(r.samples) == 4 for r in res)


def test_engine_error_names_the_prompt(cuda_like, monkeypatch):
    lm, _ = cuda_like
    cls = recorder_class()
    real = cls.apply

    def broken(self, logits):
        raise RuntimeError("simulated engine failure")

    state = lm.start([[5, 4, 3, 2, 1, 0, 1, 2, 3, 4], [1, 2]], n=2, max_new_tokens=4)
    monkeypatch.setattr(cls, "apply", broken)
    with pytest.raises(RuntimeError, match=r"vLLM failed while decoding the request on prompt of 10 tokens "
                                           r"\[5, 4, 3, 2, 1, 0, 1, 2, \.\.\.\] and 3 other request\(s\): "
                                           r"RuntimeError: simulated engine failure"):
        state.sample_block(torch.arange(4), BlockSpec.make(4, 2, 1.0, (7,)), torch.Generator().manual_seed(0))
    monkeypatch.setattr(cls, "apply", real)
    block = state.sample_block(torch.arange(4), BlockSpec.make(4, 2, 1.0, (7,), allow_stop=False),
                               torch.Generator().manual_seed(0))
    assert (block.length == 2).all()
    assert not lm.sessions or len(lm.sessions) == 4
