"""The CoT grader on hand-written cases: the last ``\\boxed{}`` and math-verify equivalence.

Equivalent forms must grade right, near misses wrong; extraction must handle nested braces,
take the last box, and fall back (documented) when there is no box.
"""

import pytest

from llmppl.evaluation.grading import equivalent, extract_boxed, last_boxed
from llmppl.evaluation.tasks import Extraction

pytest.importorskip("math_verify")


# ------------------------------------------------------------ extraction
@pytest.mark.parametrize("text, box", [
    ("so the answer is \\boxed{17}.", "17"),
    ("\\boxed{\\frac{a}{b}}", "\\frac{a}{b}"),                      # nested braces
    ("$\\boxed{\\frac{\\sqrt{2}}{2}}$", "\\frac{\\sqrt{2}}{2}"),    # two levels
    ("first \\boxed{3}, then on reflection \\boxed{4}", "4"),        # the last box wins
    ("\\boxed {5}", "5"),
    ("\\fbox{6}", "6"),
    ("the set \\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),                  # escaped braces are not nesting
    ("\\boxed{2} and then a cut \\boxed{\\frac{3", "2"),             # an unclosed box does not count
    ("\\boxed{\\frac{3", None),
    ("no box at all", None),
    ("", None),
    (None, None),
])
def test_last_boxed(text, box):
    assert last_boxed(text) == box


@pytest.mark.parametrize("text, strict, expected", [
    ("... = 1000, so \\boxed{1,000}", False, Extraction("1000", "boxed")),    # numbers canonicalised
    ("\\boxed{$-4.50$}", False, Extraction("-4.5", "boxed")),
    ("\\boxed{\\frac{1}{2}}", False, Extraction("\\frac{1}{2}", "boxed")),  # LaTeX kept as written
    ("Answer: 12 apples\n\\boxed{13}", False, Extraction("13", "boxed")),   # a box beats an Answer line
    # no box: the fallback of the short-answer tasks (documented), or nothing when strict
    ("The answer is 42.", False, Extraction("42", "answer-line")),
    ("so she has 7 apples left", False, Extraction("7", "last-number")),
    ("The answer is 42.", True, Extraction(None, "none")),
    ("no numbers", False, Extraction(None, "none")),
    (None, False, Extraction(None, "none")),
])
def test_extract_boxed(text, strict, expected):
    assert extract_boxed(text, strict=strict) == expected


# ------------------------------------------------------------ equivalence
@pytest.mark.parametrize("answer, gold", [
    ("\\frac{1}{2}", "0.5"),
    ("0.5", "\\frac{1}{2}"),
    ("\\dfrac{3}{4}", "0.75"),
    ("2\\sqrt{2}", "\\sqrt{8}"),
    ("1,000", "1000"),
    ("1000", "1,000"),
    ("x = 3", "3"),
    ("72.00", "72"),
    ("\\frac{10}{4}", "\\frac{5}{2}"),
    ("2.5", "\\frac{5}{2}"),
    ("-3", "-3"),
    ("\\pi/2", "\\frac{\\pi}{2}"),
    ("x^2+2x+1", "(x+1)^2"),
])
def test_equivalent_forms_grade_right(answer, gold):
    assert equivalent(answer, gold)


@pytest.mark.parametrize("answer, gold", [
    ("0.51", "0.5"),
    ("2", "-2"),
    ("-2", "2"),
    ("73", "72"),
    ("0.33", "\\frac{1}{3}"),      # rounded is not equal (math-verify compares to 6 digits)
    ("\\sqrt{2}", "2"),
    ("x = 4", "3"),
    ("1001", "1,000"),
    ("x^2+1", "(x+1)^2"),
    (None, "2"),
    ("", "2"),
    ("\\text{banana}", "2"),       # unparseable as a number: wrong, not an error
])
def test_near_misses_grade_wrong(answer, gold):
    assert not equivalent(answer, gold)


def test_an_unparseable_reference_is_an_error():
    with pytest.raises(ValueError, match="reference answer"):
        equivalent("2", "")


@pytest.mark.parametrize("reply, gold, right", [
    ("Half of 48 is 24, and 48 + 24 = 72.\nSo the total is $\\boxed{72}$.", "72", True),
    ("We get $x = \\frac{1}{2}$, i.e. \\boxed{0.5}", "\\frac{1}{2}", True),
    ("First guess \\boxed{70}. Checking: 48 + 24 = 72, so \\boxed{72}.", "72", True),
    ("First guess \\boxed{72}. Checking again: \\boxed{70}.", "72", False),   # only the last box counts
    ("He has \\boxed{\\frac{5}{2}} apples", "2.5", True),
    ("The total is 72", "72", True),   # no box: the last-number fallback
])
def test_extract_then_grade(reply, gold, right):
    assert equivalent(extract_boxed(reply).answer, gold) is right
