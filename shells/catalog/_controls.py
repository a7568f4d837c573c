# pyright: strict
"""Generator for the benign controls: same chat style and length range as the shells, nothing to trip on.

Each control family mirrors one shell's surface (``meta["mirrors"]``) without its failure trigger: the
fact sits right before the question instead of far behind it, two sources agree instead of conflicting,
the list is short, the sequence is unbroken, there is exactly one instruction, and reasoning is read
once instead of reflected on in a loop. Filler passages (when present) come first and are clearly
separate from the question.
"""

from __future__ import annotations

import random

from ._text import EASY_QA, FILLER, NAMES, WEEKDAYS, WORDS, Draft, filler, join, preamble
from ._values import NUMERIC_ATTRIBUTES

_WRAP = (
    "{q}",
    "Quick question: {q}",
    "Can you help me with something simple? {q}",
    "{q} Please answer briefly.",
    "I am checking a small fact for a quiz. {q}",
)
_SEPARATE = ("Now a separate question.", "Unrelated to the reading above:", "Here is my question.")


def _maybe_lead(rng: random.Random, most: int) -> list[str]:
    """0..``most`` filler passages, then a line marking the question as separate (when there are any)."""
    lead = filler(rng, rng.randint(0, most))
    return [*lead, rng.choice(_SEPARATE)] if lead else [preamble(rng, 0.7)]


def c_fact(rng: random.Random) -> Draft:
    question, answers, match = rng.choice(EASY_QA)
    prompt = join(*_maybe_lead(rng, 4), rng.choice(_WRAP).format(q=question))
    return Draft("fact", prompt, list(answers), match, {"mirrors": "none"})


def c_near_fact(rng: random.Random) -> Draft:
    """v1 without the decay: the key/value is stated right before the question."""
    name = rng.choice(NAMES)
    key = rng.choice(("locker code", "door code", "table number", "seat number", "ticket number"))
    value = str(rng.randint(100, 9999))
    fact = f"{name}'s {key} is {value}."
    question = rng.choice(("What is {n}'s {k}?", "Which number is {n}'s {k}?")).format(n=name, k=key)
    prompt = join(*_maybe_lead(rng, 5), f"{fact} {question}")
    return Draft("near_fact", prompt, [value], "number", {"mirrors": "v1_memtrace", "value": value})


def c_consistent_value(rng: random.Random) -> Draft:
    """v2 without the conflict: two sources give the same value."""
    subject, predicate, question, lo, hi = rng.choice(NUMERIC_ATTRIBUTES)
    v = str(rng.randint(lo, hi))
    both = rng.choice(
        (
            f"The first report says {subject} {predicate.format(v=v)}. A second report agrees: {v}.",
            f"According to the guidebook, {subject} {predicate.format(v=v)}. The newspaper gives the same "
            "figure.",
            f"{subject.capitalize()} {predicate.format(v=v)}.",
        )
    )
    prompt = join(*_maybe_lead(rng, 4), both, question)
    return Draft("consistent_value", prompt, [v], "number", {"mirrors": "v2_value_collapse", "value": v})


def c_short_list(rng: random.Random) -> Draft:
    """v3 without the burying: one to three facts, the asked one clearly stated."""
    container = rng.choice(("teapot", "flowerpot", "boot", "biscuit tin", "sock drawer", "birdhouse"))
    others = rng.sample(
        ("The mug is on the shelf.", "The rug is grey.", "The lamp is by the window."), rng.randint(0, 2)
    )
    facts = [f"The spare key is inside the {container}.", *others]
    rng.shuffle(facts)
    prompt = join(*_maybe_lead(rng, 5), " ".join(facts), "Where is the spare key?")
    return Draft("short_list", prompt, [container], "contains", {"mirrors": "v3_layer_salience"})


def c_sequence(rng: random.Random) -> Draft:
    """v4 without the dislocation: an unbroken sequence or a one-step time question."""
    kind = rng.randrange(3)
    if kind == 0:
        a, step, n = rng.randint(1, 40), rng.randint(2, 9), rng.randint(4, 6)
        seq = ", ".join(str(a + i * step) for i in range(n))
        body, answers, match = (
            f"What number comes next in this list? {seq}, ...",
            [str(a + n * step)],
            "number",
        )
    elif kind == 1:
        d = rng.randrange(7)
        body = rng.choice(
            ("Today is {d}. What day of the week is tomorrow?", "Which day comes right after {d}?")
        )
        body, answers, match = body.format(d=WEEKDAYS[d]), [WEEKDAYS[(d + 1) % 7]], "contains"
    else:
        h = rng.randint(8, 18)
        body = f"A class starts at {h}:00 and lasts exactly one hour. At what time does it end?"
        answers, match = [f"{h + 1}:00", *([f"{(h + 1) - 12}:00"] if h + 1 > 12 else [])], "contains"
    return Draft(
        "sequence", join(*_maybe_lead(rng, 4), body), answers, match, {"mirrors": "v4_temporal_inference"}
    )


def c_one_instruction(rng: random.Random) -> Draft:
    """v5 without the conflict: exactly one instruction, at the end, next to what it is about."""
    kind = rng.randrange(3)
    if kind == 0:
        topic, text = rng.choice(FILLER)
        ask = rng.choice(
            (
                "In one word, what is the paragraph above about?",
                "Name the topic of this paragraph in one word.",
            )
        )
        return Draft(
            "one_instruction", join(text, ask), [topic], "contains", {"mirrors": "v5_instruction_disruption"}
        )
    word = rng.choice(WORDS)
    if kind == 1:
        body = rng.choice((f"Reply with the word '{word}'.", f"Write the word {word} in capital letters."))
        return Draft(
            "one_instruction",
            join(*_maybe_lead(rng, 4), body),
            [word],
            "contains",
            {"mirrors": "v5_instruction_disruption"},
        )
    question, answers, match = rng.choice(EASY_QA)
    body = f"{rng.choice(('Answer in one word.', 'Answer in one short sentence.', 'Be brief.'))} {question}"
    return Draft(
        "one_instruction",
        join(*_maybe_lead(rng, 4), body),
        list(answers),
        match,
        {"mirrors": "v5_instruction_disruption"},
    )


def c_worked_sum(rng: random.Random) -> Draft:
    """The meta-shell without the loop: read a worked sum once and state its result."""
    x, y, z = rng.randint(3, 30), rng.randint(3, 30), rng.randint(2, 9)
    steps = (
        f"Step 1: start with {x}.\nStep 2: add {y}, which gives {x + y}.\n"
        f"Step 3: multiply by {z}, which gives {(x + y) * z}."
    )
    ask = rng.choice(("What result do these steps reach?", "What is the final number in the working above?"))
    prompt = join(*_maybe_lead(rng, 2), "Here is a worked calculation:", steps, ask)
    return Draft("worked_sum", prompt, [str((x + y) * z)], "number", {"mirrors": "meta_shell"})


def c_arithmetic(rng: random.Random) -> Draft:
    a, b = rng.randint(2, 50), rng.randint(2, 50)
    op = rng.choice(("plus", "times", "minus"))
    result = {"plus": a + b, "times": a * b, "minus": a - b}[op]
    question = rng.choice(("What is {a} {op} {b}?", "Please work out {a} {op} {b}.")).format(a=a, op=op, b=b)
    prompt = join(*_maybe_lead(rng, 4), rng.choice(_WRAP).format(q=question))
    return Draft("arithmetic", prompt, [str(result)], "number", {"mirrors": "none"})


CONTROL_FAMILIES = (
    c_fact,
    c_near_fact,
    c_consistent_value,
    c_short_list,
    c_sequence,
    c_one_instruction,
    c_worked_sum,
    c_arithmetic,
)
