"""Base LMs behind one batched interface."""

from .base import LanguageModel, LanguageModelError, LMState, UncachedState, validate_logprobs
from .hf import HFLM, HFState
from .llamacpp import LlamaCppLM, LlamaCppState
from .registry import cache_dir, default_lm, load_model, register_model
from .vllm import VLLMLM, VLLMState  # vLLM itself is imported on first use
from .toy import EXACTNESS, ExactnessSetup, ForkingLM, NGramLM, TabularLM, ZeroForkingLM, pivotal_lm
from .memory import NotEnoughMemory, check_device, check_memory, estimate_memory
from . import fetch  # registers the fetchable models (llmppl models fetch NAME)

__all__ = [
    "LanguageModel", "LanguageModelError", "LMState", "UncachedState", "validate_logprobs",
    "HFLM", "HFState", "LlamaCppLM", "LlamaCppState", "VLLMLM", "VLLMState", "default_lm", "load_model",
    "register_model", "cache_dir", "NotEnoughMemory", "check_device", "check_memory", "estimate_memory",
    "NGramLM", "TabularLM", "pivotal_lm", "ForkingLM", "ZeroForkingLM", "ExactnessSetup", "EXACTNESS",
]
