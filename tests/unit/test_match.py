"""Answer matching (DESIGN.md §10): normalization and the four rules, with the null-output case."""

from __future__ import annotations

import pytest

from residue_monitor.detectors.exceptions import InvalidInput
from residue_monitor.shells.match import is_right, last_number, normalize, outcome


def test_normalize_is_squad_style() -> None:
    """Lowercase, punctuation and articles removed, whitespace collapsed."""
    assert normalize("  The  Eiffel-Tower, in PARIS!  ") == "eiffeltower in paris"
    assert normalize("An apple a day") == "apple day"


@pytest.mark.parametrize(
    ("output", "answers", "match", "right"),
    [
        ("Paris", ["paris"], "exact", True),
        ("It is Paris.", ["Paris"], "exact", False),
        ("It is Paris.", ["Paris"], "contains", True),
        ("The element is Cerium.", ["Ce"], "contains", False),  # whole words only
        ("Symbol: Ce.", ["Ce"], "contains", True),
        ("New York City", ["new york"], "contains", True),
        ("There were 1,200 people, then 1,250.", ["1250"], "number", True),
        ("There were 1,250 people, then 3.", ["1250"], "number", False),  # the last number counts
        ("-4.5 degrees", ["-4.5"], "number", True),
        ("no number here", ["3"], "number", False),
        ("The answer is (B) Mars.", ["B", "Mars"], "choice", True),
        ("B", ["B", "Mars"], "choice", True),
        ("A planet called Mars", ["B", "Mars"], "choice", True),  # "A planet": article, then the text
        ("C) Venus", ["B", "Mars"], "choice", False),
    ],
)
def test_rules(output: str, answers: list[str], match: str, right: bool) -> None:
    """Each rule accepts what DESIGN.md §10 says it accepts and nothing else."""
    assert is_right(output, answers, match) is right


def test_outcome_separates_null_outputs() -> None:
    """An empty or whitespace-only output is 'null', never 'right' or 'wrong'."""
    assert outcome("   ", ["x"]) == "null"
    assert outcome("x", ["x"]) == "right" and outcome("y", ["x"]) == "wrong"


def test_bad_rules_and_empty_answers_raise() -> None:
    """An unknown rule or an item without answers is a named error."""
    with pytest.raises(InvalidInput, match="match must be one of"):
        is_right("x", ["x"], "fuzzy")
    with pytest.raises(InvalidInput, match="at least one"):
        is_right("x", [], "contains")
    assert last_number("7 then 8") == 8.0
