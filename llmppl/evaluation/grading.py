"""Chain-of-thought grading as the papers do it: the last ``\\boxed{}``, checked with math-verify.

* :func:`last_boxed` returns the content of the *last* ``\\boxed{…}`` (or ``\\fbox{…}``) of a
  text, with balanced braces, so ``\\boxed{\\frac{a}{b}}`` gives ``\\frac{a}{b}``
  (a regular expression without nesting would stop at the first ``}``).
* :func:`extract_boxed` is the answer extraction of the CoT tasks: the last box; when there
  is none, the fallback of :func:`llmppl.evaluation.tasks.extract_number` (the last
  ``Answer: …`` line, else the last number: math-verify's own fallback on a reply without a
  box is its last expression too), recorded as ``how = "answer-line" / "last-number"`` so
  that the strict box-only accuracy can be recomputed from the records; ``strict=True``
  turns the fallback off.
* :func:`equivalent` grades by *equivalence of expressions*, not by string match:
  ``math_verify.verify(parse(gold), parse(answer))`` — both sides parsed as LaTeX or plain
  expressions into sympy, compared symbolically and numerically (``\\frac{1}{2}`` = ``0.5``,
  ``2\\sqrt{2}`` = ``\\sqrt{8}``, ``1,000`` = ``1000``, ``x = 3`` = ``3``), with math-verify's
  default float rounding (6 digits), so ``0.51 ≠ 0.5`` and ``2 ≠ -2``.

math-verify (PyPI ``math-verify[antlr4_13_2]``, in the ``eval`` extra) is imported on first
use; without it grading is a ``ModuleNotFoundError`` naming the install.
"""

from __future__ import annotations

import re
import threading
from functools import lru_cache
from typing import Any

from .tasks import Extraction, canonical_number, extract_number

#: the commands whose argument is the final answer (``\boxed{…}`` and ``\fbox{…}``)
_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
INSTALL_HINT = "pip install 'math-verify[antlr4_13_2]' (or pip install 'llmppl[eval]')"


def last_boxed(text: str | None) -> str | None:
    """The content of the last ``\\boxed{…}`` with balanced braces; None if there is none.

    A box whose braces never close (a reply cut mid-answer) does not count.
    """
    if not text:
        return None
    for m in reversed(list(_BOX.finditer(text))):
        depth, start = 1, m.end()
        for i in range(start, len(text)):
            c = text[i]
            if c == "{" and text[i - 1] != "\\":
                depth += 1
            elif c == "}" and text[i - 1] != "\\":
                depth -= 1
                if depth == 0:
                    return text[start:i].strip()
    return None


def extract_boxed(text: str | None, strict: bool = False) -> Extraction:
    """The final answer of a CoT reply: the last box (``how="boxed"``), else (unless ``strict``)
    the last ``Answer: …`` line or the last number, else ``Extraction(None, "none")``.

    A numeric box content is canonicalised (``1,000`` -> ``1000``, ``$-4.50$`` -> ``-4.5``) so that
    majority votes pool equal numbers; anything else (LaTeX) is kept as written.
    """
    box = last_boxed(text)
    if box is not None:
        plain = box.replace("$", "").replace("\\!", "").replace("\\,", "").strip()
        return Extraction(canonical_number(plain) or box, "boxed")
    if strict or not text:
        return Extraction(None, "none")
    return extract_number(text)


@lru_cache(maxsize=1)
def _math_verify() -> Any:
    try:
        import math_verify
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(f"grading CoT answers needs math-verify: {INSTALL_HINT}") from exc
    return math_verify


@lru_cache(maxsize=4096)
def _parse(expr: str) -> Any:
    mv = _math_verify()
    # math-verify's timeouts use SIGALRM, which only the main thread may set
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    configs = [mv.LatexExtractionConfig(boxed_match_priority=0), mv.ExprExtractionConfig()]
    return mv.parse(f"\\boxed{{{expr}}}", extraction_config=configs, parsing_timeout=timeout)


def equivalent(answer: str | None, gold: str) -> bool:
    """``answer`` and ``gold`` denote the same mathematical object (math-verify); None is wrong.

    Both are box contents or plain expressions (``"\\frac{1}{2}"``, ``"0.5"``, ``"x = 3"``).
    An answer math-verify cannot parse is wrong; a gold answer it cannot parse is a
    ``ValueError`` (a reference that no answer could match is a broken dataset, not a miss).
    """
    if answer is None or not answer.strip():
        return False
    mv = _math_verify()
    parsed_gold = _parse(gold.strip())
    if not parsed_gold:
        raise ValueError(f"math-verify cannot parse the reference answer {gold!r}")
    parsed = _parse(answer.strip())
    if not parsed:
        return False
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    return bool(mv.verify(parsed_gold, parsed, timeout_seconds=timeout))
