"""``LlamaCppLM``: a GGUF model run natively by llama.cpp (through ``llama-cpp-python``).

The model and one llama.cpp context are owned by the LM; every decoding state is a
set of *sequence ids* in that context's KV cache (``kv_unified``: one cache shared by
all sequences, so a copied sequence shares the prompt's cells instead of duplicating
them).  A state of ``R = P·n`` rows over ``P`` prompts:

* ``start`` decodes each prompt once (all prompts packed in the same ``llama_decode``
  batches, one output per prompt) into the sequence of its first row, then
  ``llama_memory_seq_cp``\\ s it to the sequences of the prompt's other rows;
* ``extend`` / ``step`` put the new tokens of all rows into one ``llama_batch`` (each
  token tagged with its row's sequence id and position, every token an output) and
  call ``llama_decode`` once (more only when the tokens exceed ``n_batch``);
* ``reorder(idx)`` (resampling) keeps the sequence of the first row that claims it,
  frees (``llama_memory_seq_rm``) the sequences no row claims and copies
  (``seq_cp``) the rest into the freed ids: no prefix is ever re-decoded;
* ``finish`` frees a row's sequence; ``truncate`` removes the tail positions
  (``seq_rm(seq, p, -1)``) and re-decodes the last kept token lazily, so the row's
  next-token distribution is available again; ``copy`` copies every live sequence.

Log-probabilities are ``log_softmax`` (float32) of the full-vocabulary logits.
The LM's sequence ids are a pool of ``n_seq_max`` (≤ 256, llama.cpp's limit) shared by
all live states; a state returns its ids when it is garbage-collected or ``close()``\\ d.
"""

from __future__ import annotations

import gc
import math
import os
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import LanguageModel, LMState, _normalise_blocks, as_index, per_prompt
from .gguf import (  # noqa: F401  (INSTALL_HINT, WEIGHT_TYPES re-exported)
    INSTALL_HINT, WEIGHT_TYPES, GGUFTokenizer, _extra_buffers_usable, import_llama_cpp, reencode_gguf,
    set_llama_logging,
)

#: llama.cpp's compile-time limit on sequence ids (LLAMA_MAX_SEQ)
LLAMA_MAX_SEQ = 256
#: default context (KV cells shared by all rows of all live states) when the model allows it
DEFAULT_N_CTX = 8192


class LlamaCppLM(LanguageModel):
    """A GGUF model run by llama.cpp: ``p(v | s) = softmax(logits(s))[v]`` (see module docstring).

    ``n_ctx``: KV cells shared by every row of every live state (default: the model's
    training context, at most 8192).  ``n_seq_max``: sequence ids (rows of live states,
    plus scratch for ``next_logprobs``), at most 256.  ``n_threads``: CPU threads
    (default: ``torch.get_num_threads()``, so ``OMP_NUM_THREADS`` governs both
    backends).  ``n_gpu_layers``: layers offloaded to a GPU build of llama.cpp.
    ``verbose``: let llama.cpp print its log to stderr (silenced by default).
    ``weights``: ``None`` runs the GGUF's own (quantised) weights; ``"f32"``, ``"f16"``,
    ``"bf16"`` or ``"q8_0"`` run a copy re-encoded once by llama.cpp (:func:`reencode_gguf`).
    llama.cpp's CPU kernels for some quantisations (Q4_1, the bundled model's) gain
    little from batching, so many particles run faster on ``"f32"`` weights.
    ``extra_buffers``: let llama.cpp repack weights into its CPU "extra" buffer types
    (AMX, repacked Q4_0/Q4_K); default: on unless the CPU advertises AMX, because
    virtual machines often advertise AMX without enabling it and llama.cpp then dies
    with an invalid instruction (SIGILL) on its first matrix product.
    """

    def __init__(self, path: str | os.PathLike, n_ctx: int | None = None, n_threads: int | None = None,
                 n_gpu_layers: int = 0, n_seq_max: int = LLAMA_MAX_SEQ, n_batch: int = 512,
                 name: str | None = None, verbose: bool = False, extra_buffers: bool | None = None,
                 weights: str | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {path}")
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
        if not 1 <= n_seq_max <= LLAMA_MAX_SEQ:
            raise ValueError(f"n_seq_max must be in [1, {LLAMA_MAX_SEQ}] (llama.cpp's limit), got {n_seq_max}")
        if n_ctx is not None and n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
        lc = import_llama_cpp()
        set_llama_logging(verbose)
        threads = int(n_threads or torch.get_num_threads())
        source = path
        if weights is not None:
            path = reencode_gguf(path, weights, threads)
        self._lc = lc
        self._model = self._ctx = None
        lc.llama_backend_init()
        mp = lc.llama_model_default_params()
        mp.n_gpu_layers = int(n_gpu_layers)
        mp.use_extra_bufts = bool(_extra_buffers_usable() if extra_buffers is None else extra_buffers)
        model = lc.llama_model_load_from_file(str(path).encode("utf-8"), mp)
        if not model:
            raise ValueError(f"llama.cpp could not load {path}: the GGUF is corrupt, truncated or of an "
                             "unsupported architecture (pass verbose=True to see llama.cpp's log)")
        self._model = model
        self._vocab = lc.llama_model_get_vocab(model)
        n_train = int(lc.llama_model_n_ctx_train(model))
        cp = lc.llama_context_default_params()
        cp.n_ctx = int(n_ctx or min(n_train, DEFAULT_N_CTX) or DEFAULT_N_CTX)
        cp.n_batch = cp.n_ubatch = int(n_batch)
        cp.n_seq_max = int(n_seq_max)
        cp.kv_unified = True
        cp.n_threads = cp.n_threads_batch = threads
        cp.no_perf = True
        ctx = lc.llama_init_from_model(model, cp)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a context (n_ctx={cp.n_ctx}, n_seq_max={n_seq_max}) "
                               f"for {path}; try a smaller n_ctx")
        self._ctx = ctx
        self._mem = lc.llama_get_memory(ctx)
        self.n_ctx = int(lc.llama_n_ctx(ctx))
        self.n_batch = int(min(n_batch, self.n_ctx))
        self.n_seq_max = int(lc.llama_n_seq_max(ctx))
        self.n_threads = threads
        self.n_ctx_train = n_train
        self.path = source
        self.weights = weights
        self.model_file = path
        V = int(lc.llama_vocab_n_tokens(self._vocab))
        eos = int(lc.llama_vocab_eos(self._vocab))
        eog = [t for t in range(V) if lc.llama_vocab_is_eog(self._vocab, t)]
        if eos < 0:
            eos = eog[0] if eog else -1
        if eos < 0:
            raise ValueError(f"{path} defines no EOS / end-of-generation token")
        bos = int(lc.llama_vocab_bos(self._vocab))
        super().__init__(vocab_size=V, eos_token_id=eos, bos_token_id=bos if bos >= 0 else None,
                         max_context=self.n_ctx, name=name or source.stem)
        #: every end-of-generation id of the GGUF (EOS, EOT, <|im_end|>, ...), primary EOS first
        self.eos_token_ids: tuple[int, ...] = tuple([eos] + [t for t in eog if t != eos])
        self.tokenizer = GGUFTokenizer(self)
        self._free = list(range(self.n_seq_max - 1, -1, -1))  # pool of sequence ids (pop from the end)
        self._batch = lc.llama_batch_init(self.n_batch, 0, 1)
        b = self._batch
        self._b_token = np.ctypeslib.as_array(b.token, shape=(self.n_batch,))
        self._b_pos = np.ctypeslib.as_array(b.pos, shape=(self.n_batch,))
        self._b_nseq = np.ctypeslib.as_array(b.n_seq_id, shape=(self.n_batch,))
        self._b_out = np.ctypeslib.as_array(b.logits, shape=(self.n_batch,))
        self._b_seq = [b.seq_id[i] for i in range(self.n_batch)]
        self._b_nseq[:] = 1
        self._closed = False

    # ----------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Free the llama.cpp context, batch and model (the LM is unusable afterwards)."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        lc = self._lc
        lc.llama_batch_free(self._batch)
        if self._ctx:
            lc.llama_free(self._ctx)
        if self._model:
            lc.llama_model_free(self._model)
        self._ctx = self._model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        w = f", weights={self.weights!r}" if self.weights else ""
        return (f"LlamaCppLM({str(self.path)!r}{w}, n_ctx={self.n_ctx}, n_seq_max={self.n_seq_max}, "
                f"n_threads={self.n_threads})")

    # ----------------------------------------------------------- sequence ids
    def _ensure_free(self, k: int, what: str = "rows") -> None:
        """Raise (naming the limit) unless ``k`` sequence ids are free."""
        if k > len(self._free):
            gc.collect()  # states that went out of scope return their ids
        if k > len(self._free):
            raise ValueError(
                f"{k} {what} need {k} llama.cpp sequence ids but only {len(self._free)} of the context's "
                f"n_seq_max={self.n_seq_max} are free (llama.cpp allows at most {LLAMA_MAX_SEQ}); "
                "use fewer rows (particles × prompts) or close other decoding states")

    def _acquire(self, k: int, what: str = "rows") -> list[int]:
        self._ensure_free(k, what)
        return [self._free.pop() for _ in range(k)]

    def _release(self, seqs: Sequence[int]) -> None:
        for s in seqs:
            if s >= 0:
                self._lc.llama_memory_seq_rm(self._mem, s, -1, -1)
                self._free.append(s)

    @property
    def free_sequences(self) -> int:
        """Sequence ids not held by any live state."""
        return len(self._free)

    # ------------------------------------------------------------- decoding
    def _decode(self, items: list[tuple[int, int, int, bool]]) -> torch.Tensor:
        """Decode ``(token, pos, seq, output)`` items; float32 log-probs of the outputs, in order.

        Items are fed in chunks of at most ``n_batch`` tokens (one ``llama_decode`` each);
        an item's row may continue into the next chunk (its cache persists).
        """
        if self._closed:
            raise RuntimeError(f"{self.name} was closed")
        lc = self._lc
        outs: list[torch.Tensor] = []
        for start in range(0, len(items), self.n_batch):
            chunk = items[start : start + self.n_batch]
            k = len(chunk)
            tok, pos, seq, out = zip(*chunk)
            self._b_token[:k] = tok
            self._b_pos[:k] = pos
            self._b_out[:k] = out
            for j, s in enumerate(seq):
                self._b_seq[j][0] = s
            self._batch.n_tokens = k
            rc = lc.llama_decode(self._ctx, self._batch)
            if rc != 0:
                if rc == 1:
                    raise RuntimeError(
                        f"llama.cpp's KV cache is full (n_ctx={self.n_ctx} cells shared by all rows of all live "
                        f"states): create the LM with a larger n_ctx, or use fewer rows / max_new_tokens")
                raise RuntimeError(f"llama_decode failed with code {rc}")
            n_out = int(sum(out))
            if n_out:
                ptr = lc.llama_get_logits(self._ctx)
                logits = np.ctypeslib.as_array(ptr, shape=(n_out, self.vocab_size))
                outs.append(torch.log_softmax(torch.from_numpy(logits), dim=-1))  # a new tensor
        if not outs:
            return torch.empty(0, self.vocab_size)
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    # ----------------------------------------------------------------- contract
    def next_logprobs(self, sequences: list[list[int]]) -> torch.Tensor:
        """Uncached reference: each sequence decoded from scratch, alone, in a scratch sequence id.

        One sequence per ``llama_decode`` (chunked by ``n_batch``), so a row's result does
        not depend on the other sequences of the call.  (llama.cpp's kernels do depend on
        the batch: decoding several sequences together moves log-probs by up to ~0.05 nats
        KL on a Q4 model, the size of its activation-quantisation noise.)
        """
        seqs = [[int(t) for t in s] for s in sequences]
        for i, s in enumerate(seqs):
            if not s:
                raise ValueError(f"sequence {i} is empty")
            if len(s) > self.n_ctx:
                raise ValueError(f"sequence {i} has {len(s)} tokens; the context holds n_ctx={self.n_ctx}")
            bad = [t for t in s if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"sequence {i}: token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        out = torch.empty(len(seqs), self.vocab_size)
        (sid,) = self._acquire(1, "scratch sequence")
        try:
            for i, s in enumerate(seqs):
                out[i] = self._decode([(t, p, sid, p == len(s) - 1) for p, t in enumerate(s)])[0]
                self._lc.llama_memory_seq_rm(self._mem, sid, -1, -1)
        finally:
            self._release([sid])
        return out

    def start(self, prompts: Sequence[int] | Sequence[Sequence[int]], n_per_prompt: int = 1,
              max_new_tokens: int | None = None, *, n: int | None = None) -> "LlamaCppState":
        """A KV-cached state of ``P·n_per_prompt`` rows over one prompt or a list of ``P`` (ragged)
        prompts.  ``n=``: the old name of ``n_per_prompt``."""
        return LlamaCppState(self, prompts, per_prompt(n_per_prompt, n), max_new_tokens)

    def encode_prompt(self, prompt: Any, chat: bool = False) -> list[int]:
        """As :meth:`LanguageModel.encode_prompt`; a text prompt gets BOS when the GGUF says to add one."""
        ids = super().encode_prompt(prompt, chat=chat)
        is_text = isinstance(prompt, str) and not chat
        if is_text and prompt and self.tokenizer.add_bos and self.bos_token_id is not None and (
                not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        return ids


def _split_prompts(prompts: Any) -> list[Sequence[int]]:
    """One prompt (ids) -> [prompt]; a list of prompts -> the list."""
    if isinstance(prompts, torch.Tensor):
        return [prompts.tolist()] if prompts.dim() == 1 else prompts.tolist()
    seq = list(prompts)
    if not seq:
        raise ValueError("start() needs a prompt: got an empty list")
    first = seq[0]
    if isinstance(first, (int, np.integer)) or (isinstance(first, torch.Tensor) and first.dim() == 0):
        return [seq]
    return seq


class LlamaCppState(LMState):
    """KV-cached decoding state of a :class:`LlamaCppLM` (see the module docstring).

    ``seq[r]``: row r's llama.cpp sequence id (-1 once finished); ``fed[r]``: tokens of
    ``prompt + completion`` in its cache (fewer than the row's length after ``truncate``:
    the rest is re-decoded before the row's distribution is next needed); ``last[r]``:
    its next-token log-probabilities when up to date.
    """

    def __init__(self, lm: LlamaCppLM, prompts: Any, n: int = 1, max_new_tokens: int | None = None,
                 _empty: bool = False) -> None:
        # LMState.__init__ is not called: this class sets every attribute it uses
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"a decoding state needs at least one row per prompt, got n={n!r}")
        self.lm = lm
        self._seqs_alive = False
        plist = _split_prompts(prompts)
        checked = []
        for i, p in enumerate(plist):
            try:
                checked.append(lm.check_prompt(p, max_new_tokens or 0))
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}" + (f" (the llama.cpp context has n_ctx={lm.n_ctx}; pass "
                                 "a larger n_ctx to LlamaCppLM)" if "context" in str(e) else "")) from None
        self.prompts: list[list[int]] = checked
        P = len(checked)
        R = P * n
        self.group = torch.arange(P).repeat_interleave(n)
        self.tokens: list[list[int]] = [[] for _ in range(R)]
        self.finished = torch.zeros(R, dtype=torch.bool)
        self.forward_passes = 0
        self.tokens_decoded = 0
        self.fed = [0] * R
        self.seq = [-1] * R
        self.last = torch.zeros((R, lm.vocab_size), dtype=torch.float32)
        self._stale: set[int] = set()  # rows with tokens not in their cache (after truncate)
        if _empty:
            return
        if max_new_tokens is not None:
            cells = sum(len(p) for p in checked) + R * max_new_tokens
            if cells > lm.n_ctx:
                raise ValueError(
                    f"{P} prompt(s) of {sum(len(p) for p in checked)} tokens + {R} rows × max_new_tokens="
                    f"{max_new_tokens} need up to {cells} KV cells; the llama.cpp context has n_ctx={lm.n_ctx}: "
                    "pass a larger n_ctx to LlamaCppLM or use fewer rows")
        if R > lm.n_seq_max:
            raise ValueError(f"{R} rows ({P} prompt(s) × {n}) exceed the llama.cpp context's n_seq_max="
                             f"{lm.n_seq_max} sequence slots (llama.cpp allows at most {LLAMA_MAX_SEQ})")
        self.seq = lm._acquire(R, f"rows ({P} prompt(s) × {n})")
        self._seqs_alive = True
        self._finalizer = weakref.finalize(self, _release_state, lm, self.seq)
        heads = [self.seq[p * n] for p in range(P)]
        items = [(t, pos, heads[p], pos == len(ids) - 1) for p, ids in enumerate(checked)
                 for pos, t in enumerate(ids)]
        lp = lm._decode(items)
        self.forward_passes += 1
        for p in range(P):
            for r in range(p * n + 1, (p + 1) * n):
                lm._lc.llama_memory_seq_cp(lm._mem, heads[p], self.seq[r], -1, -1)
        self.last = lp.repeat_interleave(n, dim=0)
        self.fed = [len(checked[p]) for p in range(P) for _ in range(n)]

    # n, prompt, prompt_of, _rows and sequences come from LMState (same attributes)

    # ------------------------------------------------------------- internals
    def _pending(self, i: int) -> list[int]:
        """Tokens of row i not in its cache (only rows in ``_stale``, after ``truncate``)."""
        if i not in self._stale:
            return []
        p = self.prompt_of(i)
        f = self.fed[i]
        return (p[f:] + self.tokens[i]) if f < len(p) else self.tokens[i][f - len(p):]

    def _feed(self, rows: list[int], blocks: list[list[int]]) -> tuple[torch.Tensor, list[int]]:
        """Decode ``blocks`` (each a row's not-yet-cached tokens, non-empty) in one batch.

        Returns the ``(Σ len(block), V)`` log-probs after each fed token and the offset of
        each row's block in it; ``last`` of the rows becomes the log-probs after their block.
        """
        items = []
        offsets = []
        for i, b in zip(rows, blocks):
            s, f = self.seq[i], self.fed[i]
            offsets.append(len(items))
            items.extend((t, f + j, s, True) for j, t in enumerate(b))
        try:
            lp = self.lm._decode(items)
        except Exception:
            # a failed decode may leave part of the batch in the cache: drop the rows' tails
            # beyond what was fed and re-decode them when next needed
            for i in rows:
                self.lm._lc.llama_memory_seq_rm(self.lm._mem, self.seq[i], self.fed[i], -1)
            self._stale.update(rows)
            raise
        for i, b in zip(rows, blocks):
            self.fed[i] += len(b)
        self.forward_passes += 1
        self.tokens_decoded += len(items)
        ends = torch.tensor([o + len(b) - 1 for o, b in zip(offsets, blocks)])
        if len(rows) == self.n and rows == list(range(self.n)):
            self.last = lp if len(items) == self.n else lp[ends]
        else:
            self.last = self.last.index_copy(0, torch.tensor(rows), lp[ends])
        self._stale.difference_update(rows)
        return lp, offsets

    def _refresh(self, rows: list[int]) -> None:
        if not self._stale:
            return
        todo = [(i, self._pending(i)) for i in rows if i in self._stale]
        todo = [(i, p) for i, p in todo if p]
        if todo:
            self._feed([i for i, _ in todo], [p for _, p in todo])

    def _check_live(self, idx: list[int], what: str) -> None:
        if idx and bool(self.finished[idx].any()):
            dead = [i for i in idx if self.finished[i]]
            raise ValueError(f"cannot {what} row {dead[0]}: it was finished")

    # ------------------------------------------------------------- host API
    def logprobs(self, rows: Any = None) -> torch.Tensor:
        """``(len(rows), V)`` float32 log p(· | row) (rows must not be finished)."""
        idx = self._rows(rows).tolist()
        self._check_live(idx, "read the log-probabilities of")
        self._refresh(idx)
        return self.last[idx]

    def extend(self, tokens: Any, rows: Any = None) -> torch.Tensor:
        """Append ``tokens[k]`` (a token or a block) to row ``rows[k]``; float64 (len(rows), L), -inf padded."""
        idx = self._rows(rows).tolist()
        blocks = _normalise_blocks(tokens, len(idx), self.lm.vocab_size)
        if len(set(idx)) != len(idx):
            raise ValueError("extend got the same row twice")
        self._check_live(idx, "extend")
        width = max((len(b) for b in blocks), default=0)
        out = torch.full((len(idx), width), -math.inf, dtype=torch.float64)
        work = [(k, i, self._pending(i) + b, len(b)) for k, (i, b) in enumerate(zip(idx, blocks)) if b]
        if not work:
            return out
        for k, i, _, _ in work:
            self.tokens[i] = self.tokens[i] + blocks[k]
        prev = self.last
        lp, offsets = self._feed([i for _, i, _, _ in work], [full for _, _, full, _ in work])
        # token j of a fed block was drawn from the distribution before it: `prev` for j = 0,
        # else the output after token j - 1
        a_pos, a_src, a_tok, b_pos, b_src, b_tok = [], [], [], [], [], []
        for (k, i, full, nb), off in zip(work, offsets):
            for j in range(len(full) - nb, len(full)):
                col = j - (len(full) - nb)
                if j == 0:
                    b_pos.append((k, col)), b_src.append(i), b_tok.append(full[j])
                else:
                    a_pos.append((k, col)), a_src.append(off + j - 1), a_tok.append(full[j])
        if a_pos:
            ks, cs = zip(*a_pos)
            out[list(ks), list(cs)] = lp[a_src, a_tok].double()
        if b_pos:
            ks, cs = zip(*b_pos)
            out[list(ks), list(cs)] = prev[b_src, b_tok].double()
        return out

    def finish(self, rows: Any) -> None:
        """Rows never extended again: their sequences are freed (``seq_rm``)."""
        idx = self._rows(rows).tolist()
        free = []
        for i in idx:
            self.finished[i] = True
            if self.seq[i] >= 0:
                free.append(self.seq[i])
                self.seq[i] = -1
        self._release(free)

    def reorder(self, indices: Any, rows: Any = None) -> None:
        """Row j becomes a copy of row ``indices[j]`` (sequence kept, freed or ``seq_cp``'d;
        rows that keep their own sequence cost nothing, so ``rows`` is not needed)."""
        idx = as_index(indices, self.n).tolist()
        old = self.seq
        claimed: set[int] = set()
        new = [-1] * len(idx)
        copies = []
        for j, i in enumerate(idx):
            s = old[i]
            if s < 0:
                continue
            if s not in claimed:
                claimed.add(s)
                new[j] = s
            else:
                copies.append((j, s))
        dead = [s for s in dict.fromkeys(old) if s >= 0 and s not in claimed]
        need = len(copies) - len(dead)
        if need > 0:
            self.lm._ensure_free(need, "more rows after reorder")
        self._release(dead)
        if copies:
            targets = self.lm._acquire(len(copies), "rows after reorder")
            for (j, s), t in zip(copies, targets):
                self.lm._lc.llama_memory_seq_cp(self.lm._mem, s, t, -1, -1)
                new[j] = t
        self._set_seqs(new)
        t_idx = torch.tensor(idx, dtype=torch.long)
        self.last = self.last[t_idx]
        self.fed = [self.fed[i] for i in idx]
        self.finished = self.finished[t_idx]
        self.group = self.group[t_idx]
        self.tokens = [list(self.tokens[i]) for i in idx]
        self._stale = {j for j, i in enumerate(idx) if i in self._stale}

    def copy(self) -> "LlamaCppState":
        """An independent state with the same rows (each live sequence ``seq_cp``'d to a new id)."""
        new = LlamaCppState(self.lm, self.prompts, 1, _empty=True)
        live = [i for i in range(self.n) if self.seq[i] >= 0]
        ids = self.lm._acquire(len(live), "rows of the copy")
        seqs = [-1] * self.n
        for i, t in zip(live, ids):
            self.lm._lc.llama_memory_seq_cp(self.lm._mem, self.seq[i], t, -1, -1)
            seqs[i] = t
        new._set_seqs(seqs)
        new.group = self.group.clone()
        new.tokens = [list(t) for t in self.tokens]
        new.finished = self.finished.clone()
        new.fed = list(self.fed)
        new.last = self.last.clone()
        new._stale = set(self._stale)
        return new

    def truncate(self, rows: Any, lengths: Sequence[int]) -> None:
        """Cut row ``rows[k]``'s completion to ``lengths[k]`` tokens (the row is live again)."""
        idx = self._rows(rows).tolist()
        lengths = [int(x) for x in (lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths)]
        if len(lengths) != len(idx):
            raise ValueError(f"truncate got {len(lengths)} lengths for {len(idx)} rows")
        for i, length in zip(idx, lengths):
            cur = len(self.tokens[i])
            if not 0 <= length <= cur:
                raise ValueError(f"cannot truncate row {i} of length {cur} to {length}")
            if length == cur:
                continue
            self.tokens[i] = self.tokens[i][:length]
            if self.seq[i] < 0:  # finished and freed: re-decode the whole row lazily
                s = self.lm._acquire(1, "truncated finished row")[0]
                seqs = list(self.seq)
                seqs[i] = s
                self._set_seqs(seqs)
                self.fed[i] = 0
                self._stale.add(i)
            else:
                # keep prompt + first (length - 1) tokens; the last kept token is re-decoded
                keep = min(len(self.prompt_of(i)) + length - 1, self.fed[i])
                if not self.lm._lc.llama_memory_seq_rm(self.lm._mem, self.seq[i], keep, -1):
                    raise RuntimeError(f"llama.cpp could not remove the tail of row {i} (a recurrent model?)")
                self.fed[i] = keep
            self._stale.add(i)
            self.finished[i] = False

    # ------------------------------------------------------------ fast path
    def last_logprobs(self) -> torch.Tensor:
        """``(R, V)`` log p(· | row) of every row (finished rows: stale but finite values)."""
        live = [i for i in range(self.n) if not self.finished[i]]
        self._refresh(live)
        return self.last

    def step(self, tokens: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Append ``tokens[r]`` to every active row in one ``llama_decode``; (R,) float32 log p(tokens[r] | row r)."""
        tok = torch.as_tensor(tokens).reshape(-1).cpu().long()
        act = torch.as_tensor(active).reshape(-1).cpu().bool()
        if tok.numel() != self.n or act.numel() != self.n:
            raise ValueError(f"step needs ({self.n},) tokens and active, got {tuple(tok.shape)} and {tuple(act.shape)}")
        rows = act.nonzero().flatten().tolist()
        self._check_live(rows, "step")
        if rows and (int(tok[act].min()) < 0 or int(tok[act].max()) >= self.lm.vocab_size):
            raise ValueError(f"step: token ids out of range [0, {self.lm.vocab_size})")
        self._refresh(rows)
        out = self.last.gather(1, tok.clamp(0, self.lm.vocab_size - 1)[:, None]).squeeze(1)
        out = out.masked_fill(~act, 0.0)
        if rows:
            tl = tok.tolist()
            for i in rows:
                self.tokens[i] = self.tokens[i] + [tl[i]]
            self._feed(rows, [[tl[i]] for i in rows])
        return out

    # ------------------------------------------------------------- lifecycle
    def _set_seqs(self, seqs: list[int]) -> None:
        self.seq = seqs
        if getattr(self, "_finalizer", None) is not None:
            self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _release_state, self.lm, seqs)

    def _release(self, seqs: list[int]) -> None:
        self.lm._release(seqs)

    def close(self) -> None:
        """Free every sequence of this state now (it is unusable afterwards)."""
        if getattr(self, "_finalizer", None) is not None:
            self._finalizer()
        self.seq = [-1] * self.n
        self.finished[:] = True


def _release_state(lm: LlamaCppLM, seqs: list[int]) -> None:
    if not getattr(lm, "_closed", True):
        lm._release([s for s in seqs if s >= 0])
