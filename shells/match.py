"""Is an output right? The answer-matching rules of DESIGN.md §10, shared by shells and evaluation.

Text is normalized as in SQuAD / TriviaQA scoring: lowercase, punctuation and the articles a/an/the
removed, whitespace collapsed. Then, per rule:

* ``exact``: the normalized output equals a normalized answer;
* ``contains``: a normalized answer occurs in the normalized output as whole words (``Ce`` does not match
  an output that only says ``Cerium``);
* ``number``: the last number in the output (thousands separators removed) equals the answer;
* ``choice``: the first standalone option label (A–E) or the full option text names the answer
  (``answers[0]`` is the label, later answers the option's text).

An empty output (nothing but whitespace) is a null output: never right, reported as its own outcome.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from typing import Literal

from residue_monitor.detectors.exceptions import InvalidInput

Outcome = Literal["right", "wrong", "null"]
MATCH_RULES = ("exact", "contains", "number", "choice")

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation + "‘’“”–—…")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
# A standalone capital A–E; "A" followed by a lowercase word is the article, not a label.
_LABEL = re.compile(r"(?<![A-Za-z])([A-E])(?![A-Za-z])(?!\s+[a-z])")


def normalize(text: str) -> str:
    """SQuAD-style normalization: lowercase, no punctuation, no articles, single spaces."""
    t = text.lower().translate(_PUNCT)
    t = _ARTICLES.sub(" ", t)
    return " ".join(t.split())


def _number(s: str) -> float | None:
    try:
        return float(s.replace(",", ""))
    except ValueError:
        return None


def last_number(text: str) -> float | None:
    """The last number written in ``text`` (thousands separators allowed), or None."""
    found = _NUMBER.findall(text)
    return _number(found[-1]) if found else None


def is_right(output: str, answers: Sequence[str], match: str = "contains") -> bool:
    """Whether ``output`` gives one of ``answers`` under the rule ``match``."""
    if match not in MATCH_RULES:
        raise InvalidInput(f"match must be one of {', '.join(MATCH_RULES)}, got {match!r}")
    if not answers:
        raise InvalidInput("an item needs at least one accepted answer")
    if match == "number":
        got = last_number(output)
        return got is not None and any(got == _number(a) for a in answers)
    out = normalize(output)
    if match == "exact":
        return any(out == normalize(a) for a in answers)
    if match == "contains":
        padded = f" {out} "
        return any(f" {n} " in padded for a in answers if (n := normalize(a)))
    label = _LABEL.search(output)
    if label is not None and label.group(1) == answers[0]:
        return True
    padded = f" {out} "
    return any(f" {n} " in padded for a in answers[1:] if (n := normalize(a)))


def outcome(output: str, answers: Sequence[str], match: str = "contains") -> Outcome:
    """right / wrong, or null for an empty output."""
    if not output.strip():
        return "null"
    return "right" if is_right(output, answers, match) else "wrong"
