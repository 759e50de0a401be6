"""Grammar constraints as potentials: ``φ_L(y) = 1[text(y) ∈ L]`` for a regular expression, a
JSON Schema or a Lark context-free grammar, with exact next-token masks from llguidance.

**The maths.**  ``L`` is a set of strings and ``text(y)`` the bytes a token sequence spells.
Write ``Pre(L) = {u : uw ∈ L for some w}`` for the viable prefixes.  The indicator factorises
over tokens: for a completion ``y = y_1..y_T`` that ended with EOS,

    1[text(y) ∈ L] = Π_{t ≤ T} 1[text(y_≤t) ∈ Pre(L)] · 1[text(y) ∈ L],

because every prefix of a string of ``L`` is viable.  So the token-level increment
(:meth:`GrammarConstraint.log_next`) is

    log φ^next(y_<t, v) = 0   if v is not EOS and text(y_<t v) ∈ Pre(L),
                          0   if v is EOS and text(y_<t) ∈ L,
                          −∞  otherwise,

the *exact* mask: a token that leaves ``Pre(L)`` leads to a dead end and is masked, EOS is
allowed exactly where the text is complete.  (The model's byte-level vocabulary holds every
single byte, so every viable prefix can be extended token by token: no other dead end exists
except running out of tokens, which the weights handle.)  A completion cut at
``max_new_tokens`` under ``truncation="keep"`` is taken as it stands: ``log_complete`` adds
``log 1[text(y) ∈ L]`` on cut rows (0 on ended ones, whose EOS already checked it), so
``π ∝ p^α · 1[y ∈ L]`` never returns a cut string outside ``L``; when no string of ``L`` fits
in the budget every particle has weight zero and engines raise ``AllParticlesDied`` with the
target (and so this constraint) named.

Every token path that spells a string of ``L`` counts, not only the canonical tokenization:
``L`` is a set of strings and ``p(text ∈ ·)`` sums over all its tokenizations.  llguidance
normally lets only the canonical tokens through where the grammar forces bytes; the grammars
here are compiled with ``%llguidance {"no_forcing": true}`` so the mask is the full set above.

**With SMC.**  The constraint is a *mask* (``allowed_tokens``, the protocol of
``Constraint(mask=...)``): every engine's default proposal on ``Power(α) * Regex(...)`` is
``q ∝ p^{a_t} · mask``, drawn by the backend inside its own blocks (HF, llama.cpp, and vLLM's
logits processor), whose ``log q`` carries the masked normaliser, so the incremental weight is
``a_t log p − log q = log Σ_{v allowed} p(v)^{a_t}`` and SMC targets ``p^α · 1[y ∈ L]`` exactly
(the locally optimal proposal for a constraint; ``LocallyOptimal`` on the token path is the same
law, through ``log_next``).  Greedy constrained decoding
(vLLM's structured outputs, outlines, xgrammar) draws from the same ``q`` *without* the weights:
its law ``Π_t p(y_t)·mask / Σ_{v allowed} p(v)`` is the locally renormalised one, not
``p(y | y ∈ L)`` — :class:`llmppl.baselines.Constrained` samples it for comparison.

**State.**  A potential holds configuration only (its grammar).  Matcher states live in a
bounded memo keyed by content — the LM and the prefix token tuple — shared by every run: the
matcher after ``y_<t`` is a pure function of ``y_<t``, a row's prefix extends its parent's by
one token (one ``deep_copy`` + ``consume_token`` + mask per new prefix), and a row copied by
resampling has the same prefix, so resampling is followed for free and two runs never meet.
"""

from __future__ import annotations

import json
import math
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .base import Potential, Prefixes

#: the directive every grammar is compiled with: a mask over *all* tokenizations (see module doc)
NO_FORCING = '%llguidance {"no_forcing": true}\n'
#: default number of prefixes whose matcher state is kept per (LM, grammar)
CACHE_SIZE = 4096


def _llguidance():
    try:
        import llguidance
    except ImportError as exc:   # pragma: no cover - exercised without the extra
        raise ImportError("grammar constraints (pp.constraints) need llguidance: "
                          "pip install 'llmppl[constraints]'") from exc
    return llguidance


def _one_line(text: str, kind: str = "") -> str:
    """An llguidance error message on one line: its source excerpts and carets dropped, a regex
    error located by column in the pattern, a grammar error by line and column in the user's
    text (the compiled grammar has one directive line more, :data:`NO_FORCING`)."""
    raw = [ln.rstrip() for ln in str(text).strip().splitlines()]
    lines = [ln.strip() for ln in raw if ln.strip()]
    if not lines:
        return "unknown error"
    head = lines[0]
    where = re.match(r"at (\d+)\((\d+)\): ", head)
    if where:
        head = head[where.end():]
    detail = next((ln[len("error:"):].strip() for ln in lines[1:] if ln.lower().startswith("error:")), None)
    if "regex parse error" in head:
        # llguidance quotes the pattern, then a caret line under the offending part
        i = next(k for k, ln in enumerate(raw) if "regex parse error" in ln)
        pattern, carets = (raw[i + 1], raw[i + 2]) if len(raw) > i + 2 else ("", "")
        indent = len(pattern) - len(pattern.lstrip())
        col = carets.find("^") - indent + 1 if "^" in carets else None
        return f"{detail or head}" + (f" at column {col}" if col and col > 0 else "")
    if where and kind == "grammar":
        head = f"line {int(where.group(1)) - 1} column {where.group(2)}: {head}"
    return f"{head} ({detail})" if detail and detail not in head else head


class GrammarConstraint(Potential):
    """``1[text(y) ∈ L]`` for the language ``L`` of an llguidance grammar (base class of
    :class:`Regex`, :class:`JSONSchema`, :class:`Grammar` and :class:`Choice`).

    ``lark`` is the grammar in llguidance's Lark dialect; ``cache_size`` bounds the memo of
    matcher states per LM (see the module docstring).  ``log_next`` is the exact mask of
    allowed next tokens, ``log_complete`` checks cut completions (``truncation="keep"``).
    """

    factorises = True
    #: ``log_complete`` can be non-zero (a cut completion outside ``L``) although the
    #: potential acts through its token mask: the target must call it (``Target.has_complete``)
    has_complete = True
    #: what kind of grammar, for messages
    kind = "grammar"

    def __init__(self, lark: str, *, name: str | None = None, cache_size: int = CACHE_SIZE) -> None:
        if not isinstance(cache_size, int) or isinstance(cache_size, bool) or cache_size < 16:
            raise ValueError(f"cache_size must be an int >= 16, got {cache_size!r}")
        llg = _llguidance()
        grammar = llg.LLMatcher.grammar_from_lark(NO_FORCING + lark)
        error = llg.LLMatcher.validate_grammar(grammar)
        if error:
            raise ValueError(f"invalid {self.kind} {self._shown()}: {_one_line(error, self.kind)}")
        self.grammar = grammar
        self.cache_size = cache_size
        self.name = name

    # ------------------------------------------------------------------ config
    def _shown(self) -> str:
        return ""

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.grammar == self.grammar   # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.grammar))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})" if self.name else f"{type(self).__name__}({self._shown()})"

    # ------------------------------------------------------------------ masks
    def matchers(self, lm: Any) -> "MatcherCache":
        """The memo of matcher states of this grammar on ``lm``'s tokenizer (shared, content-keyed)."""
        return matcher_cache(lm, self.grammar, self.cache_size, repr(self))

    def allowed(self, batch: Prefixes) -> torch.Tensor:
        """``(B, V)`` bool on the device of ``batch.base_logprobs`` (the LM's device without them):
        the tokens ``v`` with ``text(y_<t v) ∈ Pre(L)``, and EOS where ``text(y_<t) ∈ L``."""
        lp = batch.base_logprobs
        device = (lp.device if lp is not None and lp.device.type != "meta"      # native blocks: shape only
                  else torch.device(getattr(batch.lm, "device", "cpu") or "cpu"))
        return self.matchers(batch.lm).allowed(batch.tokens, device)

    def allowed_tokens(self, batch: Prefixes, vocab_size: int) -> torch.Tensor:
        """The mask protocol (``Constraint.allowed_tokens``): ``log φ^next = log 1[allowed]``, so a
        backend applies it inside its own blocks (``q ∝ p^{1/τ} · mask``, the masked normaliser in
        ``log q``) and SMC, MH and the baselines decode natively.  ``(B, vocab_size)`` bool."""
        out = self.allowed(batch)
        V = out.shape[-1]
        if vocab_size > V:
            out = torch.cat([out, out.new_zeros((out.shape[0], vocab_size - V))], dim=-1)
        return out[:, :vocab_size]

    def static_allowed(self, vocab_size: int) -> None:
        """None: the mask depends on the prefix."""
        return None

    def log_next(self, batch: Prefixes) -> torch.Tensor:
        allowed = self.allowed(batch)
        lp = batch.base_logprobs
        dtype = lp.dtype if lp is not None else torch.float32
        lp = lp if lp is not None and lp.device.type != "meta" else None
        zero = torch.zeros((), dtype=dtype, device=allowed.device)
        out = torch.where(allowed, zero, torch.full_like(zero, -math.inf))
        if lp is not None and lp.shape[-1] != out.shape[-1]:
            raise ValueError(f"{self!r}: the LM gives {lp.shape[-1]} log-probabilities but its "
                             f"tokenizer mask has {out.shape[-1]} entries")
        return out

    def log_complete(self, batch: Prefixes) -> torch.Tensor:
        """``log 1[text(y) ∈ L]`` on cut rows (``batch.truncated``); 0 on rows that ended with EOS
        (their EOS was only allowed where the text is complete, so the mask already counted it)."""
        out = torch.zeros(len(batch), dtype=torch.float64)
        cut = [i for i, c in enumerate(batch.truncated or []) if c]
        if cut:
            ok = self.matchers(batch.lm).accepting([batch.tokens[i] for i in cut])
            out[cut] = torch.tensor([0.0 if k else -math.inf for k in ok], dtype=torch.float64)
        return out

    def accepts(self, lm: Any, tokens: Sequence[int]) -> bool:
        """``text(tokens) ∈ L`` (tokens of a completion, without EOS)."""
        return self.matchers(lm).accepting([list(tokens)])[0]

    def matches(self, lm: Any, text: str) -> bool:
        """``text ∈ L``, checked on ``lm``'s tokenization of ``text`` (any tokenization of the
        same bytes gives the same answer)."""
        return self.accepts(lm, lm.tokenizer.encode(text, add_special_tokens=False))


def _lark_string(s: str) -> str:
    """A Lark string literal (JSON escapes, as llguidance's own ``choice`` format writes them)."""
    return json.dumps(s, ensure_ascii=False)


class Regex(GrammarConstraint):
    """``1[text(y) ∈ L(pattern)]``: the whole completion matches ``pattern`` (Rust ``regex``
    syntax, as in llguidance; anchored at both ends, ``\\d`` is ``[0-9]``).

    >>> pp.Power(4) * pp.constraints.Regex(r"(yes|no)")        # doctest: +SKIP
    """

    kind = "regex"

    def __init__(self, pattern: str, *, name: str | None = None, cache_size: int = CACHE_SIZE) -> None:
        if not isinstance(pattern, str):
            raise ValueError(f"Regex needs a pattern string, got {type(pattern).__name__}")
        self.pattern = pattern
        llg = _llguidance()
        super().__init__(f"start: /{llg.regex_to_lark(pattern)}/", name=name, cache_size=cache_size)

    def _shown(self) -> str:
        return repr(self.pattern) if len(self.pattern) <= 60 else repr(self.pattern[:57] + "...")


class Choice(GrammarConstraint):
    """``1[text(y) ∈ {s_1, …, s_k}]``: the completion is exactly one of ``options``."""

    kind = "choice"

    def __init__(self, options: Sequence[str], *, name: str | None = None, cache_size: int = CACHE_SIZE) -> None:
        if isinstance(options, str) or not options or not all(isinstance(o, str) for o in options):
            raise ValueError(f"Choice needs a non-empty list of strings, got {options!r:.120}")
        self.options = list(options)
        super().__init__("start: " + " | ".join(_lark_string(o) for o in self.options), name=name,
                         cache_size=cache_size)

    def _shown(self) -> str:
        shown = repr(self.options)
        return shown if len(shown) <= 60 else shown[:57] + "...]"


class JSONSchema(GrammarConstraint):
    """``1[text(y) is JSON valid under schema]`` (llguidance's JSON Schema support; unsupported
    keywords are refused unless ``options={"lenient": True}``).

    ``schema``: a dict, or its JSON text.  ``options``: llguidance's JSON compile options
    (``whitespace_flexible`` — default true: any JSON whitespace between tokens, as vLLM's
    structured outputs allow — ``item_separator``, ``key_separator``, ``whitespace_pattern``,
    ``coerce_one_of``, ``lenient``).  The schema itself is checked against its metaschema
    when ``jsonschema`` is installed.
    """

    kind = "JSON schema"

    def __init__(self, schema: Mapping[str, Any] | str, *, options: Mapping[str, Any] | None = None,
                 name: str | None = None, cache_size: int = CACHE_SIZE) -> None:
        if isinstance(schema, (str, bytes)):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise ValueError(f"invalid JSON schema: not JSON ({exc.msg} at line {exc.lineno} "
                                 f"column {exc.colno})") from None
        if not isinstance(schema, Mapping):
            raise ValueError(f"a JSON schema is a JSON object, got {type(schema).__name__}")
        self.schema = dict(schema)
        _check_metaschema(self.schema)
        compiled = dict(self.schema)
        if options:
            compiled["x-guidance"] = {**compiled.get("x-guidance", {}), **dict(options)}
        self.options = dict(options or {})
        title = self.schema.get("title")
        super().__init__("start: %json " + json.dumps(compiled), name=name or (str(title) if title else None),
                         cache_size=cache_size)

    def _shown(self) -> str:
        text = json.dumps(self.schema, separators=(",", ":"))
        return text if len(text) <= 60 else text[:57] + "..."

    def validate(self, text: str) -> Any:
        """The parsed JSON of ``text``, checked against the schema with ``jsonschema``
        (raises ``json.JSONDecodeError`` / ``jsonschema.ValidationError``)."""
        import jsonschema

        value = json.loads(text)
        jsonschema.validate(value, self.schema)
        return value


def _check_metaschema(schema: dict) -> None:
    try:
        import jsonschema
    except ImportError:    # llguidance still refuses what it cannot compile
        return
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise ValueError(f"invalid JSON schema at {where}: {exc.message}") from None


class Grammar(GrammarConstraint):
    """``1[text(y) ∈ L(G)]`` for a context-free grammar ``G`` in llguidance's Lark syntax
    (``start:`` is the start rule; ``%json {...}`` embeds a JSON Schema; ``syntax="gbnf"``
    reads llama.cpp's GBNF instead)."""

    kind = "grammar"

    def __init__(self, text: str, *, syntax: str = "lark", name: str | None = None,
                 cache_size: int = CACHE_SIZE) -> None:
        if not isinstance(text, str):
            raise ValueError(f"Grammar needs the grammar text, got {type(text).__name__}")
        if syntax not in ("lark", "gbnf"):
            raise ValueError(f"syntax must be 'lark' or 'gbnf', got {syntax!r}")
        self.text, self.syntax = text, syntax
        lark = text
        if syntax == "gbnf":
            from llguidance.gbnf_to_lark import any_to_lark

            try:
                lark = any_to_lark(text)
            except Exception as exc:
                raise ValueError(f"invalid GBNF grammar: {_one_line(str(exc))}") from None
        super().__init__(lark, name=name, cache_size=cache_size)

    def _shown(self) -> str:
        first = next((ln.strip() for ln in self.text.splitlines() if ln.strip()), "")
        return repr(first if len(first) <= 50 else first[:47] + "...")


# --------------------------------------------------------------------------- exact enumeration

def exact(target: Any, prompt: Any, max_new_tokens: int, max_prefixes: int = 100_000, chunk: int = 32) -> Any:
    """The exact target over every completion a constrained target allows, by walking the tree of
    allowed tokens (``llmppl.exact.enumerate_target`` expands the same tree but refuses a real
    vocabulary, counting ``prefixes × V``; here only allowed tokens are kept, so a finite
    language on a 49k-token model is enumerable).  ``log γ(y) = Σ_t target.log_next(y_<t)[y_t]``
    (the mask included) ``+ target.log_complete(y)``, one batched ``lm.checked_next_logprobs`` per
    depth and chunk.  Returns an :class:`llmppl.exact.ExactDistribution`; refuses a tree of more
    than ``max_prefixes`` prefixes at one depth."""
    from ..exact import ExactDistribution, _merge_eos

    lm = target.lm
    ids = target.encode(prompt) if isinstance(prompt, str) else lm.check_prompt(prompt)
    eos = set(getattr(lm, "eos_token_ids", (lm.eos_token_id,)))
    frontier: list[tuple[int, ...]] = [()]
    front_lg = [0.0]
    done, done_lg, done_cut = [], [], []
    for depth in range(max_new_tokens):
        if not frontier:
            break
        if len(frontier) > max_prefixes:
            raise ValueError(f"the constrained tree has {len(frontier)} prefixes at depth {depth} "
                             f"(> max_prefixes={max_prefixes}): use a smaller language or horizon")
        new, new_lg = [], []
        last = depth == max_new_tokens - 1
        for i in range(0, len(frontier), chunk):
            part = frontier[i:i + chunk]
            lp = lm.checked_next_logprobs([ids + list(f) for f in part], step=depth)
            inc = target.log_next(target.batch(ids, [list(f) for f in part], lp)).double().cpu()
            for f, g, row in zip(part, front_lg[i:i + chunk], inc):
                for v in torch.isfinite(row).nonzero().flatten().tolist():
                    val = g + float(row[v])
                    if v in eos:
                        done.append(f)
                        done_lg.append(val)
                        done_cut.append(False)
                    elif last:
                        done.append(f + (v,))
                        done_lg.append(val)
                        done_cut.append(True)
                    else:
                        new.append(f + (v,))
                        new_lg.append(val)
        frontier, front_lg = new, new_lg
    if len(eos) > 1:
        done, done_lg, done_cut = _merge_eos(done, done_lg, done_cut)
    log_gamma = torch.tensor(done_lg, dtype=torch.float64)
    if target.has_complete and done:
        log_gamma = log_gamma + target.log_complete(
            target.batch(ids, [list(s) for s in done], None, [not c for c in done_cut], done_cut))
    keep = torch.isfinite(log_gamma)
    seqs = [s for s, k in zip(done, keep.tolist()) if k]
    return ExactDistribution(seqs, log_gamma[keep], max_new_tokens)


# --------------------------------------------------------------------------- tokenizers

_TOKENIZERS: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()
_TOKENIZER_LOCK = threading.Lock()


def lltokenizer(lm: Any) -> Any:
    """llguidance's ``LLTokenizer`` for ``lm`` (cached per LM): from a fast Hugging Face
    tokenizer (``HFLM``, ``VLLMLM``) or a llama.cpp vocabulary (``LlamaCppLM``), with ``lm``'s
    vocabulary size (padded model rows are never allowed) and all of its EOS ids."""
    with _TOKENIZER_LOCK:
        hit = _TOKENIZERS.get(lm)
    if hit is not None:
        return hit
    _llguidance()          # a clear error when llguidance is missing
    name = getattr(lm, "name", type(lm).__name__)
    tok = getattr(lm, "tokenizer", None)
    eos = [int(e) for e in getattr(lm, "eos_token_ids", None) or (lm.eos_token_id,)]
    V = int(lm.vocab_size)
    if tok is None:
        raise ValueError(f"grammar constraints need an LM with a tokenizer: {name} has none "
                         "(token ids only), so llguidance cannot tell which text a token spells")
    try:
        if getattr(lm, "_vocab", None) is not None and type(tok).__name__ == "GGUFTokenizer":
            import llguidance.llamacpp

            out = llguidance.llamacpp.lltokenizer_from_vocab(lm._vocab, n_vocab=V, eos_token=eos)
        else:
            import llguidance.hf

            if len(tok) > V:
                raise ValueError(f"its tokenizer has {len(tok)} tokens but the model only {V} output rows")
            out = llguidance.hf.from_tokenizer(tok, n_vocab=V, eos_token=eos)
    except Exception as exc:
        raise ValueError(f"llguidance cannot read the tokenizer of {name} ({type(tok).__name__}): "
                         f"{_one_line(str(exc))}; grammar constraints need a fast (Rust) Hugging Face "
                         "tokenizer or a llama.cpp vocabulary") from None
    with _TOKENIZER_LOCK:
        _TOKENIZERS[lm] = out
    return out


# --------------------------------------------------------------------------- matcher memo

@dataclass
class _Node:
    """The matcher after a prefix (None once the prefix left ``Pre(L)``), its packed mask of
    allowed next tokens (``(W,)`` int32, 32 tokens a word) and whether its text is in ``L``."""

    matcher: Any
    bits: torch.Tensor
    accepting: bool


_EXECUTOR = None


def _executor() -> Any:
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = _llguidance().LLExecutor()
    return _EXECUTOR


class MatcherCache:
    """Matcher states of one grammar on one tokenizer, by prefix: a bounded LRU memo
    ``tuple(prefix tokens) -> _Node``.  A pure function cache (entries are never mutated once
    stored), so any number of runs and threads share it; a missing prefix is rebuilt from its
    longest stored ancestor (normally its parent: one token)."""

    def __init__(self, lm: Any, grammar: str, capacity: int, label: str) -> None:
        llg = _llguidance()
        self.tokenizer = lltokenizer(lm)
        self.V = int(lm.vocab_size)
        self.W = (self.V + 31) // 32
        self.eos = torch.tensor(sorted({int(e) for e in getattr(lm, "eos_token_ids", None) or (lm.eos_token_id,)}),
                                dtype=torch.long)
        self.capacity, self.label = capacity, label
        root = llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if root.is_error():
            raise ValueError(f"{label}: llguidance refused the grammar on {getattr(lm, 'name', lm)}'s "
                             f"tokenizer: {_one_line(root.get_error())}")
        self.root = self._finish([root])[0]
        if not bool(self.root.bits.any()) and not self.root.accepting:
            raise ValueError(f"{label}: its language is empty on this tokenizer (no token starts a string of it)")
        self._dead = _Node(None, torch.zeros(self.W, dtype=torch.int32), False)
        self._memo: OrderedDict[tuple[int, ...], _Node] = OrderedDict()
        self._lock = threading.Lock()
        self._shifts: dict[torch.device, torch.Tensor] = {}
        self.stats = {"hits": 0, "built": 0, "tokens_consumed": 0}

    # -- building nodes
    def _finish(self, matchers: list[Any]) -> list[_Node]:
        """Nodes for fresh matchers: their masks computed in one parallel llguidance call."""
        import llguidance.torch as lt

        bits = torch.zeros((len(matchers), self.W), dtype=torch.int32)
        live = [(m, i) for i, m in enumerate(matchers) if m is not None and not m.is_error()]
        if live:
            lt.fill_next_token_bitmask_par(_executor(), live, bits)
        out = []
        for i, m in enumerate(matchers):
            if m is None or m.is_error():
                out.append(_Node(None, torch.zeros(self.W, dtype=torch.int32), False))
                continue
            acc = bool(m.is_accepting())
            row = bits[i].clone()
            if m.is_error():      # no token at all allowed (llguidance stops): only EOS, if complete
                row.zero_()
            out.append(_Node(m, row, acc))
        return out

    def _lookup(self, key: tuple[int, ...]) -> _Node | None:
        if not key:
            return self.root
        node = self._memo.get(key)
        if node is not None:
            self._memo.move_to_end(key)
        return node

    def nodes(self, prefixes: Sequence[Sequence[int]]) -> list[_Node]:
        """The node of every prefix (built where missing, all new masks in one call)."""
        keys = [tuple(int(t) for t in p) for p in prefixes]
        found: dict[tuple[int, ...], _Node] = {}
        missing: list[tuple[int, ...]] = []
        with self._lock:
            for k in keys:
                if k in found:
                    continue
                node = self._lookup(k)
                if node is None:
                    missing.append(k)
                    found[k] = self._dead     # placeholder, replaced below
                else:
                    found[k] = node
                    self.stats["hits"] += 1
        if missing:
            fresh = []
            for k in missing:
                with self._lock:
                    cut = len(k) - 1
                    base = self._lookup(k[:cut])
                    while base is None:
                        cut -= 1
                        base = self._lookup(k[:cut])
                if base.matcher is None:
                    fresh.append(None)
                    continue
                m = base.matcher.deep_copy()
                rest = list(k[cut:])
                self.stats["tokens_consumed"] += len(rest)
                fresh.append(m if all(0 <= t < self.V for t in rest) and m.consume_tokens(rest) else None)
            built = self._finish(fresh)
            with self._lock:
                for k, node in zip(missing, built):
                    found[k] = node
                    self._memo[k] = node
                    self.stats["built"] += 1
                while len(self._memo) > self.capacity:
                    self._memo.popitem(last=False)
        return [found[k] for k in keys]

    # -- what potentials ask
    def allowed(self, prefixes: Sequence[Sequence[int]], device: torch.device | str = "cpu") -> torch.Tensor:
        """``(B, V)`` bool: allowed next tokens of each prefix, EOS iff its text is in ``L``."""
        nodes = self.nodes(prefixes)
        device = torch.device(device)
        if not nodes:
            return torch.zeros((0, self.V), dtype=torch.bool, device=device)
        bits = torch.stack([n.bits for n in nodes]).to(device, non_blocking=True)
        shifts = self._shifts.get(device)
        if shifts is None:
            shifts = self._shifts[device] = torch.arange(32, dtype=torch.int32, device=device)
        allowed = ((bits.unsqueeze(-1) >> shifts) & 1).bool().reshape(len(nodes), -1)[:, :self.V]
        acc = torch.tensor([n.accepting for n in nodes], dtype=torch.bool).to(device)
        eos = self.eos.to(device)
        allowed[:, eos] = acc.unsqueeze(1).expand(-1, len(eos))
        return allowed

    def accepting(self, prefixes: Sequence[Sequence[int]]) -> list[bool]:
        """``text(prefix) ∈ L`` for each prefix."""
        return [n.accepting for n in self.nodes(prefixes)]

    def __len__(self) -> int:
        return len(self._memo)


_CACHES: "weakref.WeakKeyDictionary[Any, dict[tuple[str, int], MatcherCache]]" = weakref.WeakKeyDictionary()
_CACHES_LOCK = threading.Lock()


def matcher_cache(lm: Any, grammar: str, capacity: int = CACHE_SIZE, label: str = "constraint") -> MatcherCache:
    """The shared :class:`MatcherCache` of ``grammar`` on ``lm`` (made on first use)."""
    key = (grammar, capacity)
    with _CACHES_LOCK:
        per_lm = _CACHES.get(lm)
        hit = per_lm.get(key) if per_lm is not None else None
    if hit is not None:
        return hit
    cache = MatcherCache(lm, grammar, capacity, label)
    with _CACHES_LOCK:
        return _CACHES.setdefault(lm, {}).setdefault(key, cache)


__all__ = ["GrammarConstraint", "Regex", "Choice", "JSONSchema", "Grammar", "MatcherCache", "matcher_cache",
           "lltokenizer", "exact"]
