"""Static-cache fast path of :class:`~llmppl.models.hf.HFLM` (``HFLM(..., static_cache=True)``).

Every tensor of the state is preallocated once, for ``N`` rows × capacity ``C``
positions (prompt + ``max_new_tokens``), and afterwards only written in place:

* the KV cache of every layer is a ``(N, H, C + 1, D)`` buffer (``N = P * n`` rows of
  ``P`` ragged prompts, ``C`` = the longest prompt + ``max_new_tokens``); a token at
  position ``p`` of a row lives in column ``p`` (``scatter_`` of the new keys/values, no
  ``torch.cat``); column ``C`` is a *trash* column that absorbs the writes of rows
  that are not extended in a forward pass (finished rows, padding) and is never read;
* attention of a query at position ``p`` sees columns ``k ≤ p`` (``k < C``, and
  ``p - k < window`` in sliding-window layers): a 4-D additive mask built on the device
  from the row positions, so rows of different lengths (ragged prompts and blocks,
  ``truncate``) share one rectangular cache; the forward is the model's own (its logit
  post-processing included);
* resampling (``reorder`` with ``N`` rows) is an in-place gather of every buffer
  (``buf.copy_(buf.index_select(0, idx))``); finished rows are masked, not removed;
* the one-token decode step of all ``N`` rows (forward, log-softmax, the log-prob of
  the fed token, bookkeeping) reads and writes only these buffers, so on CUDA it is
  captured once in a ``torch.cuda.CUDAGraph`` and replayed (one launch per step); on
  the CPU, or when capture fails, the same function runs eagerly.

The device buffers are the source of truth.  The host view (``tokens``, ``finished``,
``group``) is kept in step by the :class:`~llmppl.models.base.LMState` methods; the
no-sync methods :meth:`StaticHFState.step`, ``finish`` with a device mask and
``reorder`` with a device index leave it stale and it is re-read (one device→host
copy) on the next access.  Started with ``max_new_tokens`` the capacity is exact and
never changes in a run that stays within it (graphs are captured once per
(rows, capacity)); a row running past it grows the buffers to exactly what is needed.
Without ``max_new_tokens`` the capacity starts at ``DEFAULT_MAX_NEW_TOKENS`` and doubles.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .base import KVCachedState, as_index
from . import hf_common
from .hf_common import cache_argument, left_padded

if TYPE_CHECKING:
    from .hf import HFLM

#: capacity (new tokens) when ``start`` is not told ``max_new_tokens``; grows on demand
DEFAULT_MAX_NEW_TOKENS = 256
#: hidden states projected onto the vocabulary at once in a block forward
_LOGIT_ROWS = 64


class RowLayer(CacheLayerMixin):
    """One layer's preallocated keys/values; new states are scattered at per-row columns."""

    is_compileable = True
    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, owner: "RowCache") -> None:
        super().__init__()
        self.keys, self.values, self.owner = keys, values, owner
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """``K[b, :, w[b, j]] = k[b, :, j]`` with ``w = owner.write_index`` (B, L)."""
        w = self.owner.write_index[:, None, :, None]
        B, H, L, _ = key_states.shape
        self.keys.scatter_(2, w.expand(B, H, L, key_states.shape[-1]), key_states)
        self.values.scatter_(2, w.expand(B, H, L, value_states.shape[-1]), value_states)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[2], 0

    def get_seq_length(self) -> int:
        return self.keys.shape[2]

    def get_max_length(self) -> int:
        return self.keys.shape[2]


class RowCache(Cache):
    """A transformers ``Cache`` over :class:`RowLayer` buffers; ``write_index`` is set per forward."""

    def __init__(self, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__(layers=[])
        self.layers = [RowLayer(k, v, self) for k, v in kv]
        self.write_index: torch.Tensor | None = None


class StaticHFState(KVCachedState):
    """Decoding state with a static KV cache over ``P * n`` rows (see the module docstring)."""

    def __init__(self, lm: "HFLM", prompts: list[list[int]] | list[int], n: int,
                 max_new_tokens: int | None = None, cuda_graph: bool = True,
                 _empty: bool = False) -> None:
        super().__init__(lm, prompts, n)
        self.lm = lm
        self.cuda_graph = cuda_graph and lm.device.type == "cuda"
        self.graph_error: str | None = None
        self._graphs: dict[tuple, Any] = {}
        self._exact = max_new_tokens is not None
        self._stale = False
        self._fed = self.prompt_lengths()
        if _empty:
            return
        dev = lm.device
        P = len(self.prompts)
        lengths = torch.tensor([len(p) for p in self.prompts])
        Lmax = int(lengths.max())
        cap = Lmax + (max_new_tokens if max_new_tokens is not None else DEFAULT_MAX_NEW_TOKENS)
        # encode the P prompts left-padded in one forward, writing each token at column = position

        ids = torch.full((P, Lmax), lm.pad_token_id, dtype=torch.long)
        for i, p in enumerate(self.prompts):
            ids[i, Lmax - len(p):] = torch.tensor(p, dtype=torch.long)
        valid, pos = (t.to(dev) for t in left_padded(lengths, Lmax))
        shapes = _kv_shapes(lm)
        dtype = lm.dtype
        with torch.no_grad():
            kv = [(torch.zeros((P, h, cap + 1, d), dtype=dtype, device=dev),
                   torch.zeros((P, h, cap + 1, d), dtype=dtype, device=dev)) for h, d in shapes]
            self._kv = RowCache(kv)
            self.C = cap
            self._cols = torch.arange(cap + 1, device=dev)
            lp = self._forward(ids.to(dev), pos, torch.where(valid, pos, cap), True)[:, 0]
            g = self._group.to(dev)
            kv = [(k.index_select(0, g), v.index_select(0, g)) for k, v in kv]
            R = self._n
            self._set_buffers(
                kv=kv,
                last=lp.index_select(0, g),
                fed=lengths.to(dev).index_select(0, g),
                ntok=torch.zeros(R, dtype=torch.long, device=dev),
                hist=torch.zeros((R, cap + 1), dtype=torch.long, device=dev),
                fin=torch.zeros(R, dtype=torch.bool, device=dev),
                group=g.clone(),
            )
        self.forward_passes += 1
        self._decoded_d = torch.zeros((), dtype=torch.long, device=dev)
        self._max_fed = Lmax  # host upper bound on max(fed): capacity checks without a sync

    # ------------------------------------------------------------- buffers
    def _set_buffers(self, kv, last, fed, ntok, hist, fin, group) -> None:
        """(Re)bind every device buffer; graphs of an earlier (rows, capacity) are dropped."""
        self._kv = RowCache(kv)
        self.last, self.fed_d, self.ntok_d, self.hist, self.fin_d, self.group_d = (
            last, fed, ntok, hist, fin, group)
        self.C = kv[0][0].shape[2] - 1
        self._n = last.shape[0]
        dev = last.device
        self._cols = torch.arange(self.C + 1, device=dev)
        self._in_tok = torch.zeros(self._n, dtype=torch.long, device=dev)
        self._in_lens = torch.zeros(self._n, dtype=torch.long, device=dev)
        self._in_idx = torch.arange(self._n, device=dev)
        self._out = torch.zeros(self._n, dtype=torch.float32, device=dev)
        self._graphs = {}

    def _buffers(self) -> list[torch.Tensor]:
        """Every per-row device buffer (row = dim 0)."""
        kv = [t for layer in self._kv.layers for t in (layer.keys, layer.values)]
        return kv + [self.last, self.fed_d, self.ntok_d, self.hist, self.fin_d, self.group_d]

    def _rebind(self, bufs: list[torch.Tensor]) -> None:
        L = (len(bufs) - 6) // 2
        self._set_buffers(list(zip(bufs[0:2 * L:2], bufs[1:2 * L:2])), *bufs[2 * L:])

    def _grow(self, need: int) -> None:
        """Reallocate for capacity ``need`` (``max(need, 2C)`` when started without
        ``max_new_tokens``); keeps contents, graphs are re-captured."""
        C = self.C
        new = need if self._exact else max(need, 2 * C)
        with torch.no_grad():
            kv = []
            for layer in self._kv.layers:
                pair = []
                for t in (layer.keys, layer.values):
                    b = t.new_zeros((t.shape[0], t.shape[1], new + 1, t.shape[3]))
                    b[:, :, :C] = t[:, :, :C]
                    pair.append(b)
                kv.append(tuple(pair))
            hist = self.hist.new_zeros((self._n, new + 1))
            hist[:, :C] = self.hist[:, :C]
            self._set_buffers(kv, self.last, self.fed_d, self.ntok_d, hist, self.fin_d, self.group_d)

    def _ensure(self, extra: int, need: int | None = None) -> None:
        """Grow when a row could run past the capacity (``need``: the exact requirement)."""
        need = self._max_fed + extra if need is None else need
        if need > self.C:
            self._grow(need)

    # ------------------------------------------------------------- host view
    def _sync(self) -> None:
        """Re-read the host view from the device buffers if a no-sync method left it stale."""
        if not self.__dict__.get("_stale", False):
            return
        # copies (on a CPU model .cpu() would alias the buffers that reorder gathers in place)
        ntok, fed, fin = (t.to("cpu", copy=True) for t in (self.ntok_d, self.fed_d, self.fin_d))
        width = int(ntok.max()) if len(ntok) else 0
        hist = self.hist[:, :width].cpu()
        self._tokens = [hist[i, : int(ntok[i])].tolist() for i in range(self._n)]
        self._fed, self._finished, self._group = fed, fin, self.group_d.to("cpu", copy=True)
        self._max_fed = int(fed.max())
        self._stale = False

    @property
    def tokens_decoded(self) -> int:
        return int(self._decoded_d) if "_decoded_d" in self.__dict__ else 0

    @tokens_decoded.setter
    def tokens_decoded(self, value: int) -> None:
        if "_decoded_d" in self.__dict__:
            self._decoded_d.fill_(int(value))

    # ------------------------------------------------------------- forward passes
    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, write: torch.Tensor,
                 last_only: bool) -> torch.Tensor:
        """The model's forward on ``ids`` (N, L) at positions ``pos``, K/V written at columns
        ``write`` (column ``C`` = trash); float32 log-probs (N, 1 or L, V)."""
        self._kv.write_index = write
        B = ids.shape[0]
        cols = self._cols[None, :].expand(B, -1)
        mask = self.lm.attention_mask(pos, write < self.C, cols < self.C, cols, own=False)
        return self.lm.run(ids, pos, None, None, None, self._kv, last_only, mask=mask)

    def _step_impl(self) -> None:
        """One token for rows with ``_in_lens == 1``: reads/writes static buffers only (graph-safe)."""
        tok, lens = self._in_tok, self._in_lens
        active = lens > 0
        pos = self.fed_d[:, None]
        write = torch.where(active[:, None], pos, self.C)
        lp = self._forward(tok[:, None], pos, write, True)[:, 0]
        self._out.copy_(self.last.gather(1, tok[:, None]).squeeze(1))
        self.last.copy_(torch.where(active[:, None], lp, self.last))
        col = torch.where(active, self.ntok_d, self.hist.shape[1] - 1)
        self.hist.scatter_(1, col[:, None], tok[:, None])
        self.fed_d.add_(lens)
        self.ntok_d.add_(lens)
        self._decoded_d.add_(lens.sum())

    def _reorder_impl(self) -> None:
        """Row j := row ``_in_idx[j]`` of every buffer, in place (graph-safe)."""
        for buf in self._buffers():
            buf.copy_(buf.index_select(0, self._in_idx))

    def _run(self, name: str) -> None:
        """Run ``_step_impl`` / ``_reorder_impl``, through a CUDA graph captured once per
        (op, rows, capacity) when enabled."""
        impl = getattr(self, f"_{name}_impl")
        if not self.cuda_graph:
            impl()
            return
        key = (name, self._n, self.C)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._capture(name, impl)
            if graph is None:
                impl()
                return
            self._graphs[key] = graph
        graph.replay()

    def _capture(self, name: str, impl) -> Any:
        """Capture ``impl`` in a CUDA graph; warm-up runs are side-effect free (no active row / identity)."""
        saved = (self._in_lens.clone(), self._in_idx.clone())
        try:
            self._in_lens.zero_()
            self._in_idx.copy_(torch.arange(self._n, device=self._in_idx.device))
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    impl()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                impl()
            return graph
        except Exception as exc:  # pragma: no cover - CUDA only
            self.cuda_graph = False
            self.graph_error = f"{name}: {type(exc).__name__}: {exc}"
            warnings.warn(f"CUDA graph capture failed, running eagerly ({self.graph_error})", stacklevel=3)
            return None
        finally:
            self._in_lens.copy_(saved[0])
            self._in_idx.copy_(saved[1])

    def _block(self, ids: torch.Tensor, lens: torch.Tensor, record: bool) -> torch.Tensor:
        """Feed ``ids[i, :lens[i]]`` to every row (eager); ``(N, L)`` float32 log-probs of those tokens.

        Fed in column chunks so that at most ``LOGIT_BUDGET`` logits exist at once.
        """

        N, L = ids.shape
        dev = ids.device
        ar = torch.arange(L, device=dev)
        valid = ar[None, :] < lens[:, None]
        out = torch.empty((N, L), dtype=torch.float32, device=dev)
        out[:, 0] = self.last.gather(1, ids[:, :1]).squeeze(1)
        new_last = self.last.clone()
        rows = torch.arange(N, device=dev)
        fed0 = self.fed_d.clone()
        step = max(1, hf_common.LOGIT_BUDGET // (N * self.lm.vocab_size))
        for j0 in range(0, L, step):
            j1 = min(L, j0 + step)
            pos = fed0[:, None] + ar[None, j0:j1]
            lp = self._forward(ids[:, j0:j1], pos, torch.where(valid[:, j0:j1], pos, self.C), False)
            nxt = ids[:, j0 + 1: j1 + 1]
            if nxt.shape[1]:
                out[:, j0 + 1: j0 + 1 + nxt.shape[1]] = lp[:, : nxt.shape[1]].gather(2, nxt[..., None]).squeeze(2)
            at = lens - 1 - j0
            here = (at >= 0) & (at < j1 - j0)
            new_last = torch.where(here[:, None], lp[rows, at.clamp(0, j1 - j0 - 1)], new_last)
        self.last.copy_(new_last)
        if record:
            col = torch.where(valid, self.ntok_d[:, None] + ar, self.hist.shape[1] - 1)
            self.hist.scatter_(1, col, ids)
            self.ntok_d.add_(lens)
        self.fed_d.add_(lens)
        self._decoded_d.add_(lens.sum())
        self.forward_passes += (L + step - 1) // step - 1
        return out.masked_fill_(~valid, -math.inf)

    def _feed(self, rows: list[int], blocks: list[list[int]], record: bool = True) -> torch.Tensor:
        """Host path: feed ``blocks`` to ``rows``; ``(len(rows), L)`` float64 CPU log-probs (-inf padded)."""
        width = max(len(b) for b in blocks)
        rows_t = torch.tensor(rows, dtype=torch.long)
        lens_k = torch.tensor([len(b) for b in blocks], dtype=torch.long)
        self._ensure(width, int((self._fed[rows_t] + lens_k).max()))
        ids = torch.full((self._n, width), self.lm.pad_token_id, dtype=torch.long)
        ids[rows_t] = torch.nn.utils.rnn.pad_sequence(
            [torch.tensor(b, dtype=torch.long) for b in blocks], batch_first=True,
            padding_value=self.lm.pad_token_id)
        lens = torch.zeros(self._n, dtype=torch.long)
        lens[rows_t] = lens_k
        dev = self.lm.device
        with torch.no_grad():
            if width == 1 and record:
                self._in_tok.copy_(ids[:, 0].to(dev))
                self._in_lens.copy_(lens.to(dev))
                self._run("step")
                lp = self._out[:, None]
            else:
                lp = self._block(ids.to(dev), lens.to(dev), record)
        self.forward_passes += 1
        self._fed = self._fed + lens
        if record:
            for i, b in zip(rows, blocks):
                self._tokens[i] = self._tokens[i] + b
        self._max_fed = max(self._max_fed, int(self._fed.max()))
        out = lp.index_select(0, rows_t.to(lp.device)).double().cpu()
        return out.masked_fill_(torch.arange(width)[None, :] >= lens[rows_t][:, None], -math.inf)

    def _refresh(self, rows: list[int] | None = None) -> None:
        """Feed the tokens that ``truncate`` left out of the cache (every unfinished row)."""
        if not self.__dict__.get("_pending", False):
            return
        self._pending = False
        self._sync()
        rows = (~self._finished).nonzero().flatten().tolist()
        seqs = [(i, (self.prompt_of(i) + self._tokens[i])[int(self._fed[i]):]) for i in rows]
        seqs = [(i, s) for i, s in seqs if s]
        if seqs:
            # re-fed prompt tokens (truncation to length 0) are not decoded tokens
            refed = sum(max(0, len(self.prompt_of(i)) - int(self._fed[i])) for i, _ in seqs)
            self._feed([i for i, _ in seqs], [s for _, s in seqs], record=False)
            self._decoded_d -= refed

    # ------------------------------------------------------------- LMState interface
    def extend(self, tokens, rows=None) -> torch.Tensor:
        self._sync()
        idx, blocks = self._extend_args(tokens, rows)
        self._refresh(idx)
        return self._feed_blocks(idx, blocks)

    def finish(self, rows) -> None:
        """Finish rows (indices, or a bool mask: a device mask is applied without a host sync)."""
        mask, _ = self._device_rows(rows)
        if mask is not None:
            self.fin_d |= mask.to(self.fin_d.device)
            self._stale = True
            return
        self._sync()
        idx = self._rows(rows)
        self._finished[idx] = True
        self.fin_d[idx.to(self.fin_d.device)] = True

    def finish_where(self, mask: torch.Tensor) -> None:
        """Finish the rows where the device bool ``mask`` is set, without a host sync."""
        self.fin_d |= mask.to(self.fin_d.device)
        self._stale = True

    def reorder(self, indices, rows=None) -> None:
        """Row j := row ``indices[j]``: an in-place gather when the row count is unchanged.

        ``indices`` on the device (e.g. from on-device resampling) is applied without a
        host sync; the host view is then re-read lazily.  ``rows`` (optional): the only rows
        that change; without CUDA graphs just those are copied (a captured graph gathers all).
        """
        stale = self.__dict__.get("_stale", False)
        on_device = isinstance(indices, torch.Tensor) and (indices.device.type != "cpu" or stale)
        if on_device:
            idx_d = indices.reshape(-1).to(device=self.last.device, dtype=torch.long)
        else:
            self._sync()
            idx = as_index(indices, self._n)
            idx_d = idx.to(self.last.device)
        with torch.no_grad():
            if len(idx_d) == self._n and rows is not None and not self.cuda_graph:
                rows_d = torch.as_tensor(rows, dtype=torch.long).to(idx_d.device)
                src = idx_d.index_select(0, rows_d)
                for b in self._buffers():
                    b.index_copy_(0, rows_d, b.index_select(0, src))
            elif len(idx_d) == self._n:
                self._in_idx.copy_(idx_d)
                self._run("reorder")
            else:
                self._rebind([b.index_select(0, idx_d) for b in self._buffers()])
        if on_device:
            self._n = len(idx_d)
            self._stale = True
            return
        self._tokens = [list(self._tokens[i]) for i in idx.tolist()]
        self._fed = self._fed[idx]
        self._finished = self._finished[idx]
        self._group = self._group[idx]

    def copy(self) -> "StaticHFState":
        self._sync()
        new = StaticHFState(self.lm, self.prompts, 1, cuda_graph=self.cuda_graph, _empty=True)
        with torch.no_grad():
            new._rebind([b.clone() for b in self._buffers()])
        new._tokens = [list(t) for t in self._tokens]
        new._fed, new._finished, new._group = self._fed.clone(), self._finished.clone(), self._group.clone()
        new._decoded_d = self._decoded_d.clone()
        new._max_fed = self._max_fed
        new._exact = self._exact
        new._pending = self.__dict__.get("_pending", False)
        new.forward_passes = self.forward_passes
        return new

    def truncate(self, rows, lengths) -> None:
        """Cut completions back (the cache keeps prompt + ``length - 1`` tokens; the last is
        re-fed lazily).  A finished row may be truncated: it is unfinished."""
        self._sync()
        dev = self.fed_d.device
        for i, length in zip(self._rows(rows).tolist(), lengths):
            cur = len(self._tokens[i])
            if not 0 <= length <= cur:
                raise ValueError(f"cannot truncate row {i} of length {cur} to {length}")
            if length == cur:
                continue
            self._tokens[i] = self._tokens[i][:length]
            keep = min(len(self.prompt_of(i)) + length - 1, int(self._fed[i]))
            self._fed[i] = keep
            self._finished[i] = False
            self.fin_d[i] = False
            self.fed_d[i] = torch.tensor(keep, device=dev)
            self.ntok_d[i] = torch.tensor(length, device=dev)
            self._pending = True

    # ------------------------------------------------------------- no-sync fast path
    def last_logprobs(self) -> torch.Tensor:
        """``(N, V)`` next-token log-probs of every row (device; finished rows: stale values)."""
        self._refresh()
        return self.last

    def step(self, tokens: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """Append ``tokens[i]`` to every active (default: unfinished) row without a host sync.

        ``tokens``/``active``: ``(N,)`` on the model's device (finished rows never
        advance).  Returns the ``(N,)`` float32 log-probs ``log p(tokens[i] | row i)``
        on the device; the next-token log-probs are then ``last_logprobs()``.
        """
        self._refresh()
        self._ensure(1)
        with torch.no_grad():
            live = ~self.fin_d
            if active is not None:
                live = live & active.reshape(-1).to(live.device, torch.bool)
            self._in_tok.copy_(tokens.reshape(-1))
            self._in_lens.copy_(live.long())
            self._run("step")
        self.forward_passes += 1
        self._max_fed += 1
        self._stale = True
        return self._out.clone()


def _kv_shapes(lm: "HFLM") -> list[tuple[int, int]]:
    """``(kv_heads, head_dim)`` of every layer, from a one-token forward through a DynamicCache."""
    from transformers import DynamicCache

    if getattr(lm, "_kv_shapes", None):
        return lm._kv_shapes
    dev = lm.device
    cache = DynamicCache()
    one = torch.ones((1, 1), dtype=torch.long, device=dev)
    with torch.no_grad():
        lm.model(input_ids=one * lm.pad_token_id, position_ids=one * 0, use_cache=True,
                 **{cache_argument(lm.model): cache})
    lm._kv_shapes = [(layer.keys.shape[1], layer.keys.shape[3]) for layer in cache.layers]
    return lm._kv_shapes
