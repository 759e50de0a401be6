"""``HFLM``: any transformers causal LM behind the batched LM interface.

Every forward pass is the model's own ``*ForCausalLM.forward`` (so its logit
post-processing -- Gemma-2/3 soft-capping, Granite ``logits_scaling``, Cohere
``logit_scale`` -- is applied on every path), with explicit ``position_ids`` and a
4-D attention mask built here from each cache column's position and validity:
a query at position ``q`` sees the valid columns at positions ``k <= q`` (and
``q - k < sliding_window`` for sliding-window layers).  That one rule serves
ragged prompts (left-padded when encoded), ragged blocks, masked (finished) rows
and truncation, for full and sliding-window attention alike.

The dynamic decoding state (:class:`HFState`) keeps one ``DynamicCache`` whose batch
rows are the state's rows (finished rows are masked, never dropped or copied);
``valid``/``kpos`` say which cache columns each row sees and at which position.
``reorder`` is one ``index_select`` per layer; the P prompts are encoded in one
left-padded forward and broadcast to their ``n`` rows.
"""

from __future__ import annotations

import copy
import inspect
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .base import KVCachedState, LanguageModel, LMState, as_index, per_prompt
from .memory import COMPACT_MARGIN, Footprint, check_footprints, estimate_memory
from . import hf_common
from .hf_common import LOGIT_BUDGET, cache_argument, left_padded, quiet_loading  # noqa: F401 (LOGIT_BUDGET re-exported)
from .static import StaticHFState

#: end-of-turn tokens of common chat templates: an EOS when the template uses them
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|eot|>",
                      "<|end_of_turn|>", "<|endofturn|>", "<|END_OF_TURN_TOKEN|>")

#: attention layer kinds the mask builder knows
_LAYER_KINDS = ("full_attention", "sliding_attention")


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: use float32, float16 or bfloat16") from None


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if v is not None]
    return [int(value)]


def eos_token_ids(model: Any, tokenizer: Any = None) -> list[int]:
    """Every id that ends a sequence: the tokenizer's EOS, the generation config's and the
    model config's EOS ids, and the end-of-turn tokens the chat template uses."""
    ids: list[int] = []
    if tokenizer is not None:
        ids += _as_ids(getattr(tokenizer, "eos_token_id", None))
    gen = getattr(model, "generation_config", None)
    ids += _as_ids(getattr(gen, "eos_token_id", None))
    ids += _as_ids(getattr(model.config, "eos_token_id", None))
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if isinstance(template, str):
        unk = getattr(tokenizer, "unk_token_id", None)
        for tok in END_OF_TURN_TOKENS:
            if tok in template:
                tid = tokenizer.convert_tokens_to_ids(tok)
                if isinstance(tid, int) and tid != unk:
                    ids.append(tid)
    out: list[int] = []
    for i in ids:
        if i not in out:
            out.append(i)
    return out


def attention_layout(model: Any) -> tuple[tuple[str, ...] | None, int | None]:
    """``(kinds, window)``: how the model's decoder takes an attention mask.

    ``kinds`` is None when the decoder takes one mask (with the sliding window
    ``window`` applied to every layer when it is not None, as Mistral / Phi-3 do), or
    the layer kinds of a decoder that takes a dict of masks by layer kind
    (Gemma-2/3, Qwen2, ...).  Raises ``ValueError`` for kinds it cannot build
    (chunked or linear attention).
    """
    config = model.config
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    try:
        src = inspect.getsource(inspect.getmodule(type(decoder)))
    except (OSError, TypeError):
        src = ""
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    name = type(model).__name__
    if layer_types:
        unknown = sorted(set(layer_types) - set(_LAYER_KINDS))
        if unknown:
            raise ValueError(
                f"HFLM supports full and sliding-window attention; {name} has layers of kind "
                f"{unknown}, whose masks it cannot build"
            )
    if "causal_mask_mapping" in src and layer_types:
        kinds = tuple(k for k in _LAYER_KINDS if k in set(layer_types))
        if "sliding_attention" in kinds and not window:
            raise ValueError(f"{name} has sliding-window layers but config.sliding_window = {window!r}")
        return kinds, window
    if "create_chunked_causal_mask" in src and getattr(config, "attention_chunk_size", None):
        raise ValueError(f"HFLM does not support chunked attention ({name})")
    if "create_sliding_window_causal_mask" in src and window:
        return None, int(window)
    return None, None


class HFLM(LanguageModel):
    """A ``transformers`` causal LM: ``p(v | s) = softmax(model(s).logits[-1])[v]``.

    ``eos_token_ids`` are read from the tokenizer, the generation config, the model
    config and the chat template's end-of-turn tokens (Llama-3 ``<|eot_id|>``,
    ChatML ``<|im_end|>``); ``eos_token_id`` overrides them.  With ``verify`` (the
    default) a few tokens are run through every path at construction and compared
    with ``model(ids).logits``: a model whose forward this class cannot reproduce
    raises ``ValueError`` instead of giving wrong numbers.
    """

    def __init__(self, model: Any, tokenizer: Any = None, name: str | None = None,
                 static_cache: bool = False, cuda_graph: bool = True,
                 eos_token_id: int | Sequence[int] | None = None, verify: bool = True) -> None:
        config = model.config
        vocab = int(model.get_output_embeddings().weight.shape[0])
        eos = ([e for e in eos_token_ids(model, tokenizer) if 0 <= e < vocab]
               if eos_token_id is None else eos_token_id)
        if eos is None or (isinstance(eos, (list, tuple)) and not eos):
            raise ValueError("the model defines no EOS token id: pass eos_token_id=")
        bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
        if bos is None:
            bos = getattr(config, "bos_token_id", None)
        super().__init__(
            vocab_size=vocab,
            eos_token_id=eos,
            bos_token_id=bos,
            max_context=getattr(config, "max_position_embeddings", None),
            name=name or getattr(config, "_name_or_path", None) or "HFLM",
        )
        self.model = model.eval()
        # the model's first parameter: its device and dtype are the model's (``Module.to`` moves a
        # parameter's data, not the parameter), read in O(1) instead of walking the modules
        self._first_parameter = next(model.parameters())
        self.tokenizer = tokenizer
        pad = getattr(config, "pad_token_id", None)
        self.pad_token_id = int(pad) if isinstance(pad, int) and 0 <= pad < vocab else self.eos_token_id
        #: ``start`` returns a :class:`~llmppl.models.static.StaticHFState` (preallocated cache,
        #: CUDA-graph decode step when ``cuda_graph`` and the model is on CUDA)
        self.static_cache = bool(static_cache)
        self.cuda_graph = bool(cuda_graph)
        self.mask_kinds, self.sliding_window = attention_layout(model)
        params = inspect.signature(model.forward).parameters
        self._logits_to_keep = "logits_to_keep" in params
        #: ``cache`` on current transformers, ``past_key_values`` on older ones (hf_common)
        self._cache_arg = cache_argument(model)
        if verify:
            self.verify_once()

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike,
        gguf_file: str | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        name: str | None = None,
        static_cache: bool = False,
        eos_token_id: int | Sequence[int] | None = None,
        **kwargs: Any,
    ) -> "HFLM":
        """Load from a local directory, a hub id (cached; offline is respected) or a GGUF file.

        ``gguf_file`` may be a path to a ``.gguf`` file or a file name inside ``path_or_id``.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = str(path_or_id)
        if gguf_file is None and path.endswith(".gguf"):
            path, gguf_file = str(Path(path).parent), Path(path).name
        elif gguf_file is not None and os.path.isabs(gguf_file):
            path, gguf_file = str(Path(gguf_file).parent), Path(gguf_file).name
        extra = {"gguf_file": gguf_file} if gguf_file else {}
        with quiet_loading():
            tokenizer = AutoTokenizer.from_pretrained(path, **extra)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=_resolve_dtype(dtype), **extra, **kwargs)
        return cls(model.to(device), tokenizer, name=name or str(path_or_id), static_cache=static_cache,
                   eos_token_id=eos_token_id)

    @property
    def device(self) -> torch.device:
        return self._first_parameter.device

    @property
    def dtype(self) -> torch.dtype:
        return self._first_parameter.dtype

    # ----------------------------------------------------------------- contract
    @torch.inference_mode()
    def next_logprobs(self, sequences: list[list[int]]) -> torch.Tensor:
        """Uncached reference: one left-padded batch, log-softmax after each row's last token."""
        dev = self.device
        lengths = torch.tensor([len(s) for s in sequences])
        width = int(lengths.max())
        ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        for i, s in enumerate(sequences):
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        valid, pos = left_padded(lengths, width)
        return self.run(ids.to(dev), pos.to(dev), valid.to(dev), valid.to(dev), pos.to(dev), None, True)[:, 0]

    def start(self, prompts: Sequence[int] | Sequence[Sequence[int]], n_per_prompt: int = 1,
              max_new_tokens: int | None = None, *, n: int | None = None) -> LMState:
        """A KV-cached state of ``P * n_per_prompt`` rows; static (preallocated for the longest
        prompt + ``max_new_tokens``) when ``static_cache``.  ``n=``: the old name of ``n_per_prompt``."""
        n = per_prompt(n_per_prompt, n)
        checked = self.check_prompts(prompts, max_new_tokens)
        # refuse a state that cannot fit (KV cache + logits for every row) before allocating it; the
        # engines check their whole run's footprint (copies and forks included) before this
        check_footprints([(self, Footprint(len(checked) * n, max(len(p) for p in checked) + int(max_new_tokens or 0)))])
        if self.static_cache:
            return StaticHFState(self, checked, n, max_new_tokens, self.cuda_graph)
        return HFState(self, checked, n)

    def memory_needed(self, footprint: Any) -> dict[str, int]:
        """KV cache (from the model config, the static or dynamic cache's columns) and logits."""
        return estimate_memory(self, footprint)

    # ------------------------------------------------------------- internals
    def attention_mask(self, qpos: torch.Tensor, qvalid: torch.Tensor, kvalid: torch.Tensor,
                       kpos: torch.Tensor, own: bool = True) -> Any:
        """Additive 4-D mask(s) ``(B, 1, L, W)``: query j of row b sees column k iff the column is
        valid, ``kpos[b, k] <= qpos[b, j]`` and (sliding layers) ``qpos - kpos < window``.

        A padding query (``qvalid`` False) sees only its own column (the last ``L`` columns
        are the queries' own; ``own=False`` skips this for layouts where every query sees
        some column anyway), so no row of the mask is empty.  Returns one tensor, or a
        dict by layer kind for decoders that take one.
        """
        B, L = qpos.shape
        W = kpos.shape[1]
        dtype = self.dtype if self.dtype.is_floating_point else torch.float32
        low = torch.finfo(dtype).min
        if L == 1 and own:
            # a decode step: every valid column precedes the query (truncation invalidates later
            # ones), so full attention is just ``kvalid``; a padding query (its output unused) sees
            # its own column, and may see the others
            decode = kvalid.clone()
            decode[:, -1] = True
            decode = decode[:, None, :]

        def build(window: int | None) -> torch.Tensor:
            if L == 1 and own and window is None:
                allowed = decode
            else:
                dq = qpos[:, :, None] - kpos[:, None, :]
                allowed = kvalid[:, None, :] & (dq >= 0)
                if window is not None:
                    allowed = allowed & (dq < window)
                if own:
                    diag = (torch.arange(W, device=qpos.device)[None, :]
                            == (torch.arange(L, device=qpos.device) + (W - L))[:, None])
                    allowed = allowed | ((~qvalid)[:, :, None] & diag[None])
            return torch.zeros((B, 1, L, W), dtype=dtype, device=qpos.device).masked_fill_(
                ~allowed[:, None], low)

        if self.mask_kinds is None:
            return build(self.sliding_window)
        return {kind: build(self.sliding_window if kind == "sliding_attention" else None)
                for kind in self.mask_kinds}

    def run(self, ids: torch.Tensor, qpos: torch.Tensor, qvalid: torch.Tensor,
            kvalid: torch.Tensor, kpos: torch.Tensor, cache: Any, last_only: bool,
            mask: Any = None) -> torch.Tensor:
        """The model's own forward on ``ids`` (B, L) at positions ``qpos``.

        ``kvalid``/``kpos`` (B, W) describe every key column the layers will see (the cache's
        columns followed by the ``L`` new ones).  Returns float32 log-probs ``(B, 1, V)``
        after the last column (``last_only``) or ``(B, L, V)`` after every column.
        """
        if mask is None:
            mask = self.attention_mask(qpos, qvalid, kvalid, kpos)
        kw: dict[str, Any] = dict(input_ids=ids, attention_mask=mask, position_ids=qpos,
                                  use_cache=cache is not None)
        kw[self._cache_arg] = cache
        if self._logits_to_keep:
            kw["logits_to_keep"] = 1 if last_only else 0
        logits = self.model(**kw).logits
        if last_only:
            logits = logits[:, -1:]
        return torch.log_softmax(logits.float(), dim=-1)

    def verify_once(self) -> float | None:
        """:meth:`verify` on a model's first load only: the verdict is cached under
        ``cache_dir()/verified`` keyed by the model directory's weight and config files (path, size,
        mtime), a fingerprint of the loaded weights (sums of the first and last two parameters), the
        model class, dtype, device type, cache kind, the torch and transformers versions and the
        source of the code that runs the forward (this file, ``static.py``, ``hf_common.py``, ``base.py``).
        A model that is not a local directory (built in memory, or a hub id) is verified every time.
        Returns the cached or measured worst difference (None when it came from the cache)."""
        key = _verify_key(self)
        path = None
        if key is not None:
            from .paths import cache_dir

            path = cache_dir() / "verified" / f"{key}.json"
            if path.exists():
                return None
        worst = self.verify()
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
                import json

                tmp.write_text(json.dumps({"name": str(self.name), "worst": worst}))
                tmp.replace(path)
            except OSError:  # a read-only cache: verify again next time
                pass
        return worst

    @torch.inference_mode()
    def verify(self, tol: float | None = None) -> float:
        """Compare every path on a few tokens with ``log_softmax(model(ids).logits[:, -1])``.

        Returns the largest absolute difference; raises ``ValueError`` above ``tol``
        (1e-3 in float32, 0.5 in half precision: a wrong logit transform is off by nats).
        """
        tol = tol if tol is not None else (1e-3 if self.dtype == torch.float32 else 0.5)
        V = self.vocab_size
        seqs = [[(7 * i + 3) % V for i in range(5)], [(11 * i + 5) % V for i in range(3)]]

        def own(seq: list[int]) -> torch.Tensor:
            logits = self.model(input_ids=torch.tensor([seq], device=self.device)).logits
            return torch.log_softmax(logits[0, -1].float(), dim=-1)

        try:
            ref = torch.stack([own(s) for s in seqs])
            worst = float((self.next_logprobs(seqs) - ref).abs().max())
            state = HFState(self, [seqs[0][:3], seqs[1][:2]], 1)
            state.extend([seqs[0][3:], seqs[1][2:]])
            worst = max(worst, float((state.logprobs() - ref).abs().max()))
            if self.static_cache:
                st = StaticHFState(self, [seqs[0][:3], seqs[1][:2]], 1, 4, cuda_graph=False)
                st.extend([seqs[0][3:], seqs[1][2:]])
                worst = max(worst, float((st.logprobs() - ref).abs().max()))
        except ValueError:
            raise
        except Exception as exc:  # a model whose forward does not take our masks / cache
            raise ValueError(
                f"HFLM cannot run {type(self.model).__name__} ({self.name}): "
                f"{type(exc).__name__}: {exc}") from exc
        if not worst <= tol:
            raise ValueError(
                f"HFLM does not reproduce {type(self.model).__name__}'s own forward ({self.name}): "
                f"max |log p difference| = {worst:.3g} > {tol:g}")
        return worst


def _verify_key(lm: HFLM) -> str | None:
    """The cache key of :meth:`HFLM.verify_once` (None: not cacheable)."""
    import hashlib

    import transformers

    source = getattr(lm.model.config, "_name_or_path", None)
    if not source or not Path(source).is_dir():
        return None
    files = sorted(f for f in Path(source).iterdir()
                   if f.is_file() and f.suffix in (".safetensors", ".bin", ".json", ".pt", ".gguf"))
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    here = Path(__file__).parent
    for name in ("hf.py", "static.py", "hf_common.py", "base.py"):
        try:
            h.update((here / name).read_bytes())
        except OSError:
            return None
    h.update(f"{type(lm.model).__name__}|{lm.dtype}|{lm.device.type}|{lm.static_cache}|{lm.eos_token_ids}|"
             f"{torch.__version__}|{transformers.__version__}".encode())
    # a fingerprint of the weights actually loaded (a model rebuilt from the directory's config with
    # other weights, or modified after loading, is not the model that was verified)
    params = list(lm.model.parameters())
    with torch.no_grad():
        for p in params[:2] + params[-2:]:
            h.update(f"{tuple(p.shape)}|{float(p.detach().double().sum()):.17g}".encode())
    return h.hexdigest()[:32]


class HFState(KVCachedState):
    """KV-cached decoding state of an :class:`HFLM` over ``P * n`` rows (see module docstring).

    Device tensors: ``last`` (R, V) next-token log-probs, ``fed`` (R,) tokens of the row in
    the cache (prompt included), ``valid``/``kpos`` (R, W) the cache columns each row sees
    and their positions, and the ``DynamicCache`` itself (batch row r = state row r).
    """

    def __init__(self, lm: HFLM, prompts: list[list[int]] | list[int], n: int,
                 _empty: bool = False) -> None:
        super().__init__(lm, prompts, n)
        self.lm: HFLM = lm
        self._pending = False  # rows truncated and not yet re-fed
        if _empty:
            return
        from transformers import DynamicCache

        dev = lm.device
        lengths = torch.tensor([len(p) for p in self.prompts])
        width = int(lengths.max())
        ids = torch.full((len(self.prompts), width), lm.pad_token_id, dtype=torch.long)
        for i, p in enumerate(self.prompts):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        valid, pos = (t.to(dev) for t in left_padded(lengths, width))
        self.cache = DynamicCache()
        with torch.inference_mode():
            lp = lm.run(ids.to(dev), pos, valid, valid, pos, self.cache, True)[:, 0]
        self.forward_passes += 1
        g = self._group.to(dev)
        if len(self.prompts) != self._n or n != 1:
            self.cache.reorder_cache(g)
        self.last = lp.index_select(0, g)
        self.fed = lengths.to(dev).index_select(0, g)
        self.valid = valid.index_select(0, g)
        self.kpos = pos.index_select(0, g)

    # ------------------------------------------------------------ forward passes
    def _compact(self) -> None:
        """Left-align each row's valid columns when most columns are masked (host sync)."""
        width = self.valid.shape[1]
        counts = self.valid.sum(1)
        keep = int(counts.max())
        if width <= 2 * keep + COMPACT_MARGIN:       # the memory guard counts on this bound
            return
        order = torch.sort((~self.valid).to(torch.int8), dim=1, stable=True).indices[:, :keep]
        for layer in self.cache.layers:
            g = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
            layer.keys = layer.keys.gather(2, g)
            layer.values = layer.values.gather(2, g)
        self.valid = self.valid.gather(1, order)
        self.kpos = self.kpos.gather(1, order)

    def _forward(self, ids: torch.Tensor, qvalid: torch.Tensor, last_only: bool) -> torch.Tensor:
        """Feed ``ids`` (R, L) at the rows' next positions; columns with ``qvalid`` False are masked."""
        L = ids.shape[1]
        qpos = self.fed[:, None] + torch.arange(L, device=ids.device)[None, :]
        valid = torch.cat([self.valid, qvalid], dim=1)
        kpos = torch.cat([self.kpos, qpos], dim=1)
        with torch.inference_mode():
            lp = self.lm.run(ids, qpos, qvalid, valid, kpos, self.cache, last_only)
        self.valid, self.kpos = valid, kpos
        self.fed = self.fed + qvalid.sum(1)
        self.forward_passes += 1
        return lp

    def _feed(self, rows: list[int], blocks: list[list[int]]) -> torch.Tensor:
        """Feed ``blocks`` to ``rows`` (host path); float64 CPU log-probs of their tokens, -inf padded.

        The log-prob of a block's first token comes from ``last``; later ones from this
        pass.  A long block is fed in column chunks so at most ``LOGIT_BUDGET`` logits exist.
        """
        self._compact()
        dev, R, V = self.lm.device, self._n, self.lm.vocab_size
        rows_t = torch.tensor(rows, dtype=torch.long)
        lens_k = torch.tensor([len(b) for b in blocks], dtype=torch.long)
        width = int(lens_k.max())
        ids = torch.full((R, width), self.lm.pad_token_id, dtype=torch.long)
        ids[rows_t] = torch.nn.utils.rnn.pad_sequence(
            [torch.tensor(b, dtype=torch.long) for b in blocks], batch_first=True,
            padding_value=self.lm.pad_token_id)
        lens = torch.zeros(R, dtype=torch.long)
        lens[rows_t] = lens_k
        ids, lens = ids.to(dev), lens.to(dev)
        ar = torch.arange(width, device=dev)
        out = torch.empty((R, width), dtype=torch.float32, device=dev)
        out[:, 0] = self.last.gather(1, ids[:, :1]).squeeze(1)
        last = self.last
        rix = torch.arange(R, device=dev)
        chunk = max(1, hf_common.LOGIT_BUDGET // (R * V))
        for j0 in range(0, width, chunk):
            j1 = min(width, j0 + chunk)
            lp = self._forward(ids[:, j0:j1], ar[None, j0:j1] < lens[:, None], last_only=False)
            nxt = ids[:, j0 + 1: j1 + 1]
            m = nxt.shape[1]
            if m:
                out[:, j0 + 1: j0 + 1 + m] = lp[:, :m].gather(2, nxt[..., None]).squeeze(2)
            at = lens - 1 - j0
            here = (at >= 0) & (at < j1 - j0)
            last = torch.where(here[:, None], lp[rix, at.clamp(0, j1 - j0 - 1)], last)
        self.last = last
        self._ntd += int(lens_k.sum())
        res = out.index_select(0, rows_t.to(dev)).double().cpu()
        return res.masked_fill_(torch.arange(width)[None, :] >= lens_k[:, None], -math.inf)

    def _refresh(self, rows: list[int] | None = None) -> None:
        """Re-feed the tokens ``truncate`` cut out of the cache (every unfinished row)."""
        if not self._pending:
            return
        self._pending = False
        self._sync()
        fed = self.fed.cpu().tolist()
        todo = []
        for i in range(self._n):
            if bool(self._finished[i]):
                continue
            seq = self.prompt_of(i) + self._tokens[i]
            if fed[i] < len(seq):
                todo.append((i, seq[fed[i]:], max(0, len(self.prompt_of(i)) - fed[i])))
        if todo:
            self._feed([i for i, _, _ in todo], [s for _, s, _ in todo])
            self._ntd -= sum(k for _, _, k in todo)  # re-fed prompt tokens are not decoded

    # ------------------------------------------------------------- device fast path
    def last_logprobs(self) -> torch.Tensor:
        self._refresh()
        return self.last

    def step(self, tokens: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        self._refresh()
        dev = self.lm.device
        tok = tokens.reshape(-1).to(dev, torch.long)
        act = (~self.finished if active is None else active).reshape(-1).to(dev, torch.bool)
        if tok.numel() != self._n or act.numel() != self._n:
            raise ValueError(f"step needs {self._n} tokens and active flags, got {tok.numel()} and {act.numel()}")
        out = self.last.gather(1, tok[:, None]).squeeze(1)
        lp = self._forward(tok[:, None], act[:, None], last_only=True)[:, 0]
        self.last = torch.where(act[:, None], lp, self.last)
        self._log("step", tok.clone(), act.clone())
        return out

    # ------------------------------------------------------------- interface
    def extend(self, tokens, rows=None) -> torch.Tensor:
        idx, blocks = self._extend_args(tokens, rows)
        self._refresh()
        for i, b in zip(idx, blocks):
            self._tokens[i] = self._tokens[i] + b
        return self._feed_blocks(idx, blocks)

    def finish(self, rows) -> None:
        mask, _ = self._device_rows(rows)
        if mask is not None:
            if mask.numel() != self._n:
                raise ValueError(f"a row mask needs {self._n} entries, got {mask.numel()}")
            self._log("finish", mask.clone())
            return
        self._sync()
        self._finished[self._rows(rows)] = True

    def reorder(self, indices, rows=None) -> None:
        """Row j := row ``indices[j]`` (a gather of every layer; in place when the count is kept;
        only the listed ``rows`` are copied when given)."""
        _, idx_d = self._device_rows(indices)
        host = idx_d is None
        if host:
            self._sync()
            idx = as_index(indices, self._n)
            idx_d = idx.to(self.lm.device)
        same = len(idx_d) == self._n
        part = rows is not None and same
        if part:
            rows_d = torch.as_tensor(rows, dtype=torch.long).to(idx_d.device)
            src = idx_d.index_select(0, rows_d)

        def gather(t: torch.Tensor) -> torch.Tensor:
            return t.index_copy(0, rows_d, t.index_select(0, src)) if part else t.index_select(0, idx_d)

        with torch.inference_mode():
            for layer in self.cache.layers:
                if part:
                    layer.keys.index_copy_(0, rows_d, layer.keys.index_select(0, src))
                    layer.values.index_copy_(0, rows_d, layer.values.index_select(0, src))
                elif same:
                    layer.keys.copy_(layer.keys.index_select(0, idx_d))
                    layer.values.copy_(layer.values.index_select(0, idx_d))
                else:
                    layer.keys = layer.keys.index_select(0, idx_d)
                    layer.values = layer.values.index_select(0, idx_d)
        self.last, self.fed = gather(self.last), gather(self.fed)
        self.valid, self.kpos = gather(self.valid), gather(self.kpos)
        if host:
            self._tokens = [list(self._tokens[i]) for i in idx.tolist()]
            self._finished = self._finished[idx]
            self._group = self._group[idx]
        else:
            self._log("reorder", idx_d.clone())
        self._n = len(idx_d)

    def copy(self) -> "HFState":
        self._sync()
        new = HFState(self.lm, self.prompts, 1, _empty=True)
        new.tokens = [list(t) for t in self._tokens]
        new.finished = self._finished.clone()
        new.group = self._group.clone()
        new.last, new.fed = self.last.clone(), self.fed.clone()
        new.valid, new.kpos = self.valid.clone(), self.kpos.clone()
        new.cache = copy.deepcopy(self.cache)
        new._ntd, new.forward_passes, new._pending = self._ntd, self.forward_passes, self._pending
        return new

    def truncate(self, rows, lengths) -> None:
        """Cut completions back; the cache keeps prompt + ``length - 1`` tokens of the row and
        the last kept token is re-fed lazily (so ``last`` is right).  A finished row may be
        truncated: it is unfinished."""
        self._sync()
        idx = self._rows(rows).tolist()
        lengths = [int(x) for x in lengths]
        if len(lengths) != len(idx):
            raise ValueError(f"truncate got {len(lengths)} lengths for {len(idx)} rows")
        fed = self.fed.cpu()
        cut_rows, keeps = [], []
        for i, length in zip(idx, lengths):
            cur = len(self._tokens[i])
            if not 0 <= length <= cur:
                raise ValueError(f"cannot truncate row {i} of length {cur} to {length}")
            if length == cur:
                continue
            plen = len(self.prompt_of(i))
            self._tokens[i] = self._tokens[i][:length]
            self._finished[i] = False
            cut_rows.append(i)
            keeps.append(min(plen + length - 1, int(fed[i])))
        if cut_rows:
            dev = self.lm.device
            r = torch.tensor(cut_rows, device=dev)
            k = torch.tensor(keeps, device=dev)
            self.valid[r] = self.valid[r] & (self.kpos[r] < k[:, None])
            self.fed[r] = k
            self._pending = True
