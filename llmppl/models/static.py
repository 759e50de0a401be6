"""Static-cache fast path of :class:`~llmppl.models.hf.HFLM` (``HFLM(..., static_cache=True)``).

Every tensor of the state is preallocated once, for ``N`` rows × capacity ``C``
positions (prompt + ``max_new_tokens``), and afterwards only written in place:

* the KV cache of every layer is a ``(N, H, C + 1, D)`` buffer; a token at position
  ``p`` of a row lives in column ``p`` (``scatter_`` of the new keys/values, no
  ``torch.cat``); column ``C`` is a *trash* column that absorbs the writes of rows
  that are not extended in a forward pass (finished rows, padding) and is never read;
* attention of a query at position ``p`` sees columns ``k ≤ p`` (``k < C``): a 4-D
  additive mask built on the device from the row positions, so rows of different
  lengths (ragged blocks, ``truncate``) share one rectangular cache;
* resampling (``reorder`` with ``N`` rows) is an in-place gather of every buffer
  (``buf.copy_(buf.index_select(0, idx))``); finished rows are masked, not removed;
* the one-token decode step of all ``N`` rows (forward, log-softmax, the log-prob of
  the fed token, bookkeeping) reads and writes only these buffers, so on CUDA it is
  captured once in a ``torch.cuda.CUDAGraph`` and replayed (one launch per step); on
  the CPU, or when capture fails, the same function runs eagerly.

The device buffers are the source of truth.  The host view (``tokens``, ``finished``)
is kept in step by the :class:`~llmppl.models.base.LMState` methods; the no-sync
methods :meth:`StaticHFState.step`, :meth:`StaticHFState.finish_where` and
``reorder`` with a device index leave it stale and it is re-read (one device→host
copy) on the next access.  The capacity grows (doubling, graphs re-captured) when a
row would run past it, so ``start(prompt, n)`` without ``max_new_tokens`` is correct too.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .base import KVCachedState, as_index

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
    """Decoding state with a static KV cache (see the module docstring)."""

    def __init__(self, lm: "HFLM", prompt_ids: list[int], n: int,
                 max_new_tokens: int | None = None, cuda_graph: bool = True,
                 _empty: bool = False) -> None:
        super().__init__(lm, prompt_ids, n)
        self.lm = lm
        self.P = len(prompt_ids)
        self.cuda_graph = cuda_graph and lm.device.type == "cuda"
        self.graph_error: str | None = None
        self._graph: Any = None
        self._reorder_graph: Any = None
        if _empty:
            return
        cap = self.P + (max_new_tokens if max_new_tokens is not None else DEFAULT_MAX_NEW_TOKENS)
        dev = lm.device
        from transformers import DynamicCache

        with torch.inference_mode():
            dyn = DynamicCache()
            P = self.P
            lp = lm._forward(torch.tensor([prompt_ids]), torch.ones((1, P), dtype=torch.long),
                             torch.arange(P)[None], dyn, keep=torch.tensor([[False] * (P - 1) + [True]]))
            prompt_kv = [(layer.keys.clone(), layer.values.clone()) for layer in dyn.layers]
            lp = lp.clone()
        self.forward_passes += 1
        with torch.no_grad():
            kv = []
            for k, v in prompt_kv:
                K = torch.zeros((n, k.shape[1], cap + 1, k.shape[3]), dtype=k.dtype, device=dev)
                V = torch.zeros((n, v.shape[1], cap + 1, v.shape[3]), dtype=v.dtype, device=dev)
                K[:, :, :P] = k
                V[:, :, :P] = v
                kv.append((K, V))
            self._set_buffers(
                kv=kv,
                last=lp.expand(n, -1).clone(),
                fed=torch.full((n,), P, dtype=torch.long, device=dev),
                ntok=torch.zeros(n, dtype=torch.long, device=dev),
                hist=torch.zeros((n, cap - P + 1), dtype=torch.long, device=dev),
                fin=torch.zeros(n, dtype=torch.bool, device=dev),
            )
        self._decoded_d = torch.zeros((), dtype=torch.long, device=dev)
        self._stale = False
        self._max_fed = P  # host upper bound on max(fed): capacity checks without a sync

    # ------------------------------------------------------------- buffers
    def _set_buffers(self, kv, last, fed, ntok, hist, fin) -> None:
        """(Re)bind every device buffer; drops captured graphs (their addresses changed)."""
        self._kv = RowCache(kv)
        self.last, self.fed_d, self.ntok_d, self.hist, self.fin_d = last, fed, ntok, hist, fin
        self.C = kv[0][0].shape[2] - 1
        self._n = last.shape[0]
        dev = last.device
        self._cols = torch.arange(self.C + 1, device=dev)
        self._in_tok = torch.zeros(self._n, dtype=torch.long, device=dev)
        self._in_lens = torch.zeros(self._n, dtype=torch.long, device=dev)
        self._in_idx = torch.arange(self._n, device=dev)
        self._out = torch.zeros(self._n, dtype=torch.float32, device=dev)
        self._graph = self._reorder_graph = None

    def _buffers(self) -> list[torch.Tensor]:
        """Every per-row device buffer (row = dim 0)."""
        kv = [t for layer in self._kv.layers for t in (layer.keys, layer.values)]
        return kv + [self.last, self.fed_d, self.ntok_d, self.hist, self.fin_d]

    def _grow(self, need: int) -> None:
        """Reallocate for capacity ``max(need, 2C)`` (keeps contents; graphs re-captured)."""
        C, new = self.C, max(need, 2 * self.C)
        with torch.no_grad():
            kv = []
            for layer in self._kv.layers:
                pair = []
                for t in (layer.keys, layer.values):
                    b = t.new_zeros((t.shape[0], t.shape[1], new + 1, t.shape[3]))
                    b[:, :, :C] = t[:, :, :C]
                    pair.append(b)
                kv.append(tuple(pair))
            hist = self.hist.new_zeros((self._n, new - self.P + 1))
            hist[:, : C - self.P] = self.hist[:, : C - self.P]
            self._set_buffers(kv, self.last, self.fed_d, self.ntok_d, hist, self.fin_d)

    def _ensure(self, extra: int) -> None:
        if self._max_fed + extra > self.C:
            self._grow(self._max_fed + extra)

    # ------------------------------------------------------------- host view
    def _host(self) -> None:
        """Re-read the host view from the device buffers if a no-sync method left it stale."""
        if not self.__dict__.get("_stale", False):
            return
        ntok, fed, fin = self.ntok_d.cpu(), self.fed_d.cpu(), self.fin_d.cpu()
        width = int(ntok.max()) if len(ntok) else 0
        hist = self.hist[:, :width].cpu()
        self._tokens = [hist[i, : int(ntok[i])].tolist() for i in range(self._n)]
        self._fed, self._finished = fed, fin
        self._max_fed = int(fed.max())
        self._stale = False

    @property
    def tokens(self) -> list[list[int]]:
        self._host()
        return self._tokens

    @tokens.setter
    def tokens(self, value: list[list[int]]) -> None:  # LMState.__init__ only
        self._tokens = value
        self._fed = torch.full((len(value),), len(self.prompt), dtype=torch.long)

    @property
    def finished(self) -> torch.Tensor:
        self._host()
        return self._finished

    @finished.setter
    def finished(self, value: torch.Tensor) -> None:  # LMState.__init__ only
        self._finished = value

    @property
    def tokens_decoded(self) -> int:
        return int(self._decoded_d) if "_decoded_d" in self.__dict__ else 0

    @tokens_decoded.setter
    def tokens_decoded(self, value: int) -> None:
        if "_decoded_d" in self.__dict__:
            self._decoded_d.fill_(int(value))

    @property
    def n(self) -> int:
        return self._n if "_n" in self.__dict__ else len(self._tokens)

    # ------------------------------------------------------------- forward passes
    def _decode(self, ids: torch.Tensor, pos: torch.Tensor, write: torch.Tensor) -> torch.Tensor:
        """Hidden states of ``ids`` (N, L) at positions ``pos``, their K/V written at columns ``write``."""
        self._kv.write_index = write
        seen = (self._cols[None, None, None, :] <= pos[:, None, :, None]) & (self._cols < self.C)
        dtype = self._kv.layers[0].keys.dtype
        mask = torch.zeros(seen.shape, dtype=dtype, device=ids.device).masked_fill_(~seen, torch.finfo(dtype).min)
        out = self.lm.model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=pos,
                                          past_key_values=self._kv, use_cache=True)
        return out.last_hidden_state

    def _step_impl(self) -> None:
        """One token for rows with ``_in_lens == 1``: reads/writes static buffers only (graph-safe)."""
        tok, lens = self._in_tok, self._in_lens
        active = lens > 0
        pos = self.fed_d[:, None]
        write = torch.where(active[:, None], pos, self.C)
        h = self._decode(tok[:, None], pos, write)
        lp = torch.log_softmax(self.lm.model.get_output_embeddings()(h[:, -1]).float(), dim=-1)
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
        """Run ``_step_impl`` / ``_reorder_impl``, through a captured CUDA graph when enabled."""
        impl = getattr(self, f"_{name}_impl")
        if not self.cuda_graph:
            impl()
            return
        attr = "_graph" if name == "step" else "_reorder_graph"
        graph = getattr(self, attr)
        if graph is None:
            graph = self._capture(name, impl)
            setattr(self, attr, graph)
            if graph is None:
                impl()
                return
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
        """Feed ``ids[i, :lens[i]]`` to every row (eager); ``(N, L)`` float32 log-probs of those tokens."""
        N, L = ids.shape
        ar = torch.arange(L, device=ids.device)
        pos = self.fed_d[:, None] + ar
        valid = ar[None, :] < lens[:, None]
        h = self._decode(ids, pos, torch.where(valid, pos, self.C))
        head = self.lm.model.get_output_embeddings()
        out = torch.empty((N, L), dtype=torch.float32, device=ids.device)
        out[:, 0] = self.last.gather(1, ids[:, :1]).squeeze(1)
        new_last = self.last.clone()
        rows = torch.arange(N, device=ids.device)
        step = max(1, _LOGIT_ROWS // N)
        for j0 in range(0, L, step):
            j1 = min(L, j0 + step)
            lp = torch.log_softmax(head(h[:, j0:j1]).float(), dim=-1)  # (N, l, V)
            if j0 + 1 < L:
                nxt = ids[:, j0 + 1 : j1 + 1]
                out[:, j0 + 1 : j0 + 1 + nxt.shape[1]] = lp[:, : nxt.shape[1]].gather(2, nxt[..., None]).squeeze(2)
            at = lens - 1 - j0
            here = (at >= 0) & (at < j1 - j0)
            cand = lp[rows, at.clamp(0, j1 - j0 - 1)]
            new_last = torch.where(here[:, None], cand, new_last)
        self.last.copy_(new_last)
        if record:
            col = torch.where(valid, self.ntok_d[:, None] + ar, self.hist.shape[1] - 1)
            self.hist.scatter_(1, col, ids)
            self.ntok_d.add_(lens)
        self.fed_d.add_(lens)
        self._decoded_d.add_(lens.sum())
        return out.masked_fill_(~valid, -math.inf)

    def _feed(self, rows: list[int], blocks: list[list[int]], record: bool = True) -> torch.Tensor:
        """Host path: feed ``blocks`` to ``rows``; ``(len(rows), L)`` float64 CPU log-probs (-inf padded)."""
        width = max(len(b) for b in blocks)
        self._ensure(width)
        ids = torch.full((self._n, width), self.lm.pad_token_id, dtype=torch.long)
        lens = torch.zeros(self._n, dtype=torch.long)
        for i, b in zip(rows, blocks):
            ids[i, : len(b)] = torch.tensor(b, dtype=torch.long)
            lens[i] = len(b)
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
        for i, b in zip(rows, blocks):
            self._fed[i] += len(b)
            if record:
                self._tokens[i] = self._tokens[i] + b
        self._max_fed = max(self._max_fed, int(self._fed.max()))
        out = lp[torch.as_tensor(rows, device=lp.device)].double().cpu()
        return out.masked_fill_(torch.arange(width)[None, :] >= lens[rows][:, None], -math.inf)

    def _refresh(self, rows: list[int]) -> None:
        """Feed the tokens of ``rows`` that ``truncate`` left out of the cache."""
        seqs = [(i, (self.prompt + self._tokens[i])[int(self._fed[i]):]) for i in rows]
        seqs = [(i, s) for i, s in seqs if s]
        if seqs:
            self._feed([i for i, _ in seqs], [s for _, s in seqs], record=False)
            # re-fed prompt tokens (truncation to length 0) are not decoded tokens
            self._decoded_d -= sum(max(0, self.P - int(self._fed[i]) + len(s)) for i, s in seqs)

    # ------------------------------------------------------------- LMState interface
    def extend(self, tokens, rows=None) -> torch.Tensor:
        self._host()
        idx, blocks = self._extend_args(tokens, rows)
        self._refresh(idx)
        return self._feed_blocks(idx, blocks)

    def finish(self, rows) -> None:
        self._host()
        idx = self._rows(rows)
        self._finished[idx] = True
        self.fin_d[idx.to(self.fin_d.device)] = True

    def reorder(self, indices) -> None:
        """Row j := row ``indices[j]``: an in-place gather when the row count is unchanged.

        ``indices`` on the device (e.g. from on-device resampling) is applied without a
        host sync; the host view is then re-read lazily.
        """
        stale = self.__dict__.get("_stale", False)
        on_device = isinstance(indices, torch.Tensor) and (indices.device.type != "cpu" or stale)
        if on_device:
            idx_d = indices.reshape(-1).to(device=self.last.device, dtype=torch.long)
        else:
            self._host()
            idx = as_index(indices, self._n)
            idx_d = idx.to(self.last.device)
        with torch.no_grad():
            if len(idx_d) == self._n:
                self._in_idx.copy_(idx_d)
                self._run("reorder")
            else:
                bufs = [b.index_select(0, idx_d) for b in self._buffers()]
                L = len(self._kv.layers)
                self._set_buffers(list(zip(bufs[0:2 * L:2], bufs[1:2 * L:2])), *bufs[2 * L:])
        if on_device:
            self._n = len(idx_d)
            self._stale = True
            return
        self._tokens = [list(self._tokens[i]) for i in idx.tolist()]
        self._fed = self._fed[idx]
        self._finished = self._finished[idx]

    def copy(self) -> "StaticHFState":
        self._host()
        new = StaticHFState(self.lm, self.prompt, self._n, cuda_graph=self.cuda_graph, _empty=True)
        with torch.no_grad():
            bufs = [b.clone() for b in self._buffers()]
        L = len(self._kv.layers)
        new._set_buffers(list(zip(bufs[0:2 * L:2], bufs[1:2 * L:2])), *bufs[2 * L:])
        new._tokens = [list(t) for t in self._tokens]
        new._fed, new._finished = self._fed.clone(), self._finished.clone()
        new._decoded_d = self._decoded_d.clone()
        new._max_fed = self._max_fed
        new.forward_passes = self.forward_passes
        return new

    def truncate(self, rows, lengths) -> None:
        self._host()
        dev = self.fed_d.device
        for i, length in zip(self._rows(rows).tolist(), lengths):
            cur = len(self._tokens[i])
            if not 0 <= length <= cur:
                raise ValueError(f"cannot truncate row {i} of length {cur} to {length}")
            if length == cur:
                continue
            if bool(self._finished[i]):
                raise ValueError(f"row {i} was finished: it cannot be truncated")
            self._tokens[i] = self._tokens[i][:length]
            # keep prompt + first (length - 1) tokens; the last one is re-fed for `last`
            keep = min(self.P + length - 1, int(self._fed[i]))
            self._fed[i] = keep
            self.fed_d[i] = torch.tensor(keep, device=dev)
            self.ntok_d[i] = torch.tensor(length, device=dev)

    # ------------------------------------------------------------- no-sync fast path
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append ``tokens[i]`` to every unfinished row i without a host sync.

        ``tokens``: ``(N,)`` ids on the model's device (entries of finished rows are
        ignored).  Returns the ``(N,)`` float32 log-probs ``log p(tokens[i] | row i)``
        on the device; the next-token log-probs are then ``self.last`` ``(N, V)``.
        """
        if not self.__dict__.get("_stale", False):
            self._refresh([i for i in range(self._n) if not bool(self._finished[i])])
        self._ensure(1)
        with torch.no_grad():
            self._in_tok.copy_(tokens.reshape(-1))
            self._in_lens.copy_((~self.fin_d).long())
            self._run("step")
        self.forward_passes += 1
        self._max_fed += 1
        self._stale = True
        return self._out.clone()

    def finish_where(self, mask: torch.Tensor) -> None:
        """Finish the rows where the device bool ``mask`` is set, without a host sync."""
        self.fin_d |= mask.to(self.fin_d.device)
        self._stale = True
