"""``HFLM``: any transformers causal LM behind the batched LM interface.

The decoding state keeps one ``DynamicCache`` whose batch rows are the *live*
rows of the state (finished rows are dropped from it).  Rows may have different
lengths: the cache is a rectangle with a boolean ``valid`` mask over its columns,
positions are passed explicitly, and rows not extended in a forward pass get a
masked pad column.  ``reorder`` is one ``index_select`` per layer; no prefix is
ever re-encoded, and the prompt is encoded once and broadcast to every row.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .base import KVCachedState, LanguageModel, LMState, as_index

#: positions per chunk when projecting hidden states to vocabulary log-probs
_LOGIT_CHUNK = 64


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


class HFLM(LanguageModel):
    """A ``transformers`` causal LM: ``p(v | s) = softmax(model(s).logits[-1])[v]``."""

    def __init__(self, model: Any, tokenizer: Any = None, name: str | None = None,
                 static_cache: bool = False, cuda_graph: bool = True) -> None:
        config = model.config
        vocab = int(model.get_output_embeddings().weight.shape[0])
        eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
        if eos is None:
            eos = config.eos_token_id
        if isinstance(eos, (list, tuple)):
            eos = eos[0]
        if eos is None:
            raise ValueError("the model defines no EOS token id")
        bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
        if bos is None:
            bos = getattr(config, "bos_token_id", None)
        super().__init__(
            vocab_size=vocab,
            eos_token_id=int(eos),
            bos_token_id=bos,
            max_context=getattr(config, "max_position_embeddings", None),
            name=name or getattr(config, "_name_or_path", None) or "HFLM",
        )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.pad_token_id = int(getattr(config, "pad_token_id", None) or self.eos_token_id)
        #: ``start`` returns a :class:`~llmppl.models.static.StaticHFState` (preallocated cache,
        #: CUDA-graph decode step when ``cuda_graph`` and the model is on CUDA)
        self.static_cache = bool(static_cache)
        self.cuda_graph = bool(cuda_graph)

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike,
        gguf_file: str | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        name: str | None = None,
        static_cache: bool = False,
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
        tokenizer = AutoTokenizer.from_pretrained(path, **extra)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=_resolve_dtype(dtype), **extra, **kwargs
        )
        return cls(model.to(device), tokenizer, name=name or str(path_or_id), static_cache=static_cache)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ----------------------------------------------------------------- contract
    @torch.inference_mode()
    def next_logprobs(self, sequences: list[list[int]]) -> torch.Tensor:
        """Uncached reference: right-padded batch, log-softmax at each row's last token."""
        lengths = torch.tensor([len(s) for s in sequences])
        width = int(lengths.max())
        ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        for i, s in enumerate(sequences):
            ids[i, : len(s)] = torch.tensor(s)
        cols = torch.arange(width)[None, :]
        mask = (cols < lengths[:, None]).long()
        keep = cols == (lengths[:, None] - 1)
        return self._forward(ids, mask, cols.expand(len(sequences), -1), None, keep)

    def start(self, prompt_ids: Sequence[int], n: int = 1, max_new_tokens: int | None = None) -> LMState:
        """A KV-cached state; static (preallocated for ``max_new_tokens``) when ``static_cache``."""
        if self.static_cache:
            from .static import StaticHFState

            return StaticHFState(self, self.check_prompt(prompt_ids), n, max_new_tokens, self.cuda_graph)
        return HFState(self, self.check_prompt(prompt_ids), n)

    # ------------------------------------------------------------- internals
    def _forward(
        self,
        ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Any,
        keep: torch.Tensor,
    ) -> torch.Tensor:
        """Run the decoder on ``ids`` (B, L); return float32 log-probs at ``keep`` (B, L) positions.

        Projects only the kept hidden states onto the vocabulary, in chunks, so a long
        block never materialises a (B, L, V) tensor.
        """
        decoder = self.model.get_decoder() if hasattr(self.model, "get_decoder") else None
        dev = self.device
        kw = dict(
            input_ids=ids.to(dev),
            attention_mask=attention_mask.to(dev),
            position_ids=position_ids.to(dev),
            past_key_values=cache,
            use_cache=cache is not None,
        )
        keep = keep.to(dev)
        if decoder is None:
            logits = self.model(**kw).logits
            return torch.log_softmax(logits[keep].float(), dim=-1)
        hidden = decoder(**kw).last_hidden_state[keep]
        head = self.model.get_output_embeddings()
        parts = [
            torch.log_softmax(head(hidden[i : i + _LOGIT_CHUNK]).float(), dim=-1)
            for i in range(0, hidden.shape[0], _LOGIT_CHUNK)
        ]
        return torch.cat(parts) if parts else torch.empty(0, self.vocab_size, device=dev)


class HFState(KVCachedState):
    """KV-cached decoding state of an :class:`HFLM` (see module docstring)."""

    def __init__(self, lm: HFLM, prompt_ids: list[int], n: int, _empty: bool = False) -> None:
        super().__init__(lm, prompt_ids, n)
        self.lm: HFLM = lm
        V = lm.vocab_size
        self.last = torch.zeros((n, V), dtype=torch.float32, device=lm.device)
        self.fed = torch.zeros(n, dtype=torch.long)  # tokens (prompt incl.) in the cache per row
        self.slot = torch.full((n,), -1, dtype=torch.long)  # row -> cache batch row
        self.cache: Any = None
        self.valid = torch.zeros((0, 0), dtype=torch.bool)
        if _empty:
            return
        from transformers import DynamicCache

        # encode the prompt once (all but its last token), broadcast the cache to n rows
        with torch.inference_mode():
            self.cache = DynamicCache()
            P = len(prompt_ids)
            ids = torch.tensor([prompt_ids])
            lp = lm._forward(
                ids,
                torch.ones((1, P), dtype=torch.long),
                torch.arange(P)[None],
                self.cache,
                keep=torch.tensor([[False] * (P - 1) + [True]]),
            )
            self.forward_passes += 1
        self.cache.reorder_cache(torch.zeros(n, dtype=torch.long, device=lm.device))
        self.valid = torch.ones((n, P), dtype=torch.bool)
        self.last[:] = lp
        self.fed[:] = P
        self.slot = torch.arange(n)

    # ------------------------------------------------------------ bookkeeping
    def _pending(self, i: int) -> list[int]:
        """Tokens of row i not yet in the cache (after a truncate)."""
        have = int(self.fed[i]) - len(self.prompt)
        return self.tokens[i][have:]

    def _compact(self) -> None:
        """Drop cache rows of finished rows and squeeze out masked columns."""
        live = (self.slot >= 0).nonzero().flatten()
        used = self.slot[live]
        n_cache = self.valid.shape[0]
        if len(used) != n_cache or (len(used) and not torch.equal(used, torch.arange(n_cache))):
            self._select_cache(used)
            self.slot[:] = -1
            self.slot[live] = torch.arange(len(live))
        counts = self.valid.sum(1)
        width = self.valid.shape[1]
        if self.valid.numel() and width > 2 * int(counts.max()) + 32:
            # left-align every row's valid columns (keeps their order, hence positions)
            new_w = int(counts.max())
            order = torch.sort((~self.valid).to(torch.int8), dim=1, stable=True).indices[:, :new_w]
            dev = self.lm.device
            for layer in self.cache.layers:
                g = order.to(dev)[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
                layer.keys = layer.keys.gather(2, g)
                layer.values = layer.values.gather(2, g)
            self.valid = torch.arange(new_w)[None, :] < counts[:, None]

    def _select_cache(self, cache_rows: torch.Tensor) -> None:
        if len(cache_rows) == 0:
            self.cache = None
            self.valid = torch.zeros((0, 0), dtype=torch.bool)
            return
        self.cache.reorder_cache(cache_rows.to(self.lm.device))
        self.valid = self.valid[cache_rows]

    def _feed(self, rows: list[int], blocks: list[list[int]]) -> torch.Tensor:
        """Feed ``blocks`` to rows (all live); return their tokens' log-probs (float64, -inf padded).

        The log-prob of a block's first token comes from ``last`` (the row's current
        next-token distribution); later ones from this forward pass.
        """
        self._compact()
        width = max(len(b) for b in blocks)
        n_cache = self.valid.shape[0]
        ids = torch.full((n_cache, width), self.lm.pad_token_id, dtype=torch.long)
        new_valid = torch.zeros((n_cache, width), dtype=torch.bool)
        pos = torch.zeros((n_cache, width), dtype=torch.long)
        keep = torch.zeros((n_cache, width), dtype=torch.bool)
        for i, b in zip(rows, blocks):
            s = int(self.slot[i])
            ids[s, : len(b)] = torch.tensor(b)
            new_valid[s, : len(b)] = True
            pos[s] = int(self.fed[i]) + torch.arange(width)
            keep[s, : len(b)] = True
        mask = torch.cat([self.valid, new_valid], dim=1)
        with torch.inference_mode():
            lp = self.lm._forward(ids, mask.long(), pos, self.cache, keep)
        self.forward_passes += 1
        self.valid = mask
        out = torch.full((len(rows), width + 1), -math.inf, dtype=torch.float64)
        offset = 0
        # `lp` rows follow the row-major order of `keep`, i.e. by cache slot
        by_slot = sorted(range(len(rows)), key=lambda k: int(self.slot[rows[k]]))
        for k in by_slot:
            i, b = rows[k], blocks[k]
            seg = lp[offset : offset + len(b)]
            offset += len(b)
            # log-probs of b[0] from `last`, of b[j] from seg[j-1]
            targets = torch.tensor(b, device=seg.device)
            prev = torch.cat([self.last[i : i + 1], seg[:-1]])
            out[k, : len(b)] = prev.gather(1, targets[:, None]).squeeze(1).double().cpu()
            self.last[i] = seg[-1]
            self.fed[i] += len(b)
            self.tokens_decoded += len(b)
        return out[:, :width]

    def _refresh(self, rows: list[int]) -> None:
        """Feed pending tokens (left by ``truncate``) of the given rows."""
        todo = [(i, self._pending(i)) for i in rows]
        todo = [(i, p) for i, p in todo if p]
        if todo:
            self._feed([i for i, _ in todo], [p for _, p in todo])

    # ------------------------------------------------------------- interface
    def extend(self, tokens, rows=None) -> torch.Tensor:
        idx, blocks = self._extend_args(tokens, rows)
        self._refresh(idx)
        for i, b in zip(idx, blocks):
            self.tokens[i] = self.tokens[i] + b
        return self._feed_blocks(idx, blocks)

    def finish(self, rows) -> None:
        idx = self._rows(rows)
        self.finished[idx] = True
        self.slot[idx] = -1

    def reorder(self, indices) -> None:
        idx = as_index(indices, self.n)
        slots = self.slot[idx]
        live = (slots >= 0).nonzero().flatten()
        if self.cache is not None and len(live):
            self._select_cache(slots[live])
        elif self.cache is not None:
            self._select_cache(torch.zeros(0, dtype=torch.long))
        new_slot = torch.full((len(idx),), -1, dtype=torch.long)
        new_slot[live] = torch.arange(len(live))
        self.slot = new_slot
        self.last = self.last[idx.to(self.last.device)]
        self.fed = self.fed[idx]
        self.finished = self.finished[idx]
        self.tokens = [list(self.tokens[i]) for i in idx.tolist()]

    def copy(self) -> "HFState":
        new = HFState(self.lm, self.prompt, self.n, _empty=True)
        new.tokens = [list(t) for t in self.tokens]
        new.finished = self.finished.clone()
        new.last = self.last.clone()
        new.fed = self.fed.clone()
        new.slot = self.slot.clone()
        new.cache = copy.deepcopy(self.cache)
        new.valid = self.valid.clone()
        return new

    def concat(self, other: "HFState") -> "HFState":
        """A new state whose rows are this state's rows followed by ``other``'s."""
        from transformers import DynamicCache

        if other.prompt != self.prompt:
            raise ValueError("can only concatenate states over the same prompt")
        self._compact()
        other._compact()
        new = HFState(self.lm, self.prompt, self.n + other.n, _empty=True)
        new.tokens = [list(t) for t in self.tokens + other.tokens]
        new.finished = torch.cat([self.finished, other.finished])
        new.last = torch.cat([self.last, other.last])
        new.fed = torch.cat([self.fed, other.fed])
        n_self = self.valid.shape[0]
        other_slot = torch.where(other.slot >= 0, other.slot + n_self, other.slot)
        new.slot = torch.cat([self.slot, other_slot])
        parts = [s for s in (self, other) if s.cache is not None and s.valid.shape[0]]
        if not parts:
            return new
        width = max(s.valid.shape[1] for s in parts)
        layers, valids = [], []
        for s in parts:
            pad = width - s.valid.shape[1]
            valids.append(torch.nn.functional.pad(s.valid, (0, pad), value=False))
        for li in range(len(parts[0].cache.layers)):
            ks, vs = [], []
            for s in parts:
                pad = width - s.valid.shape[1]
                layer = s.cache.layers[li]
                ks.append(torch.nn.functional.pad(layer.keys, (0, 0, 0, pad)))
                vs.append(torch.nn.functional.pad(layer.values, (0, 0, 0, pad)))
            layers.append((torch.cat(ks), torch.cat(vs)))
        new.cache = DynamicCache(ddp_cache_data=layers)
        new.valid = torch.cat(valids)
        return new

    def truncate(self, rows, lengths) -> None:
        for i, length in zip(self._rows(rows).tolist(), lengths):
            cur = len(self.tokens[i])
            if not 0 <= length <= cur:
                raise ValueError(f"cannot truncate row {i} of length {cur} to {length}")
            if length == cur:
                continue
            if self.slot[i] < 0:
                raise ValueError(f"row {i} was finished and its cache freed: it cannot be truncated")
            self.tokens[i] = self.tokens[i][:length]
            # keep the cache for prompt + first (length - 1) tokens; the last one is re-fed
            keep_total = len(self.prompt) + max(length - 1, 0)
            if length == 0:
                keep_total = len(self.prompt) - 1
            keep_total = min(keep_total, int(self.fed[i]))
            s = int(self.slot[i])
            row_valid = self.valid[s]
            cum = torch.cumsum(row_valid.long(), 0)
            self.valid[s] = row_valid & (cum <= keep_total)
            self.fed[i] = keep_total
            if length == 0:
                # re-feed the prompt's last token so `last` is the prompt's next-token dist
                self.tokens[i] = []
                self._feed_prompt_tail(i)

    def _feed_prompt_tail(self, i: int) -> None:
        tail = self.prompt[-1]
        self.last[i] = 0.0  # unused: the returned log-prob of the prompt token is discarded
        self._feed([i], [[tail]])
        self.tokens_decoded -= 1
