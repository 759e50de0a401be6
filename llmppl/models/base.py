"""The batched language-model interface every engine talks to.

A language model defines ``p(v | x, y_<t)`` over a vocabulary of size ``V``.
Third-party models subclass :class:`LanguageModel`, call
``super().__init__(vocab_size=V, eos_token_id=E)`` and implement
:meth:`LanguageModel.next_logprobs`; nothing else is required.  Engines never call
``next_logprobs`` directly: they work through an :class:`LMState`, an incremental
batched decoding state (rows = particles or chains).  The base class provides a
correct, uncached state; fast backends (``HFLM``) return one with a KV cache.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .block import Block, BlockSpec, sample_tokenwise

#: tolerance on ``logsumexp(row)`` for a row of next-token log-probabilities
NORMALISATION_TOLERANCE = 1e-3


class LanguageModelError(ValueError):
    """An LM returned something that is not a batch of next-token distributions."""


class LanguageModel:
    """Base class of every LM: ``next_logprobs(sequences) -> (B, V)`` log-probabilities.

    ``sequences`` are full token-id lists (prompt tokens included).  Subclasses may
    also set ``tokenizer`` (an object with ``encode``/``decode``), ``bos_token_id``
    and ``max_context`` (the longest sequence the model accepts).

    ``eos_token_id`` is one id or a sequence of ids: any of them ends a sequence.
    ``lm.eos_token_ids`` is the tuple of all of them, ``lm.eos_token_id`` the first.
    """

    tokenizer: Any = None
    #: the SMC step (``pp.steps.Tokens(native_block)``) that decodes at this backend's speed: 1
    #: where full-vocabulary log-probabilities make token steps cheap; a block-native backend
    #: (vLLM) says its KV block, at whose boundaries a forked row recomputes nothing it decoded
    native_block: int = 1

    def __init__(
        self,
        vocab_size: int,
        eos_token_id: int | Sequence[int],
        bos_token_id: int | None = None,
        max_context: int | None = None,
        name: str | None = None,
    ) -> None:
        if not isinstance(vocab_size, int) or vocab_size < 2:
            raise ValueError(f"vocab_size must be an int >= 2, got {vocab_size!r}")
        ids = [eos_token_id] if not isinstance(eos_token_id, (list, tuple, torch.Tensor)) else list(eos_token_id)
        if not ids:
            raise ValueError("eos_token_id must be an id or a non-empty sequence of ids, got []")
        clean: list[int] = []
        for e in ids:
            if isinstance(e, torch.Tensor):
                e = e.item()
            if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < vocab_size:
                raise ValueError(f"eos_token_id must be in [0, {vocab_size}), got {e!r}")
            if e not in clean:
                clean.append(int(e))
        self.vocab_size = vocab_size
        #: every id that ends a sequence (the first is ``eos_token_id``)
        self.eos_token_ids: tuple[int, ...] = tuple(clean)
        self.bos_token_id = bos_token_id
        self.max_context = max_context
        self.name = name or type(self).__name__

    @property
    def eos_token_id(self) -> int:
        """The first EOS id (the one a single-EOS caller uses)."""
        return self.eos_token_ids[0]

    def is_eos(self, tokens: torch.Tensor) -> torch.Tensor:
        """Bool tensor: which entries of ``tokens`` are one of ``eos_token_ids``."""
        eos = torch.tensor(self.eos_token_ids, dtype=tokens.dtype, device=tokens.device)
        return (tokens[..., None] == eos).any(-1)

    # ----------------------------------------------------------------- contract
    def next_logprobs(self, sequences: list[list[int]]) -> torch.Tensor:
        """Return ``log p(· | s)`` for each sequence ``s``, shape ``(len(sequences), V)``."""
        raise NotImplementedError(f"{type(self).__name__} must implement next_logprobs")

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def start(
        self,
        prompts: Sequence[int] | Sequence[Sequence[int]],
        n_per_prompt: int = 1,
        max_new_tokens: int | None = None,
        *,
        n: int | None = None,
    ) -> "LMState":
        """A decoding state of ``P * n_per_prompt`` rows: row ``r`` holds prompt ``r // n_per_prompt``
        (``state.n_rows`` rows in all).  ``n=`` is the old name of ``n_per_prompt`` (still accepted).

        ``prompts`` is one prompt (token ids) or a list of ``P`` prompts (ragged).
        The base class returns an :class:`UncachedState` over ``next_logprobs``.
        """
        n_per_prompt = per_prompt(n_per_prompt, n)
        return UncachedState(self, self.check_prompts(prompts, max_new_tokens), n_per_prompt)

    def memory_needed(self, footprint: Any) -> dict[str, int] | None:
        """Bytes a run of this :class:`~llmppl.models.memory.Footprint` holds on ``self.device``
        (``{"kv_cache", "logits", "total"}``), which the engines check before starting; ``None``
        (the default): the backend sizes its own memory, nothing is checked."""
        return None

    def check_prompts(
        self, prompts: Sequence[int] | Sequence[Sequence[int]], max_new_tokens: int | None = None
    ) -> list[list[int]]:
        """One prompt or a list of prompts, validated; returns a list of ``P`` id lists.

        Errors of a list name the prompt index (``"prompt 2: ..."``).
        """
        extra = int(max_new_tokens or 0)
        if is_single_prompt(prompts):
            return [self.check_prompt(prompts, extra)]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("empty prompt list: pass one prompt (token ids) or a non-empty list of prompts")
        out = []
        for i, p in enumerate(prompts):
            try:
                out.append(self.check_prompt(p, extra))
            except (ValueError, TypeError) as exc:
                raise ValueError(f"prompt {i}: {exc}") from None
        return out

    def check_prompt(self, prompt_ids: Sequence[int], max_new_tokens: int = 0) -> list[int]:
        """Validate a prompt of token ids; returns it as a list."""
        if isinstance(prompt_ids, torch.Tensor):
            prompt_ids = prompt_ids.reshape(-1).tolist()
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise ValueError(
                "empty prompt and the LM has no BOS token: give at least one prompt token"
            )
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        if self.max_context is not None and len(ids) + max_new_tokens > self.max_context:
            raise ValueError(
                f"prompt of {len(ids)} tokens + max_new_tokens={max_new_tokens} exceeds the "
                f"model's context of {self.max_context} tokens"
            )
        return ids

    def encode_prompt(
        self,
        prompt: str | Sequence[int] | Sequence[dict],
        chat: bool = False,
    ) -> list[int]:
        """Token ids of a prompt given as text, token ids or a chat ``messages`` list.

        Text gets the special tokens the tokenizer adds by default (BOS for Llama-2 or
        Gemma tokenizers, nothing for GPT-2 style ones); chat messages follow the
        tokenizer's chat template (whose text already holds any BOS: none is added
        twice).  An empty prompt becomes ``[bos_token_id]`` when the LM has a BOS token.
        """
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.name} has no tokenizer: pass the prompt as token ids")
            if chat:
                prompt = [{"role": "user", "content": prompt}]
            else:
                ids = [int(t) for t in self.tokenizer.encode(prompt)] if prompt else []
                if not ids and self.bos_token_id is not None:
                    ids = [self.bos_token_id]
                return ids
        if prompt and isinstance(prompt[0], dict):
            if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
                raise ValueError(f"{self.name} has no chat template: pass a text prompt")
            text = self.tokenizer.apply_chat_template(
                list(prompt), add_generation_prompt=True, tokenize=False
            )
            # the template's text carries its own BOS: encode without adding one
            ids = [int(t) for t in self.tokenizer.encode(text, add_special_tokens=False)]
            bos = self.bos_token_id
            while bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
                ids = ids[1:]
            return ids
        ids = [int(t) for t in prompt]
        if not ids and self.bos_token_id is not None:
            ids = [self.bos_token_id]
        return ids

    def decode(self, token_ids: Sequence[int]) -> str | None:
        """Text of ``token_ids`` (None when the LM has no tokenizer)."""
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def checked_next_logprobs(
        self, sequences: list[list[int]], step: int | None = None
    ) -> torch.Tensor:
        """``next_logprobs`` with its output validated: shape, finiteness, normalisation."""
        out = self.next_logprobs(sequences)
        return validate_logprobs(out, len(sequences), self.vocab_size, self.name, step)


def is_single_prompt(prompts: Any) -> bool:
    """True when ``prompts`` is one prompt of token ids (not a list of prompts)."""
    if isinstance(prompts, torch.Tensor):
        return prompts.dim() <= 1
    if isinstance(prompts, (str, bytes)):
        raise TypeError("prompts must be token ids here: encode text with lm.encode_prompt first")
    try:
        first = prompts[0]
    except (IndexError, KeyError):
        return False
    except TypeError:
        raise TypeError(f"prompts must be a sequence of token ids or of prompts, got {type(prompts)}") from None
    if isinstance(first, torch.Tensor):
        return first.dim() == 0
    return isinstance(first, int) or hasattr(first, "__index__")


def validate_logprobs(
    out: Any, n_rows: int, vocab_size: int, name: str = "LM", step: int | None = None
) -> torch.Tensor:
    """Check that ``out`` is ``(n_rows, V)`` log-probabilities: no NaN, rows sum to 1."""
    where = f" at step {step}" if step is not None else ""
    if not isinstance(out, torch.Tensor):
        raise LanguageModelError(f"{name}.next_logprobs must return a torch.Tensor, got {type(out)}")
    if out.shape != (n_rows, vocab_size):
        raise LanguageModelError(
            f"{name}.next_logprobs returned shape {tuple(out.shape)}{where}; "
            f"expected ({n_rows}, {vocab_size})"
        )
    bad = torch.isnan(out).any(dim=1) | torch.isposinf(out).any(dim=1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise LanguageModelError(f"{name} produced NaN/+inf log-probabilities in row {row}{where}")
    lse = torch.logsumexp(out.double(), dim=1)
    off = (lse.abs() > NORMALISATION_TOLERANCE).nonzero()
    if off.numel():
        row = int(off[0, 0])
        raise LanguageModelError(
            f"{name}.next_logprobs row {row}{where} is not normalised: "
            f"logsumexp = {float(lse[row]):.4g} (expected 0; return log_softmax of the logits)"
        )
    return out


def per_prompt(n_per_prompt: int, n: int | None = None) -> int:
    """``start(prompts, n_per_prompt, ..., n=None)``: ``n=`` is the old keyword for ``n_per_prompt``."""
    if n is None:
        return n_per_prompt
    if n_per_prompt not in (1, n):
        raise ValueError(f"start() got n_per_prompt={n_per_prompt} and its old name n={n}: pass one")
    return n


def as_index(indices: Sequence[int] | torch.Tensor, n: int) -> torch.Tensor:
    """A 1-D int64 CPU tensor of row indices, each in ``[0, n)``."""
    idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1).cpu()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise IndexError(f"row indices must lie in [0, {n}), got {idx.tolist()[:8]}")
    return idx


class LMState:
    """Incremental batched decoding state over ``R = P * n`` rows and ``P`` prompts.

    Row ``r`` belongs to prompt ``group[r]`` (``r // n`` at the start; ``reorder``
    permutes ``group`` with the rows).  ``tokens[r]`` is row r's completion so far
    (prompt excluded).  ``logprobs(rows)`` gives ``log p(· | prompt, tokens[r])`` for
    those rows; ``extend`` appends tokens and returns their log-probabilities;
    ``reorder(idx)`` makes row j a copy of row ``idx[j]`` (resampling); ``finish(rows)``
    says those rows will never be extended again.

    The device fast path (what engines call every token step): ``last_logprobs()``
    ``(R, V)`` on ``lm.device``; ``step(tokens, active)``; ``reorder`` with a device
    index; ``finish`` with a device bool mask.  This base class implements it over the
    host API, so any subclass that implements the host API gets it for free.
    """

    def __init__(self, lm: LanguageModel, prompts: list[list[int]] | list[int], n: int) -> None:
        if n < 1:
            raise ValueError(f"a decoding state needs at least one row, got n={n}")
        if prompts and not isinstance(prompts[0], (list, tuple)):
            prompts = [prompts]  # one prompt given as a flat list
        if not prompts:
            raise ValueError("a decoding state needs at least one prompt")
        self.lm = lm
        self.prompts: list[list[int]] = [list(p) for p in prompts]
        self.group = torch.arange(len(self.prompts)).repeat_interleave(n)
        self.tokens: list[list[int]] = [[] for _ in range(len(self.prompts) * n)]
        self.finished = torch.zeros(len(self.prompts) * n, dtype=torch.bool)
        self.forward_passes = 0
        self.tokens_decoded = 0

    @property
    def n_rows(self) -> int:
        """Rows of the state: prompts × rows per prompt (``len(tokens)``)."""
        return len(self.tokens)

    @property
    def n(self) -> int:
        """Deprecated alias of :attr:`n_rows` (the number of rows, not of rows per prompt)."""
        return self.n_rows

    @property
    def prompt(self) -> list[int]:
        """The prompt when the state holds one prompt (else ``ValueError``: use ``prompt_of``)."""
        if len(self.prompts) != 1:
            raise ValueError(f"this state holds {len(self.prompts)} prompts: use state.prompt_of(row)")
        return self.prompts[0]

    def prompt_of(self, row: int) -> list[int]:
        """The prompt of row ``row``."""
        return self.prompts[int(self.group[row])]

    def prompt_lengths(self) -> torch.Tensor:
        """``(R,)`` CPU long: the prompt length of each row."""
        lens = torch.tensor([len(p) for p in self.prompts], dtype=torch.long)
        return lens[self.group]

    def _rows(self, rows: Sequence[int] | torch.Tensor | None) -> torch.Tensor:
        if rows is None:
            return torch.arange(self.n)
        if isinstance(rows, torch.Tensor) and rows.dtype == torch.bool:
            if rows.numel() != self.n:
                raise ValueError(f"a row mask needs {self.n} entries, got {rows.numel()}")
            return rows.reshape(-1).cpu().nonzero().flatten()
        return as_index(rows, self.n)

    def sequences(self, rows: Sequence[int] | torch.Tensor | None = None) -> list[list[int]]:
        """Full token sequences (prompt + completion) of the given rows."""
        return [self.prompt_of(i) + self.tokens[i] for i in self._rows(rows).tolist()]

    # Implemented by subclasses ------------------------------------------------
    def logprobs(self, rows: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """``(len(rows), V)`` next-token log-probabilities of the rows' current prefixes."""
        raise NotImplementedError

    def extend(
        self,
        tokens: Sequence[Sequence[int]] | torch.Tensor,
        rows: Sequence[int] | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Append ``tokens[k]`` (a block, possibly of length 1) to row ``rows[k]``.

        Returns ``(len(rows), L)`` float64 log-probabilities of the appended tokens
        under the LM (``-inf``-padded past each row's block), where ``L`` is the
        longest block.  Rows not listed are untouched.
        """
        raise NotImplementedError

    def reorder(self, indices: Sequence[int] | torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Row j becomes a copy of row ``indices[j]``; the number of rows may change.

        ``indices`` may be a device ``LongTensor``.  ``rows`` (optional, same row count): the
        only rows that may change — ``indices[j] == j`` elsewhere — so a backend may copy just
        those (SMC passes the rows of the prompts that resample); ignoring it is correct.
        """
        raise NotImplementedError

    def copy(self) -> "LMState":
        """An independent state with the same rows (a fork)."""
        raise NotImplementedError

    def finish(self, rows: Sequence[int] | torch.Tensor) -> None:
        """Mark rows (indices, or a bool mask of ``R`` entries, host or device) as never to be
        extended again (their cache may be masked out)."""
        self.finished[self._rows(rows)] = True

    def truncate(self, rows: Sequence[int] | torch.Tensor, lengths: Sequence[int]) -> None:
        """Cut row ``rows[k]``'s completion back to ``lengths[k]`` tokens."""
        raise NotImplementedError

    # Block decoding ------------------------------------------------------------
    #: the state gives full-vocabulary ``(rows, V)`` log-probabilities (``last_logprobs``,
    #: ``logprobs``); a backend that decodes natively only (vLLM) sets this to False
    full_vocabulary: bool = True

    def sample_block(self, rows: torch.Tensor | None, spec: "BlockSpec",
                     generator: torch.Generator | None) -> "Block":
        """Extend ``rows`` (``None``: every row, in order) by up to ``spec.budget`` tokens drawn from ``q ∝ p^{1/τ}·1[allowed]``;
        a :class:`~llmppl.models.block.Block` with ``log p`` and ``log q`` of every drawn token
        (see :mod:`llmppl.models.block`).  The default is the token loop over the device fast path."""
        return sample_tokenwise(self, rows, spec, generator)

    # Device fast path (generic: over the host API) ----------------------------
    def last_logprobs(self) -> torch.Tensor:
        """``(R, V)`` float tensor on ``lm.device``: ``log p(· | row)`` for every row.

        Finished rows hold finite filler values (uniform), which callers ignore.
        """
        V = self.lm.vocab_size
        out = torch.full((self.n, V), -math.log(V), dtype=torch.float32)
        live = (~self.finished).nonzero().flatten()
        if len(live):
            out[live] = self.logprobs(live).float().cpu()
        return out.to(self.lm.device)

    def step(self, tokens: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """Append ``tokens[r]`` to every ``active`` row; ``(R,)`` float32 ``log p(tokens[r] | row r)``.

        ``tokens`` ``(R,)`` long and ``active`` ``(R,)`` bool (default: unfinished rows),
        on ``lm.device``.  Entries of inactive rows are 0.
        """
        tok = torch.as_tensor(tokens).reshape(-1).cpu()
        act = (~self.finished if active is None else torch.as_tensor(active)).reshape(-1).cpu().bool()
        if tok.numel() != self.n or act.numel() != self.n:
            raise ValueError(f"step needs {self.n} tokens and active flags, got {tok.numel()} and {act.numel()}")
        out = torch.zeros(self.n, dtype=torch.float32)
        rows = act.nonzero().flatten()
        if len(rows):
            out[rows] = self.extend(tok[rows], rows)[:, 0].float()
        return out.to(self.lm.device)


def _normalise_blocks(
    tokens: Sequence[Sequence[int]] | torch.Tensor, n_rows: int, vocab_size: int
) -> list[list[int]]:
    if isinstance(tokens, torch.Tensor):
        t = tokens.detach().cpu()
        blocks = [[int(v)] for v in t.tolist()] if t.dim() == 1 else [list(map(int, r)) for r in t.tolist()]
    else:
        blocks = [[int(tok)] if isinstance(tok, (int,)) or (hasattr(tok, "item") and not hasattr(tok, "__len__"))
                  else [int(v) for v in tok] for tok in tokens]
    if len(blocks) != n_rows:
        raise ValueError(f"extend got {len(blocks)} blocks for {n_rows} rows")
    for b in blocks:
        if any(not 0 <= v < vocab_size for v in b):
            raise ValueError(f"token id out of range [0, {vocab_size}) in block {b[:8]}")
    return blocks


class HostRowsState(LMState):
    """A state whose rows live on the host (``tokens``, ``finished``, ``group``): ``reorder``,
    ``copy`` and ``truncate`` act on those lists.  A subclass with more per-row host data
    overrides ``_take(source, idx)`` (its row j becomes ``source``'s row ``idx[j]``) and ``_cut(i)``
    (row i was cut)."""

    def _take(self, source: "HostRowsState", idx: list[int]) -> None:
        """Extra per-row data follows ``reorder`` / ``copy``: row j becomes ``source``'s row ``idx[j]``."""

    def _cut(self, i: int) -> None:
        """Extra per-row data of row ``i`` is stale after ``truncate``."""

    def reorder(self, indices, rows=None) -> None:
        idx = as_index(indices, self.n).tolist()
        self.tokens = [list(self.tokens[i]) for i in idx]
        self.finished = self.finished[idx].clone()
        self.group = self.group[idx].clone()
        self._take(self, idx)

    def copy(self) -> "HostRowsState":
        """An independent state with the same rows (and fresh work counters)."""
        new = type(self)(self.lm, self.prompts, 1)
        new.tokens = [list(t) for t in self.tokens]
        new.finished, new.group = self.finished.clone(), self.group.clone()
        new._take(self, list(range(self.n)))
        return new

    def truncate(self, rows, lengths) -> None:
        idx, lengths = self._rows(rows).tolist(), [int(x) for x in lengths]
        if len(lengths) != len(idx):
            raise ValueError(f"truncate got {len(lengths)} lengths for {len(idx)} rows")
        for i, length in zip(idx, lengths):
            if not 0 <= length <= len(self.tokens[i]):
                raise ValueError(f"cannot truncate row {i} of length {len(self.tokens[i])} to {length}")
            if length < len(self.tokens[i]):
                self.tokens[i] = self.tokens[i][:length]
                self.finished[i] = False
                self._cut(i)


class UncachedState(HostRowsState):
    """Correct reference state: recomputes ``next_logprobs`` on full sequences.

    Log-probabilities of the current prefixes are memoised per row, so each decode
    step costs one batched ``next_logprobs`` call over the rows being extended.
    """

    def __init__(self, lm: LanguageModel, prompts: list[list[int]] | list[int], n: int) -> None:
        super().__init__(lm, prompts, n)
        self._cache: list[torch.Tensor | None] = [None] * self.n

    def logprobs(self, rows=None) -> torch.Tensor:
        idx = self._rows(rows).tolist()
        missing = [i for i in idx if self._cache[i] is None]
        if missing:
            unique = sorted(set(missing))
            out = self.lm.checked_next_logprobs(self.sequences(unique), step=None)
            self.forward_passes += 1
            for k, i in enumerate(unique):
                self._cache[i] = out[k]
        return torch.stack([self._cache[i] for i in idx]) if idx else torch.empty(
            0, self.lm.vocab_size
        )

    def extend(self, tokens, rows=None) -> torch.Tensor:
        idx = self._rows(rows).tolist()
        blocks = _normalise_blocks(tokens, len(idx), self.lm.vocab_size)
        if self.finished[idx].any() if idx else False:
            raise ValueError("cannot extend a row that was finished")
        width = max((len(b) for b in blocks), default=0)
        out = torch.full((len(idx), width), -math.inf, dtype=torch.float64)
        # advance all rows one position at a time so each position is one batched call
        for j in range(width):
            live = [k for k, b in enumerate(blocks) if j < len(b)]
            lp = self.logprobs([idx[k] for k in live])
            for pos, k in enumerate(live):
                tok = blocks[k][j]
                out[k, j] = float(lp[pos, tok])
                i = idx[k]
                self.tokens[i] = self.tokens[i] + [tok]
                self._cache[i] = None
                self.tokens_decoded += 1
        return out

    def _take(self, source: HostRowsState, idx: list[int]) -> None:
        self._cache = [source._cache[i] for i in idx]

    def _cut(self, i: int) -> None:
        self._cache[i] = None


class KVCachedState(LMState):
    """Shared parts of KV-cached states (``HFState``, ``StaticHFState``).

    The device tensors of a subclass are the source of truth; the host view
    (``tokens``, ``finished``, ``group``) follows them.  The no-sync methods (``step``,
    ``reorder`` / ``finish`` with device tensors) only append to a log of device ops,
    which the host view replays (one batch of device→host copies) the next time it is
    read.  A subclass keeps each row's next-token log-probabilities in ``last`` and
    provides ``_refresh(rows)`` (feed tokens that ``truncate`` left out of the cache)
    and ``_feed(rows, blocks)`` (feed blocks; float64 log-probs of their tokens).
    """

    last: torch.Tensor

    # ------------------------------------------------------------- host view
    @property
    def tokens(self) -> list[list[int]]:
        self._sync()
        return self._tokens

    @tokens.setter
    def tokens(self, value: list[list[int]]) -> None:
        self._tokens = value
        self._n = len(value)

    @property
    def finished(self) -> torch.Tensor:
        self._sync()
        return self._finished

    @finished.setter
    def finished(self, value: torch.Tensor) -> None:
        self._finished = value

    @property
    def group(self) -> torch.Tensor:
        self._sync()
        return self._group

    @group.setter
    def group(self, value: torch.Tensor) -> None:
        self._group = value

    @property
    def tokens_decoded(self) -> int:
        self._sync()
        return self._ntd

    @tokens_decoded.setter
    def tokens_decoded(self, value: int) -> None:
        self._ntd = int(value)

    @property
    def n_rows(self) -> int:
        return self._n

    def _log(self, kind: str, *tensors: torch.Tensor) -> None:
        """Record a device op for the host view (no sync)."""
        self.__dict__.setdefault("_ops", []).append((kind, tensors))

    def _sync(self) -> None:
        """Replay the logged device ops on the host view."""
        ops = self.__dict__.get("_ops")
        if not ops:
            return
        self._ops = []
        args = [[t.cpu() for t in ts] for _, ts in ops]
        tokens, finished, group = self._tokens, self._finished, self._group
        pending: list[list[torch.Tensor]] = []     # consecutive steps, appended at once

        def append_steps() -> None:
            if not pending:
                return
            tok = torch.stack([a[0] for a in pending], 1).tolist()       # (R, S)
            act = torch.stack([a[1] for a in pending], 1)
            counts = act.sum(1).tolist()
            for r, (row, on, n) in enumerate(zip(tok, act.tolist(), counts)):
                if n:
                    tokens[r] = tokens[r] + (row if n == len(row) else [t for t, fed in zip(row, on) if fed])
            self._ntd += sum(counts)
            pending.clear()

        for (kind, _), a in zip(ops, args):
            if kind == "step":
                pending.append(a)
            elif kind == "finish":      # (steps append by their own active flags: no flush needed)
                finished = finished | a[0].bool()
            elif kind == "reorder":
                append_steps()
                idx = a[0]
                tokens = [list(tokens[i]) for i in idx.tolist()]
                finished, group = finished[idx], group[idx]
        append_steps()
        self._tokens, self._finished, self._group = tokens, finished, group

    # ------------------------------------------------------------- subclass hooks
    def _refresh(self, rows: list[int]) -> None:
        raise NotImplementedError

    def _feed(self, rows: list[int], blocks: list[list[int]]) -> torch.Tensor:
        raise NotImplementedError

    def logprobs(self, rows=None) -> torch.Tensor:
        idx = self._rows(rows)
        if bool(self.finished[idx].any()):
            raise ValueError("log-probabilities of a finished row are not kept")
        self._refresh(idx.tolist())
        return self.last[idx.to(self.last.device)]

    def _extend_args(self, tokens, rows) -> tuple[list[int], list[list[int]]]:
        """The row indices and token blocks of an ``extend`` call, validated."""
        idx = self._rows(rows).tolist()
        blocks = _normalise_blocks(tokens, len(idx), self.lm.vocab_size)
        if idx and bool(self.finished[idx].any()):
            raise ValueError("cannot extend a row that was finished")
        if len(set(idx)) != len(idx):
            raise ValueError("extend got the same row twice")
        return idx, blocks

    def _feed_blocks(self, idx: list[int], blocks: list[list[int]]) -> torch.Tensor:
        """Feed the non-empty blocks; ``(len(idx), L)`` float64 log-probs, ``-inf``-padded."""
        width = max((len(b) for b in blocks), default=0)
        out = torch.full((len(idx), width), -math.inf, dtype=torch.float64)
        nonempty = [k for k, b in enumerate(blocks) if b]
        if nonempty:
            part = self._feed([idx[k] for k in nonempty], [blocks[k] for k in nonempty])
            out[nonempty, : part.shape[1]] = part
        return out

    def _device_rows(self, rows) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(mask, index)`` on the device for a no-sync ``finish`` / ``reorder`` argument.

        A tensor on ``lm.device`` takes the no-sync path (on a CPU model, any CPU tensor);
        returns ``(None, None)`` for a host argument (a list, or a tensor elsewhere).
        """
        if isinstance(rows, torch.Tensor) and rows.device == self.lm.device:
            if rows.dtype == torch.bool:
                return rows.reshape(-1), None
            return None, rows.reshape(-1).long()
        return None, None
