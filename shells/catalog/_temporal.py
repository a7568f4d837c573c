# pyright: strict
"""Generator for v4.TEMPORAL-INFERENCE: sequences with gaps or shifts, arithmetic across time gaps.

Every instance has a computed expected answer; ``meta`` records the anchor, the gap and the family's
own parameters so an evaluation can tell "off by one step" from "lost the anchor".
"""

from __future__ import annotations

import random

from ._text import (
    CITIES,
    MONTHS,
    NAMES,
    WEEKDAYS,
    Draft,
    add_days,
    date_answers,
    filler,
    join,
    ordinal,
    preamble,
)

_EVENTS = ("the parcel was posted", "the ship left port", "the festival began", "the repairs started",
           "the letter was sent", "the seeds were planted", "the exam took place")  # fmt: skip


def v4_weekday_gap(rng: random.Random) -> Draft:
    """Weekday + N days, with optional filler between the anchor and the question."""
    start = rng.randrange(7)
    gap = rng.choice((rng.randint(3, 13), rng.randint(15, 60)))
    event = rng.choice(_EVENTS)
    anchor = f"{event.capitalize()} on a {WEEKDAYS[start]}."
    middle = filler(rng, rng.randint(0, 3))
    question = rng.choice(
        (
            f"Exactly {gap} days after that day, something else happened. On which day of the week was it?",
            f"What day of the week was it {gap} days later?",
            f"Counting forward {gap} days from that {WEEKDAYS[start]}, which weekday do we land on?",
        )
    )
    answer = WEEKDAYS[(start + gap) % 7]
    meta = {"anchor": WEEKDAYS[start], "gap_days": gap, "expected": answer}
    return Draft("weekday_gap", join(anchor, *middle, question), [answer], "contains", meta)


def v4_date_rollover(rng: random.Random) -> Draft:
    """Date + N days across a month (or year) boundary in a non-leap year."""
    month = rng.randrange(12)
    day = rng.randint(15, 28)
    gap = rng.randint(10, 45)
    end_day, end_month = add_days(day, month, gap)
    event = rng.choice(_EVENTS)
    lead = filler(rng, rng.randint(0, 2))
    prompt = join(
        *lead,
        f"{event.capitalize()} on {day} {MONTHS[month]} (in a year that is not a leap year).",
        rng.choice(
            (
                f"What was the date {gap} days later?",
                f"Which date falls {gap} days after that?",
                f"If the next step came {gap} days later, on what date was it?",
            )
        ),
    )
    meta = {"anchor": f"{day} {MONTHS[month]}", "gap_days": gap, "expected": f"{end_day} {MONTHS[end_month]}"}
    return Draft("date_rollover", prompt, date_answers(end_day, MONTHS[end_month]), "contains", meta)


def v4_broken_sequence(rng: random.Random) -> Draft:
    """An arithmetic sequence with a torn-out stretch in the middle; continue it after the gap."""
    a, step = rng.randint(1, 50), rng.randint(2, 9)
    shown_before, skipped, shown_after = rng.randint(3, 5), rng.randint(3, 12), rng.randint(2, 3)
    before = [a + i * step for i in range(shown_before)]
    after_start = shown_before + skipped
    after = [a + (after_start + i) * step for i in range(shown_after)]
    expected = a + (after_start + shown_after) * step
    text = rng.choice(
        (
            "A list of numbers goes up by the same amount each time, but part of it was torn off: {b}, "
            "..., {c}.",
            "Some terms of this sequence are missing in the middle: {b}, [missing], {c}.",
            "Continue the pattern. The middle was skipped: {b} ... {c}, ?",
        )
    ).format(b=", ".join(map(str, before)), c=", ".join(map(str, after)))
    question = rng.choice(("What number comes next?", "Which number follows the last one shown?", ""))
    meta = {"anchor": str(a), "step": step, "gap_terms": skipped, "expected": str(expected)}
    lead = [preamble(rng, 0.6), *filler(rng, rng.choice((0, 0, 1, 2)))]
    return Draft("broken_sequence", join(*lead, text, question), [str(expected)], "number", meta)


def v4_out_of_order(rng: random.Random) -> Draft:
    """Four homes told out of order with before/after links; ask which came k-th."""
    name = rng.choice(NAMES)
    places = rng.sample(CITIES, 4)
    statements = [
        f"Before moving to {places[1]}, {name} lived in {places[0]}.",
        f"After {places[1]}, {name} moved to {places[2]}.",
        f"{name}'s last home was {places[3]}, reached straight from {places[2]}.",
        f"{name} never lived anywhere except these four cities, and lived in each of them once.",
    ]
    rng.shuffle(statements)
    k = rng.randint(1, 4)
    question = rng.choice(
        (
            f"In which city did {name} live {ordinal(k)}?",
            f"Counting from the earliest, what was {name}'s home number {k}?",
        )
    )
    lead = filler(rng, rng.randint(0, 2))
    meta = {"anchor": places[0], "order": list(places), "k": k, "expected": places[k - 1]}
    return Draft(
        "out_of_order", join(*lead, " ".join(statements), question), [places[k - 1]], "contains", meta
    )


def v4_clock(rng: random.Random) -> Draft:
    """Start time + a duration that crosses noon or midnight, with an interruption to skip over."""
    start = rng.randint(8 * 60, 23 * 60 + 30)
    hours, minutes = rng.randint(1, 5), rng.randint(5, 55)
    pause = rng.choice((0, 15, 20, 30, 45))
    end = (start + hours * 60 + minutes + pause) % (24 * 60)
    fmt = f"{start // 60:02d}:{start % 60:02d}"
    pause_text = (
        f" It was stopped for {pause} minutes halfway, and that pause is not part of the running time."
        if pause
        else ""
    )
    prompt = join(
        *filler(rng, rng.randint(0, 2)),
        f"The {rng.choice(('film', 'meeting', 'concert', 'game', 'class'))} started at {fmt} and ran for "
        f"{hours} hour{'s' if hours > 1 else ''} and {minutes} minutes.{pause_text}",
        rng.choice(("At what time did it end?", "What time was it when it finished? Use the 24-hour clock.")),
    )
    h24 = f"{end // 60:02d}:{end % 60:02d}"
    h12 = f"{(end // 60) % 12 or 12}:{end % 60:02d}"
    meta = {"anchor": fmt, "gap_minutes": hours * 60 + minutes + pause, "expected": h24}
    return Draft("clock", prompt, list(dict.fromkeys([h24, h12])), "contains", meta)


def v4_age(rng: random.Random) -> Draft:
    """Age in one year → age in another, with the years told out of order."""
    name = rng.choice(NAMES)
    y1, age = rng.randint(1950, 2010), rng.randint(3, 40)
    y2 = y1 + rng.choice((-1, 1)) * rng.randint(4, 25)
    if y2 - y1 + age < 1:
        y2 = y1 + rng.randint(4, 25)
    middle = filler(rng, rng.randint(0, 3))
    prompt = join(
        preamble(rng, 0.5),
        f"In {y1}, {name} turned {age}.",
        *middle,
        rng.choice((f"How old did {name} turn in {y2}?", f"What age did {name} reach in {y2}?")),
    )
    expected = age + (y2 - y1)
    meta = {"anchor": str(y1), "gap_years": y2 - y1, "expected": str(expected)}
    return Draft("age", prompt, [str(expected)], "number", meta)


def v4_shifted_days(rng: random.Random) -> Draft:
    """A weekday sequence with a stride (every 2nd/3rd day) that wraps around the week."""
    start, stride = rng.randrange(7), rng.choice((2, 3, 4))
    n = rng.randint(3, 5)
    shown = [WEEKDAYS[(start + i * stride) % 7] for i in range(n)]
    expected = WEEKDAYS[(start + n * stride) % 7]
    prompt = rng.choice(
        (
            "A class meets on a fixed cycle: {s}, and so on. On which day is the next class?",
            "What comes next in this list of days? {s}, ...",
            "The bin is emptied every few days: {s}. Which day is next?",
        )
    ).format(s=", ".join(shown))
    meta = {"anchor": shown[0], "stride_days": stride, "expected": expected}
    lead = [preamble(rng, 0.7), *filler(rng, rng.choice((0, 0, 1, 2)))]
    return Draft("shifted_days", join(*lead, prompt), [expected], "contains", meta)


V4_FAMILIES = (
    v4_weekday_gap,
    v4_date_rollover,
    v4_broken_sequence,
    v4_out_of_order,
    v4_clock,
    v4_age,
    v4_shifted_days,
)
