# pyright: strict
"""Generators for v1.MEMTRACE (decayed recall) and v3.LAYER-SALIENCE (a salient fact among trivia).

v1 states a key/value at the very start and asks for it after 1–5 filler passages, so the value is
always far from the question. v3 keeps everything in one dense block of look-alike, low-salience facts
with the one fact that matters somewhere in the middle, phrased just as blandly as the rest.
"""

from __future__ import annotations

import random

from ._text import COLORS, NAMES, WORDS, Draft, article, filler, join, n_words, pick

# --- v1.MEMTRACE -------------------------------------------------------------------------------------

_NUMBER_KEYS = (
    "locker code", "door code", "bike lock combination", "hotel room number", "table number",
    "ticket number", "parcel number", "seat number", "gate code", "account PIN",
)  # fmt: skip
_OPENERS = (
    "Please keep this in mind: {fact}",
    "Before we start, one detail: {fact}",
    "{fact}",
    "Note for later: {fact}",
    "Here is something you will need at the end. {fact}",
)
_NUMBER_QUESTIONS = (
    "What is {name}'s {key}?",
    "Going back to the very beginning: what was {name}'s {key}? Reply with the number only.",
    "Quick question about the start of this message. Which number was {name}'s {key}?",
    "Now tell me {name}'s {key}.",
)


def _recall(rng: random.Random, family: str, fact: str, question: str, key: str, value: str) -> Draft:
    """Fact first, ``k`` filler passages, question last (the shape every v1 family shares)."""
    k = rng.randint(1, 5)
    passages = filler(rng, k)
    opener = rng.choice(_OPENERS).format(fact=fact)
    bridge = rng.choice(("", "Some unrelated reading follows.", "Now, something else entirely."))
    prompt = join(opener, bridge, *passages, question)
    meta = {
        "key": key,
        "value": value,
        "distractor_passages": k,
        "distractor_words": n_words(" ".join(passages)),
    }
    return Draft(family, prompt, [value], "number" if value.isdigit() else "contains", dict(meta))


def v1_number(rng: random.Random) -> Draft:
    name, key = rng.choice(NAMES), rng.choice(_NUMBER_KEYS)
    value = str(rng.randint(100, 9999))
    fact = rng.choice(("{name}'s {key} is {v}.", "The {key} {name} was given is {v}.")).format(
        name=name, key=key, v=value
    )
    question = rng.choice(_NUMBER_QUESTIONS).format(name=name, key=key)
    return _recall(rng, "number_key", fact, question, key, value)


def v1_password(rng: random.Random) -> Draft:
    place = rng.choice(("garden shed", "staff room", "wifi network", "club house", "boat locker", "attic"))
    word = rng.choice(WORDS)
    fact = rng.choice(
        (
            "The password for the {p} is '{w}'.",
            "If anyone asks, the word that opens the {p} is {w}.",
            "The {p} password was changed to {w} this morning.",
        )
    ).format(p=place, w=word)
    question = rng.choice(
        ("What is the password for the {p}?", "Which word opens the {p}? One word, please.")
    ).format(p=place)
    return _recall(rng, "password", fact, question, f"{place} password", word)


def v1_attribute(rng: random.Random) -> Draft:
    name = rng.choice(NAMES)
    pet = rng.choice(("cat", "dog", "parrot", "goat", "tortoise", "rabbit"))
    word = rng.choice(WORDS).capitalize()
    fact = rng.choice(("{n} has a {p} called {w}.", "{n}'s {p} is named {w}.")).format(n=name, p=pet, w=word)
    question = rng.choice(("What is the name of {n}'s {p}?", "What did {n} call the {p}?")).format(
        n=name, p=pet
    )
    return _recall(rng, "pet_name", fact, question, f"{name}'s {pet}", word)


def v1_interference(rng: random.Random) -> Draft:
    """Three look-alike key/values up front; the question asks for one of them (recall under interference)."""
    items = pick(rng, ("tent", "stove", "maps", "rope", "lamp", "first-aid kit", "water filter"), 3)
    numbers = [str(n) for n in rng.sample(range(11, 99), 3)]
    fact = "Three lockers hold the camping gear: " + ", ".join(
        f"locker {n} holds the {item}" for n, item in zip(numbers, items, strict=True)
    )
    target = rng.randrange(3)
    question = rng.choice(
        ("Which locker holds the {i}?", "Someone needs the {i}. Which locker number should they open?")
    ).format(i=items[target])
    return _recall(
        rng, "interference", fact + ".", question, f"locker of the {items[target]}", numbers[target]
    )


def v1_story(rng: random.Random) -> Draft:
    name, street = rng.choice(NAMES), rng.choice(("Mill Lane", "Harbor Road", "Elm Street", "Quarry Way"))
    number = str(rng.randint(2, 240))
    fact = (
        f"At the start of the trip, {name} wrote an address on a card: number {number}, {street}. "
        "The card went into a coat pocket and was not looked at again for a long time."
    )
    question = rng.choice(
        (f"What house number was written on {name}'s card?", f"On {street}, which number was on the card?")
    )
    return _recall(rng, "story_address", fact, question, f"house number on {street}", number)


V1_FAMILIES = (v1_number, v1_password, v1_attribute, v1_interference, v1_story)

# --- v3.LAYER-SALIENCE -------------------------------------------------------------------------------

_OBJECTS = (
    "mug", "towel", "lamp", "chair", "basket", "umbrella", "blanket", "vase", "bucket", "kettle", "rug",
    "bowl", "jacket", "stool", "tray", "clock", "curtain", "pillow", "bottle", "notebook", "scarf",
)  # fmt: skip
_SPOTS = (
    "on the shelf",
    "by the window",
    "under the table",
    "in the hallway",
    "next to the door",
    "on the desk",
)
_HABITS = (
    "likes tea", "walks to work", "reads before bed", "grows tomatoes", "takes the bus", "sings in a choir",
    "keeps a diary", "plays the piano", "collects stamps", "swims on Sundays", "bakes bread", "paints walls",
)  # fmt: skip


def _trivia(rng: random.Random, n: int) -> list[str]:
    """``n`` look-alike household facts ('The grey mug is on the shelf.'), each colored object once."""
    seen: dict[tuple[str, str], str] = {}  # dict, not set: insertion order keeps the output deterministic
    while len(seen) < n:
        obj, color, spot = rng.choice(_OBJECTS), rng.choice(COLORS), rng.choice(_SPOTS)
        if (color, obj) not in seen:
            template = rng.choice(("The {c} {o} is {s}.", "There is {a} {c} {o} {s}."))
            seen[color, obj] = template.format(a=article(color), c=color, o=obj, s=spot)
    return list(seen.values())


def _bury(
    rng: random.Random,
    family: str,
    facts: list[str],
    salient: str,
    question: str,
    answers: list[str],
    match: str = "contains",
) -> Draft:
    """Put ``salient`` at a middle position of ``facts`` (never the first or last 20 %)."""
    n = len(facts)
    pos = rng.randint(max(1, n // 5), max(1, n - n // 5 - 1))
    body = [*facts[:pos], salient, *facts[pos:]]
    lead = rng.choice(("Here are some notes.", "Notes from the walk-through:", "List of observations:", ""))
    sep = rng.choice((" ", "\n"))
    prompt = join(lead, sep.join(body), question)
    meta = {"salient_fact": salient, "n_facts": n + 1, "position": pos}
    return Draft(family, prompt, answers, match, dict(meta))


def v3_hidden_key(rng: random.Random) -> Draft:
    container = rng.choice(("teapot", "flowerpot", "boot", "biscuit tin", "sock drawer", "birdhouse"))
    color = rng.choice(COLORS)
    salient = rng.choice(
        ("The spare key is inside the {c} {t}.", "The {c} {t} has the spare key in it.")
    ).format(c=color, t=container)
    question = rng.choice(("Where is the spare key?", "Where should I look for the spare key?"))
    return _bury(rng, "hidden_key", _trivia(rng, rng.randint(8, 30)), salient, question, [container])


def v3_roster(rng: random.Random) -> Draft:
    people = pick(rng, NAMES, rng.randint(8, 22))
    holder, others = people[0], people[1:]
    facts = [f"{p} {rng.choice(_HABITS)}." for p in others]
    salient = rng.choice(
        ("{h} has the only key to the server room.", "The server room can only be opened by {h}.")
    ).format(h=holder)
    question = rng.choice(("Who can open the server room?", "Which person has the key to the server room?"))
    return _bury(rng, "roster", facts, salient, question, [holder])


_EVENTS = (
    ("back door found open", "the back door found open"),
    ("smoke alarm beeping", "the smoke alarm heard beeping"),
    ("water on the basement floor", "water seen on the basement floor"),
)
_ROUTINE = (
    "hallway light checked, normal", "kitchen tap checked, normal", "front gate checked, closed",
    "heating checked, normal", "windows checked, closed", "printer checked, normal",
)  # fmt: skip


def v3_log(rng: random.Random) -> Draft:
    n = rng.randint(8, 24)
    minutes = sorted(rng.sample(range(0, 180), n + 1))
    times = [f"{8 + m // 60:02d}:{m % 60:02d}" for m in minutes]
    target = rng.randint(max(1, n // 5), n - n // 5 - 1)
    event, subject = rng.choice(_EVENTS)
    lines = [f"{t} {rng.choice(_ROUTINE)}." for i, t in enumerate(times) if i != target]
    # not _bury: a log must stay in time order, so the event keeps its own slot
    answers = list(dict.fromkeys([times[target], times[target].lstrip("0")]))
    question = rng.choice(("At what time was {s}?", "When was {s}? Give the time.")).format(s=subject)
    prompt = join(
        rng.choice(("Night shift log:", "Building check log:", "")),
        "\n".join([*lines[:target], f"{times[target]} {event}.", *lines[target:]]),
        question,
    )
    meta = {"salient_fact": f"{times[target]} {event}.", "n_facts": n + 1, "position": target}
    return Draft("log", prompt, answers, "contains", dict(meta))


_DISHES = (
    "soup", "salad", "curry", "pie", "risotto", "omelette", "stew", "tart", "lasagne", "chowder",
    "flatbread", "goulash", "casserole", "porridge",
)  # fmt: skip


def v3_menu(rng: random.Random) -> Draft:
    dishes = pick(rng, _DISHES, rng.randint(8, 12))
    notes = ("is served warm", "comes with bread", "is made fresh daily", "is popular at lunch", "is mild")
    facts = [f"The {d} {rng.choice(notes)}." for d in dishes[1:]]
    for d in rng.sample(dishes[1:], 4):
        c = rng.choice(COLORS)
        facts.append(f"The {d} is served in {article(c)} {c} bowl.")
    facts = list(dict.fromkeys(facts))
    rng.shuffle(facts)
    salient = f"The {dishes[0]} contains peanuts."
    question = rng.choice(
        ("Which dish contains peanuts?", "A guest is allergic to peanuts. Which dish must they avoid?")
    )
    return _bury(rng, "menu", facts, salient, question, [dishes[0]])


def v3_sensor(rng: random.Random) -> Draft:
    n = rng.randint(8, 24)
    ids = rng.sample(range(1, 60), n + 1)
    facts = [f"Sensor {i} read {rng.randint(20, 60)}, within the limit." for i in ids[1:]]
    salient = f"Sensor {ids[0]} read {rng.randint(91, 99)}, above the limit."
    question = rng.choice(("Which sensor was above the limit?", "Which sensor number went over the limit?"))
    return _bury(
        rng, "sensor", facts, salient, question, [str(ids[0])]
    )  # contains: the output repeats the reading


V3_FAMILIES = (v3_hidden_key, v3_roster, v3_log, v3_menu, v3_sensor)
