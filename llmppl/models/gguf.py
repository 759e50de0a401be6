"""GGUF plumbing for the llama.cpp backend: import, logging, tokenizer, re-encoding.

Everything here talks to llama.cpp through ``llama-cpp-python``'s low-level bindings;
:mod:`llmppl.models.llamacpp` builds the LM and its decoding state on top.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .paths import cache_dir

if TYPE_CHECKING:
    from .llamacpp import LlamaCppLM

log = logging.getLogger("llmppl.llamacpp")

INSTALL_HINT = "pip install 'llmppl[llamacpp]'"


def import_llama_cpp() -> Any:
    """The ``llama_cpp`` module, or an ImportError saying how to install it."""
    try:
        import llama_cpp
    except ImportError as e:  # pragma: no cover - exercised where the extra is missing
        raise ImportError(
            f"the llama.cpp backend needs llama-cpp-python, which is not installed: {INSTALL_HINT}"
        ) from e
    return llama_cpp


_LOG_STATE: dict[str, Any] = {"callback": None, "verbose": False}


def set_llama_logging(verbose: bool) -> None:
    """Route llama.cpp's log lines to the ``llmppl.llamacpp`` logger (DEBUG; errors as WARNING).

    With ``verbose`` they are also printed to stderr, as llama.cpp does by default.
    """
    lc = import_llama_cpp()
    _LOG_STATE["verbose"] = bool(verbose)
    if _LOG_STATE["callback"] is None:
        def _callback(level: int, text: bytes, user_data: Any) -> None:
            msg = text.decode("utf-8", errors="replace") if text else ""
            if _LOG_STATE["verbose"]:
                import sys

                print(msg, end="", file=sys.stderr, flush=True)
            elif level == 3 and msg.strip():  # GGML_LOG_LEVEL_ERROR
                log.warning("llama.cpp: %s", msg.rstrip())

        _LOG_STATE["callback"] = lc.llama_log_callback(_callback)  # kept alive here
        lc.llama_log_set(_LOG_STATE["callback"], ctypes.c_void_p(0))


def _extra_buffers_usable() -> bool:
    """False where the CPU advertises AMX (see ``LlamaCppLM``'s ``extra_buffers``)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_tile" not in line.split()
    except OSError:
        pass
    return True


#: ``weights`` -> llama.cpp file type (``llama_ftype``) of the re-encoded copy
WEIGHT_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}


def reencode_gguf(path: Path, weights: str, n_threads: int = 1) -> Path:
    """A copy of the GGUF with every weight stored as ``weights``, made once by llama.cpp.

    ``llama_model_quantize`` de-quantises each tensor and stores it in the new type
    (``"f32"`` keeps the de-quantised values exactly: the same weights ``HFLM`` runs).
    The copy lives in ``$LLMPPL_CACHE/llamacpp/`` and is reused while the source is unchanged.
    """
    if weights not in WEIGHT_TYPES:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_TYPES)} (or None for the GGUF's own), "
                         f"got {weights!r}")
    st = path.stat()
    target = cache_dir() / "llamacpp" / f"{path.stem}.{st.st_size}.{int(st.st_mtime)}.{weights}.gguf"
    if target.exists():
        return target
    lc = import_llama_cpp()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    params = lc.llama_model_quantize_default_params()
    params.ftype = WEIGHT_TYPES[weights]
    params.allow_requantize = True
    params.nthread = int(n_threads)
    rc = lc.llama_model_quantize(str(path).encode("utf-8"), str(tmp).encode("utf-8"), ctypes.byref(params))
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"llama.cpp could not re-encode {path} as {weights} (code {rc}): corrupt or unsupported GGUF")
    tmp.replace(target)
    return target


class GGUFTokenizer:
    """Tokenizer and chat template of a GGUF, read from its metadata by llama.cpp.

    ``encode``/``decode``/``apply_chat_template`` mirror the ``transformers`` methods
    the rest of the library calls.  Chat templates are rendered with jinja2 exactly as
    ``llama-cpp-python`` does (its ``Jinja2ChatFormatter``), then tokenized with special
    tokens parsed and no BOS added (the template writes its own).
    """

    def __init__(self, lm: "LlamaCppLM") -> None:
        self._lm = lm
        lc, vocab = lm._lc, lm._vocab
        self.bos_token_id = lm.bos_token_id
        self.eos_token_id = lm.eos_token_id
        self.add_bos = bool(lc.llama_vocab_get_add_bos(vocab))
        raw = lc.llama_model_chat_template(lm._model, None)
        self.chat_template: str | None = raw.decode("utf-8") if raw else None
        self.bos_token = self._piece(self.bos_token_id)
        self.eos_token = self._piece(self.eos_token_id)

    def get_vocab(self) -> dict[str, int]:
        """Token text -> id, as the GGUF stores it (``llama_vocab_get_text``; for byte-level BPE the
        same ``Ġ``-form strings as ``transformers``' ``get_vocab``)."""
        lc, vocab = self._lm._lc, self._lm._vocab
        return {lc.llama_vocab_get_text(vocab, i).decode("utf-8", errors="surrogateescape"): i
                for i in range(len(self))}

    def __len__(self) -> int:
        """The number of tokens of the GGUF's vocabulary."""
        return int(self._lm._lc.llama_vocab_n_tokens(self._lm._vocab))

    def _piece(self, token: int | None) -> str:
        if token is None or token < 0:
            return ""
        return self.decode([token], skip_special_tokens=False)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text`` (special-token text is parsed; BOS added only if asked and the GGUF adds one)."""
        lc = self._lm._lc
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (lc.llama_token * cap)()
        n = lc.llama_tokenize(self._lm._vocab, data, len(data), buf, cap, add_special_tokens, True)
        if n < 0:
            cap = -n
            buf = (lc.llama_token * cap)()
            n = lc.llama_tokenize(self._lm._vocab, data, len(data), buf, cap, add_special_tokens, True)
        if n < 0:
            raise RuntimeError(f"llama.cpp failed to tokenize a text of {len(data)} bytes")
        return list(buf[:n])

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``token_ids``; special (control) tokens are dropped when ``skip_special_tokens``."""
        lc = self._lm._lc
        ids = [int(t) for t in token_ids]
        if not ids:
            return ""
        arr = (lc.llama_token * len(ids))(*ids)
        cap = 8 * len(ids) + 16
        for _ in range(2):
            buf = ctypes.create_string_buffer(cap)
            n = lc.llama_detokenize(self._lm._vocab, arr, len(ids), buf, cap, False, not skip_special_tokens)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", errors="replace")
            cap = -n + 1
        raise RuntimeError("llama.cpp failed to detokenize")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = True) -> list[int] | str:
        """Render ``messages`` with the GGUF's chat template; token ids when ``tokenize``."""
        if not self.chat_template:
            raise ValueError(f"{self._lm.name} has no chat template in its GGUF metadata")
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        fmt = Jinja2ChatFormatter(self.chat_template, eos_token=self.eos_token, bos_token=self.bos_token,
                                  add_generation_prompt=add_generation_prompt)
        text = fmt(messages=list(messages)).prompt
        return self.encode(text, add_special_tokens=False) if tokenize else text
