# pyright: strict
"""Generator for v2.VALUE-COLLAPSE: two different values for one attribute, and a question forcing one.

About half the instances carry a cue that decides between the values (a correction, a measured vs a
guessed figure); those have an expected answer. The rest are genuinely undecidable (``answers == []``).
``meta`` records ``value_a`` / ``value_b`` (both occur in the prompt, and they differ) and ``resolvable``.
"""

from __future__ import annotations

import random
from typing import NamedTuple

from ._text import CITIES, COLORS, NAMES, WEEKDAYS, WORDS, Draft, filler, join, preamble

# --- v2.VALUE-COLLAPSE -------------------------------------------------------------------------------

# (subject, predicate with {v}, question, low, high) for numeric attributes
NUMERIC_ATTRIBUTES = (
    ("the old bridge", "is {v} meters long", "How long is the old bridge, in meters?", 100, 900),
    ("the lake", "is {v} meters deep", "How deep is the lake, in meters?", 5, 90),
    ("the village school", "has {v} pupils", "How many pupils does the village school have?", 120, 900),
    ("the parcel", "weighs {v} kilograms", "How many kilograms does the parcel weigh?", 2, 40),
    ("the clock tower", "is {v} meters tall", "How tall is the clock tower, in meters?", 30, 300),
    ("the farm", "keeps {v} sheep", "How many sheep does the farm keep?", 20, 400),
    ("the ferry", "carries {v} passengers", "How many passengers does the ferry carry?", 40, 600),
    ("the recipe", "needs {v} eggs", "How many eggs does the recipe need?", 2, 12),
)
# (subject with {n}, predicate with {v}, question with {n}, value pool) for word attributes
_WORDY = (
    ("{n}'s bicycle", "is {v}", "What color is {n}'s bicycle?", COLORS),
    ("the summer meeting", "will be held in {v}", "In which city will the summer meeting be held?", CITIES),
    ("the museum", "is closed on {v}", "On which day is the museum closed?", WEEKDAYS),
    ("{n}'s boat", "is called {v}", "What is {n}'s boat called?", tuple(w.capitalize() for w in WORDS)),
)
_SOURCES = (
    ("The first report says", "A second report says"),
    ("According to the guidebook,", "According to the local newspaper,"),
    ("{a} wrote that", "{b} wrote that"),
    ("The label says", "The receipt says"),
    ("Yesterday's notice said", "Today's notice says"),
)
# (cue sentence, which value it makes right: 0 = first, 1 = second, None = undecidable)
_CUES: tuple[tuple[str, int | None], ...] = (
    ("The second statement is a correction of the first.", 1),
    ("The first figure was checked carefully; the second was only a rough guess.", 0),
    ("The later statement replaces the earlier one.", 1),
    ("The second source is known to be out of date.", 0),
    ("Both sources are equally reliable.", None),
    ("Nobody knows which of the two is right.", None),
    ("", None),
)
_FORCE = (
    "Give exactly one answer, with no hedging.",
    "Answer with one value only.",
    "You must pick one. Do not say both.",
    "",
)


class _Pair(NamedTuple):
    subject: str
    predicate: str
    """With ``{v}`` where the value goes."""
    question: str
    first: str
    second: str
    numeric: bool


def _pair(rng: random.Random) -> _Pair:
    """An attribute and two different values for it (numbers ~55 % of the time)."""
    if rng.random() < 0.55:
        subject, predicate, question, lo, hi = rng.choice(NUMERIC_ATTRIBUTES)
        a = rng.randint(lo, hi)
        b = a + rng.choice((-1, 1)) * rng.randint(max(1, (hi - lo) // 10), max(2, (hi - lo) // 3))
        if b < lo:  # stay in the attribute's plausible range (no "1 eggs", no negative depths)
            b = a + max(1, (hi - lo) // 5)
        return _Pair(subject, predicate, question, str(a), str(b), True)
    subject, predicate, question, pool = rng.choice(_WORDY)
    name = rng.choice(NAMES)
    a, b = rng.sample(pool, 2)
    return _Pair(subject.format(n=name), predicate, question.format(n=name), a, b, False)


def _v2_meta(p: _Pair, cue: str, winner: int | None) -> dict[str, str | int | bool | list[str]]:
    return {
        "attribute": f"{p.subject} {p.predicate.replace('{v}', '…')}",
        "value_a": p.first,
        "value_b": p.second,
        "resolvable": winner is not None,
        "cue": cue,
    }


def v2_two_sources(rng: random.Random) -> Draft:
    p = _pair(rng)
    src_a, src_b = rng.choice(_SOURCES)
    a_name, b_name = rng.sample(NAMES, 2)
    src_a, src_b = src_a.format(a=a_name), src_b.format(b=b_name)
    pred = p.predicate
    first = f"{src_a} {p.subject} {pred.format(v=p.first)}."
    second = f"{src_b} {p.subject} {pred.format(v=p.second)}."
    cue, winner = rng.choice(_CUES)
    between = filler(rng, rng.randint(0, 3))
    prompt = join(first, *between, second, cue, f"{p.question} {rng.choice(_FORCE)}")
    answers = [] if winner is None else [(p.first, p.second)[winner]]
    match = "number" if p.numeric else "contains"
    return Draft("two_sources", prompt, answers, match, _v2_meta(p, cue, winner))


def v2_choice(rng: random.Random) -> Draft:
    """Multiple choice between the two values; the labels are shuffled."""
    p = _pair(rng)
    cue, winner = rng.choice(_CUES)
    options = [p.first, p.second]
    rng.shuffle(options)
    lead = filler(rng, rng.randint(0, 2))
    body = (
        f"One note says that {p.subject} {p.predicate.format(v=p.first)}. "
        f"Another note says that {p.subject} {p.predicate.format(v=p.second)}. {cue}"
    )
    ask = f"{p.question}\nA) {options[0]}\nB) {options[1]}\nAnswer with A or B."
    answers = (
        []
        if winner is None
        else ["AB"[options.index((p.first, p.second)[winner])], (p.first, p.second)[winner]]
    )
    return Draft("choice", join(*lead, body, ask), answers, "choice", _v2_meta(p, cue, winner))


def v2_same_speaker(rng: random.Random) -> Draft:
    """One person states both values; nothing decides between them."""
    p = _pair(rng)
    name = rng.choice(NAMES)
    middle = filler(rng, rng.randint(0, 3))
    prompt = join(
        f"{name} told me that {p.subject} {p.predicate.format(v=p.first)}.",
        *middle,
        f"Later, {name} told me that {p.subject} {p.predicate.format(v=p.second)}, and did not mention "
        "having changed their mind.",
        f"{p.question} {rng.choice(_FORCE)}",
    )
    return Draft("same_speaker", prompt, [], "number" if p.numeric else "contains", _v2_meta(p, "", None))


_RULES = (
    (
        "a red card",
        "you win a point",
        "you lose a point",
        "Does the player win or lose a point?",
        "win",
        "lose",
    ),
    (
        "a bell rings",
        "everyone must sit down",
        "everyone must stand up",
        "Should they sit or stand?",
        "sit",
        "stand",
    ),
    (
        "the light turns green",
        "the cars must stop",
        "the cars must go",
        "Should the cars stop or go?",
        "stop",
        "go",
    ),
    (
        "it is a holiday",
        "the shop is open",
        "the shop is closed",
        "Is the shop open or closed?",
        "open",
        "closed",
    ),
)
_RULE_CUES: tuple[tuple[str, int | None], ...] = (
    ("The second rule was added later and replaces the first.", 1),
    ("The first rule always takes priority over the second.", 0),
    ("Both rules are in force.", None),
    ("", None),
    ("", None),
)
_RULE_FORCE = ("Answer with one word.", "Pick one; do not say both.", "Reply with a single word.", "")


def v2_rule_conflict(rng: random.Random) -> Draft:
    """Two rules give opposite outcomes for the same event; the question forces one."""
    event, out_a, out_b, question, key_a, key_b = rng.choice(_RULES)
    where = rng.choice(("In this game", "In this town", "According to the club rules", "Here"))
    cue, winner = rng.choice(_RULE_CUES)
    lead = filler(rng, rng.randint(0, 2)) or [preamble(rng, 0.7)]
    prompt = join(
        *lead,
        f"{where}, when {event}, {out_a}. {where}, when {event}, {out_b}. {cue}",
        f"Now {event}. {question} {rng.choice(_RULE_FORCE)}",
    )
    answers = [] if winner is None else [(key_a, key_b)[winner]]
    meta = {"attribute": f"what happens when {event}", "value_a": out_a, "value_b": out_b}
    return Draft(
        "rule_conflict", prompt, answers, "contains", {**meta, "resolvable": winner is not None, "cue": cue}
    )


def v2_count_conflict(rng: random.Random) -> Draft:
    """Two counts of the same unchanged collection; sometimes one count is discredited."""
    thing = rng.choice(("apples", "chairs", "books", "coins", "bottles", "plates"))
    a = rng.randint(6, 60)
    b = a + rng.choice((-1, 1)) * rng.randint(2, 9)
    x, y = rng.sample(NAMES, 2)
    cue, winner = rng.choice(
        (
            (f"{x} was interrupted halfway through counting; {y} counted twice to be sure.", 1),
            (f"{y} admits to having lost count near the end.", 0),
            ("", None),
        )
    )
    prompt = join(
        f"{x} counts the {thing} in the storeroom and finds {a}.",
        *filler(rng, rng.randint(0, 2)),
        f"{y} counts the same {thing} right afterwards and finds {b}. Nothing was added or taken away. {cue}",
        f"How many {thing} are in the storeroom? {rng.choice(_FORCE)}",
    )
    answers = [] if winner is None else [str((a, b)[winner])]
    meta = {"attribute": f"number of {thing}", "value_a": str(a), "value_b": str(b)}
    return Draft(
        "count_conflict", prompt, answers, "number", {**meta, "resolvable": winner is not None, "cue": cue}
    )


V2_FAMILIES = (v2_two_sources, v2_choice, v2_same_speaker, v2_rule_conflict, v2_count_conflict)
