"""SMC step granularity: one token, ``k`` tokens, or a segment up to a delimiter.

Within one SMC step every live particle is extended until its segment ends (``width``
tokens, ``ends`` is true, EOS, or ``max_new_tokens``); particles whose segment ended wait.
Weights accumulate over the block; twisting, reweighting and resampling happen once per
step (the weight formula of DESIGN.md §1 with ``y_t`` a block).

A step kind declares ``requires`` (a :class:`~llmppl.inference.capabilities.Needs`:
``row_wise=False`` means ``ends`` is checked on the host after every token), ``width`` (the
most tokens one step draws) and the weight terms it adds (``terms()``, e.g. the segment
look-ahead twist of :class:`Until`); the engine needs no change for a new one.
"""

from __future__ import annotations

import warnings
import weakref
from typing import TYPE_CHECKING, Any

import torch

from .capabilities import Needs
from .terms import LengthTwist, WeightTerm

if TYPE_CHECKING:
    from .draw import Drawn
    from .particles import Particles
    from .smc import SMCPlan, SMCState


class Step:
    """Base class: a step of at most ``width`` tokens that ends early when ``ends(segment, lm)``
    (checked on the host after each token when ``requires.row_wise`` is false)."""

    #: token steps are native (blocks); a step with a host check reads each token
    requires: Needs = Needs()
    #: the most tokens one step draws per particle
    width: int = 1

    def ends(self, segment: list[int], lm: Any) -> bool:
        """True when ``segment`` (this step's tokens so far) completes the step."""
        return len(segment) >= self.width

    def terms(self) -> tuple[WeightTerm, ...]:
        """Weight terms this step kind adds to every step (:mod:`~llmppl.inference.terms`)."""
        return ()

    def end_ids(self, lm: Any) -> tuple[tuple[int, ...], bool]:
        """For native blocks: the token ids at which a block must stop so that the step's end can
        be found, and whether drawing one always ends the step (else ``ends`` is checked on the
        host there).  A step that ends only by its width has none."""
        return (), True

    def resampling_classes(self, plan: "SMCPlan", state: "SMCState", drawn: "Drawn") -> torch.Tensor | None:
        """``(G, N)`` labels: when a prompt resamples after this step, a particle is replaced only
        by particles of its own class, and each class keeps its total weight
        (:func:`~llmppl.inference.resampling.draw_ancestors_within`); ``None`` (the default):
        every particle of the prompt competes with every other."""
        return None

    def check(self, lm: Any) -> None:
        """Raise ValueError when the step cannot work with ``lm``."""


class Tokens(Step):
    """A step is ``k`` tokens (``k = 1``: token-level Power-SMC)."""

    def __init__(self, k: int = 1) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"Tokens(k) needs an int k >= 1, got {k!r}")
        self.k = k

    @property
    def width(self) -> int:  # type: ignore[override]
        return self.k

    def __repr__(self) -> str:
        return f"Tokens({self.k})"


class Whole(Tokens):
    """The whole completion is one step (decoders that never weigh or resample midway: the
    backend draws it as one native block)."""

    def __init__(self) -> None:
        super().__init__(2 ** 62)

    def __repr__(self) -> str:
        return "Whole()"


class Until(Step):
    """A step ends at ``delimiter`` (a string matched in the decoded segment, or a token id)
    or after ``max_tokens`` tokens.

    Segments have different lengths, so SMC twists every live prefix ``y`` by its one-token
    look-ahead mass ``log Σ_v p(v | y)^{a_t}``; ``slope=True`` adds ``c_t · (T − len(y) − 1)``
    for the rest of the horizon, with ``c_t`` the mean log-increment per token of the earlier
    steps' draws (for LMs whose per-token cost is about constant, where prefixes that differ by
    many tokens would otherwise be compared unfairly; on LMs whose cost depends on the position,
    such as the toy LMs' length-dependent EOS, it adds variance).  Both twists are chosen before
    the step draws, so ``Ẑ`` stays unbiased (:class:`~llmppl.inference.terms.LengthTwist`).

    ``resample``: which particles compete when a prompt resamples after a segment.
    ``"position"`` (the default): at ``a_t ≠ 1`` a live particle competes only with the live
    particles at the same position (tokens so far), each position keeping its total weight, and a
    particle that has ended keeps its slot and weight (:func:`position_classes`).  At ``a_t ≠ 1``
    every token costs ``log Σ_v p(v|y)^{a_t} < 0`` in expectation, so the weights of prefixes of
    different lengths differ by the cost of the tokens the shorter one has still to draw, which
    no one-token twist knows: resampling on them copies the short prefixes (on the
    ``"truncating"`` toy at ``α = 4``, 97 % of the first step's mass went to a prefix whose final
    mass is 0.33, and a run was 3× farther from the target than without resampling;
    ``docs/smc.md``, ``benchmarks/segment_steps.py``).  At ``a_t = 1`` tokens cost nothing and
    every particle competes.  ``"all"``: every particle competes (the rule before this option).
    Both keep the target and ``Ẑ``'s unbiasedness."""

    #: the values of ``resample``
    RESAMPLE = ("position", "all")

    #: the step ends early: on the token path the delimiter is looked for after every token (host);
    #: native blocks stop at the delimiter's candidate tokens (``end_ids``)
    requires = Needs(row_wise=False)

    def __init__(self, delimiter: str | int = "\n\n", max_tokens: int = 256, slope: bool = False,
                 resample: str = "position") -> None:
        if isinstance(delimiter, bool) or not isinstance(delimiter, (str, int)) or delimiter == "":
            raise ValueError(f"delimiter must be a non-empty string or a token id, got {delimiter!r}")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
        if resample not in self.RESAMPLE:
            raise ValueError(f"resample must be one of {self.RESAMPLE}, got {resample!r}")
        self.delimiter = delimiter
        self.max_tokens = max_tokens
        self.slope = bool(slope)
        self.resample = resample

    @property
    def width(self) -> int:  # type: ignore[override]
        return self.max_tokens

    def terms(self) -> tuple[WeightTerm, ...]:
        return (LengthTwist(self.slope),)

    def resampling_classes(self, plan: "SMCPlan", state: "SMCState", drawn: "Drawn") -> torch.Tensor | None:
        if self.resample != "position":
            return None
        P = state.particles
        if bool((drawn.a != 1.0).any()):
            live = P.length[~P.done]
            if len(live) >= 8 and len(torch.unique(live)) > len(live) // 2:
                warnings.warn(SCATTERED, stacklevel=2)
        return position_classes(P, drawn.a)

    def end_ids(self, lm: Any) -> tuple[tuple[int, ...], bool]:
        """A token-id delimiter is its own end (certain).  A string delimiter ends the segment at the
        first token whose arrival puts it in the decoded text; that token's text holds the
        delimiter's last character, so the candidates are the tokens whose text holds it (the
        host then checks the decoded segment)."""
        if isinstance(self.delimiter, int):
            return (self.delimiter,), True
        return _tokens_with(lm, self.delimiter[-1]), False

    def check(self, lm: Any) -> None:
        if isinstance(self.delimiter, str) and lm.tokenizer is None:
            raise ValueError(f"Until({self.delimiter!r}) needs an LM with a tokenizer; "
                             f"{lm.name} has none: pass the delimiter as a token id")
        if isinstance(self.delimiter, int) and not 0 <= self.delimiter < lm.vocab_size:
            raise ValueError(f"delimiter token id {self.delimiter} is outside [0, {lm.vocab_size})")

    def ends(self, segment: list[int], lm: Any) -> bool:
        if len(segment) >= self.max_tokens:
            return True
        if isinstance(self.delimiter, int):
            return bool(segment) and segment[-1] == self.delimiter
        return self.delimiter in (lm.decode(segment) or "")

    def __repr__(self) -> str:
        extra = (", slope=True" if self.slope else "") + (f", resample={self.resample!r}"
                                                           if self.resample != "position" else "")
        return f"Until({self.delimiter!r}, max_tokens={self.max_tokens}{extra})"


#: tokenizer -> {character: ids}; weak keys, so an entry goes with its tokenizer (an id could be reused)
_CANDIDATES: "weakref.WeakKeyDictionary[Any, dict[str, tuple[int, ...]]]" = weakref.WeakKeyDictionary()


def _tokens_with(lm: Any, char: str) -> tuple[int, ...]:
    """The ids whose decoded text contains ``char`` (memoised per tokenizer and character)."""
    per_char = _CANDIDATES.setdefault(lm.tokenizer, {})
    if char not in per_char:
        texts = lm.tokenizer.convert_ids_to_tokens(list(range(len(lm.tokenizer))))
        decoded = [lm.tokenizer.convert_tokens_to_string([t]) if t is not None else "" for t in texts]
        per_char[char] = tuple(i for i, s in enumerate(decoded) if char in s and i < lm.vocab_size)
    return per_char[char]


#: the warning of ``Until(resample="position")`` when most live particles are alone at their position
SCATTERED = ("Until segment steps at a_t != 1: most live particles are alone at their position, so "
             "resampling within positions (resample='position', the default) leaves them as they are; "
             "across positions the weights differ by the cost of the tokens a shorter prefix has still to "
             "draw, which resample='all' would follow (docs/smc.md, 'Segment steps'). For resampling guided "
             "by a process reward at a != 1, token steps (pp.steps.Tokens(k)) compare equal lengths.")


def position_classes(particles: "Particles", a: torch.Tensor) -> torch.Tensor:
    """``(G, N)`` resampling classes of segment steps (``Until(resample="position")``): a live
    particle's class is its position (tokens drawn so far); a particle that has ended is a class
    of its own (it keeps its slot and its weight); a prompt at ``a_t = 1`` (``a`` ``(G,)``) is one
    class, since there a token costs nothing in expectation and positions are comparable."""
    G, N = particles.G, particles.N
    slot = torch.arange(N, device=particles.device).expand(G, N)
    key = torch.where(particles.done.view(G, N), -1 - slot, particles.length.view(G, N))
    return torch.where((a == 1.0)[:, None].to(key.device), torch.zeros_like(key), key)


#: ``step=`` names accepted by ``pp.SMC``
STEPS: dict[str, Step] = {"token": Tokens(1)}


def get_step(step: str | Step) -> Step:
    if isinstance(step, Step):
        return step
    try:
        return STEPS[step]
    except (KeyError, TypeError):
        raise ValueError(f"unknown step {step!r}: use {sorted(STEPS)}, pp.steps.Tokens(k) "
                         "or pp.steps.Until(delimiter, max_tokens)") from None


__all__ = ["Step", "Tokens", "Whole", "Until", "STEPS", "get_step", "position_classes"]
