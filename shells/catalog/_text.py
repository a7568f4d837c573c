# pyright: strict
"""Word lists, filler passages and the ``Draft`` type shared by the catalog generators (build.py).

Everything here is written for this project (no text from evaluation datasets). Filler passages are
plain, low-salience prose: they carry no names, codes or instructions, so a shell's key fact, value or
instruction never appears in them by accident. Each passage has a one-word ``topic`` that occurs in it,
which lets a control ask "what is the paragraph about?" with a checkable answer.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field

Meta = Mapping[str, str | int | bool | list[str]]


def _no_meta() -> Meta:
    return {}


@dataclass(slots=True)
class Draft:
    """One generated prompt before it gets an id and a split (build.py assigns both)."""

    family: str
    """Template family inside the shell (also part of the instance id)."""
    prompt: str
    answers: list[str]
    match: str = "contains"
    meta: Meta = field(default_factory=_no_meta)
    """Generator facts about the text (the key and value, the two instructions, ...) for tests."""


NAMES: tuple[str, ...] = (
    "Amara", "Bilal", "Carmen", "Dmitri", "Elena", "Farid", "Grace", "Hiroshi", "Ines", "Jonas",
    "Kofi", "Leila", "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Samir", "Tessa",
    "Umar", "Vera", "Wanjiru", "Xavier", "Yara", "Zoltan", "Anya", "Bruno", "Chloe", "Diego",
    "Esme", "Felix", "Gita", "Hugo", "Ivy", "Jamal", "Kira", "Luca", "Mei", "Nico",
)  # fmt: skip

WORDS: tuple[str, ...] = (
    "juniper", "lantern", "marmalade", "copper", "thistle", "harbor", "walnut", "saffron", "pebble",
    "falcon", "meadow", "cobalt", "violet", "anchor", "ember", "willow", "quartz", "biscuit", "maple",
    "orchid", "velvet", "compass", "acorn", "glacier", "tulip", "cinnamon", "otter", "sparrow", "clover",
)  # fmt: skip

COLORS: tuple[str, ...] = (
    "red",
    "blue",
    "green",
    "yellow",
    "orange",
    "purple",
    "white",
    "black",
    "grey",
    "brown",
)
WEEKDAYS: tuple[str, ...] = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS: tuple[str, ...] = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip
MONTH_DAYS: tuple[int, ...] = (
    31,
    28,
    31,
    30,
    31,
    30,
    31,
    31,
    30,
    31,
    30,
    31,
)  # a year that is not a leap year
CITIES: tuple[str, ...] = (
    "Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Krakow", "Porto", "Dublin", "Quito", "Seoul",
    "Tunis", "Riga", "Bergen", "Cusco", "Accra", "Kyoto", "Malaga", "Ghent", "Tallinn", "Perth",
)  # fmt: skip

NUMBER_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty",
)  # fmt: skip

# (topic word, passage). 30–60 words each; no names, digits, codes or instructions.
FILLER: tuple[tuple[str, str], ...] = (
    ("bread", "Good bread needs time more than skill. The dough rises slowly in a warm corner, and the "
     "crust darkens in the last minutes of baking. Many bakers say the smell of fresh bread is the best "
     "part of the whole job, better even than the first slice."),
    ("bees", "Bees visit thousands of flowers in a single day. They carry pollen from one plant to the "
     "next, and in doing so they help fruit and seeds to form. A healthy hive hums quietly on warm "
     "afternoons and grows loud when the weather turns."),
    ("rain", "The rain started before dawn and did not stop until evening. Gutters overflowed, the "
     "streets shone like glass, and people hurried from doorway to doorway with their coats pulled over "
     "their heads. By night the air smelled of wet leaves."),
    ("garden", "A small garden can feed a family for much of the summer. Beans climb the fence, "
     "lettuce grows in the shade of taller plants, and herbs fill the gaps between the stones. The "
     "hardest part is keeping the snails away from the young leaves."),
    ("river", "The river bends twice before it reaches the town. In spring it runs fast and brown with "
     "melted snow, and in late summer it slows down so much that children can wade across the shallow "
     "parts without getting their knees wet."),
    ("library", "The old library has tall windows and creaking floors. Readers sit at long wooden "
     "tables, and the only sounds are pages turning and the occasional cough. Some of the books on the "
     "top shelves have not been opened in many years."),
    ("trains", "Night trains used to cross the country while passengers slept in narrow bunks. Tickets "
     "were cheap, the coffee was weak, and the view at sunrise made up for the noise of the wheels. "
     "Some routes are now running again."),
    ("owls", "Owls hunt mostly at night. Their soft feathers let them fly almost without sound, and "
     "their large eyes gather what little light there is. During the day they rest in hollow trees or "
     "old barns, hidden from the birds that would chase them."),
    ("soup", "A pot of soup is a good way to use whatever is left in the kitchen. Onions, carrots and a "
     "handful of lentils simmer together for an hour, and the result is warm, cheap and filling on a "
     "cold evening."),
    ("mountains", "The mountains look close on a clear morning, but the walk to their foot takes most "
     "of a day. The path climbs through pine forest, then over open grass where sheep graze, and finally "
     "onto loose grey rock."),
    ("markets", "The weekly market fills the square with stalls of fruit, cheese, flowers and old "
     "tools. Sellers call out their prices, buyers squeeze the tomatoes, and by early afternoon the "
     "crowd thins out and the awnings come down."),
    ("tea", "Tea is grown on steep hillsides where the air is cool and damp. The leaves are picked by "
     "hand, dried, and sometimes rolled or smoked. The same plant can give green, black or white tea, "
     "depending on how the leaves are treated."),
    ("bicycles", "Riding a bicycle to work saves money and keeps the body moving. The first weeks are "
     "tiring, especially on hills, but most riders find that their legs get stronger quickly and that "
     "the trip takes less time than they expected."),
    ("clouds", "Clouds form when warm, moist air rises and cools. Thin high clouds often mean fair "
     "weather, while tall dark ones can bring thunder. Watching them drift and change shape is one of "
     "the simplest pleasures of a lazy afternoon."),
    ("pottery", "Making a pot on a wheel takes patience. The clay must be centered before anything "
     "else can happen, and a small wobble at the start becomes a large one at the rim. Beginners often "
     "ruin many pots before one survives the kiln."),
    ("whales", "Whales travel across whole oceans in the course of a year. They feed in cold waters "
     "rich in tiny animals and move to warmer seas to raise their young. Their songs can carry over "
     "great distances underwater."),
    ("chess", "In chess, the opening moves matter less than beginners think. What counts more is "
     "keeping the pieces working together, protecting the king, and noticing when the other player has "
     "left something undefended."),
    ("lighthouses", "Lighthouses once needed keepers who lived beside the lamp and trimmed the wick "
     "every few hours. Today most of them run on their own, and the small cottages at their base have "
     "become museums or holiday homes."),
    ("forests", "A forest changes with every season. In autumn the floor is covered with leaves, in "
     "winter the bare branches let in the low sun, and in spring everything turns green again in what "
     "seems like only a few days."),
    ("snow", "Fresh snow muffles every sound in the street. Cars move slowly, footprints appear on the "
     "pavements, and children drag sleds towards the nearest slope. By the next afternoon the white has "
     "usually turned to grey slush."),
    ("music", "Learning an instrument is mostly about small, regular practice. Playing for a short "
     "time every day works better than a long session once a week, because the hands and ears need "
     "repetition more than effort."),
    ("islands", "Small islands depend on the ferry. When storms cancel the crossing, the shop runs low "
     "on milk and bread, and everyone waits for the sea to calm down. Most islanders keep a well-stocked "
     "cupboard for exactly this reason."),
    ("cheese", "Cheese is a way of keeping milk for months. Curds are pressed, salted and left to age "
     "in cool cellars, where they slowly develop a rind and a stronger taste. Each region has its own "
     "favorite kind."),
    ("kites", "On windy days the hill above the town fills with kites. Some are simple diamonds of "
     "paper and string, others are long dragons with tails that snap in the wind. Getting one into the "
     "air is easier than bringing it down."),
    ("deserts", "Deserts are not empty. Plants store water in thick stems, small animals hide from the "
     "heat in burrows, and after a rare rain the ground can bloom with flowers that last only a few "
     "days."),
    ("museums", "A quiet weekday is the best time to visit a museum. The rooms are nearly empty, the "
     "guards are relaxed, and a visitor can stand in front of a single painting for as long as they "
     "like without anyone pushing past."),
    ("coffee", "Coffee beans are the seeds of a red fruit. After picking, the seeds are dried and "
     "roasted, and the roast decides much of the flavor. Light roasts taste brighter, dark roasts "
     "heavier and more bitter."),
    ("frogs", "Frogs lay their eggs in still water, where the eggs hatch into tadpoles. The tadpoles "
     "swim with tails and breathe through gills, and over several weeks they grow legs, lose the tail "
     "and climb out onto land."),
    ("bridges", "Old stone bridges were built without steel. Their strength comes from the shape of "
     "the arch, which pushes the weight outwards into the banks. Some have carried traffic for "
     "centuries with only small repairs."),
    ("candles", "Candles were once the only light after sunset. People went to bed early to save them, "
     "and a house with many candles burning was a sign of wealth. Today they are mostly used for "
     "comfort rather than need."),
    ("parks", "City parks give people a place to slow down. Paths wind between flower beds, "
     "benches sit in the shade of old trees, and in the middle there is often a pond where ducks wait "
     "for crumbs."),
    ("storms", "Before a storm the air often feels heavy and still. Then the wind arrives, the first "
     "large drops hit the ground, and within minutes the sky is dark. Afterwards the air feels clean and "
     "noticeably cooler."),
    ("boats", "Rowing a boat looks easy from the shore. In practice the oars catch the water at the "
     "wrong angle, the boat turns in circles, and it takes a while to learn to pull with both arms "
     "evenly."),
    ("apples", "Apple trees need a cold winter to fruit well. In spring they cover themselves in pale "
     "blossom, in summer the small green fruit swells, and by autumn the branches bend under the "
     "weight of the harvest."),
    ("maps", "Old maps are full of guesses. Coastlines wander, rivers flow to the wrong seas, and "
     "blank spaces are filled with drawings of strange animals. They show what people believed as much "
     "as what they knew."),
    ("wool", "Wool keeps sheep warm in wind and rain, and it does the same for people. After shearing, "
     "the fleece is washed, combed and spun into yarn, which can then be knitted or woven into almost "
     "anything."),
)  # fmt: skip


def filler(rng: random.Random, k: int, avoid: tuple[str, ...] = ()) -> list[str]:
    """``k`` distinct filler passages in random order, skipping any whose topic is in ``avoid``."""
    pool = [text for topic, text in FILLER if topic not in avoid]
    return rng.sample(pool, k)


def n_words(text: str) -> int:
    """Whitespace word count (the generators size prompts with it; ~1.3 SmolLM2 tokens a word)."""
    return len(text.split())


def pick(rng: random.Random, options: tuple[str, ...] | list[str], k: int = 1) -> list[str]:
    """``k`` distinct picks from ``options``."""
    return rng.sample(list(options), k)


def ordinal(n: int) -> str:
    """1 → '1st', 22 → '22nd', 13 → '13th'."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def date_answers(day: int, month: str) -> list[str]:
    """Accepted spellings of a calendar date: '5 March', 'March 5', '5th March', 'March 5th'."""
    return [f"{day} {month}", f"{month} {day}", f"{ordinal(day)} {month}", f"{month} {ordinal(day)}"]


def add_days(day: int, month_index: int, n: int) -> tuple[int, int]:
    """(day, month index) ``n`` days after the given date in a non-leap year (wraps over New Year)."""
    while n > 0:
        step = min(n, MONTH_DAYS[month_index] - day + 1)
        day += step
        n -= step
        if day > MONTH_DAYS[month_index]:
            day, month_index = 1, (month_index + 1) % 12
    return day, month_index


def join(*parts: str) -> str:
    """Paragraphs separated by one blank line, empty parts dropped."""
    return "\n\n".join(p.strip() for p in parts if p and p.strip())


# (question, accepted answers, match rule): easy, unambiguous questions written for this project.
EASY_QA: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("What color is the sky on a clear day?", ("blue",), "contains"),
    ("How many legs does a spider have?", ("8", "eight"), "contains"),
    ("What is the opposite of hot?", ("cold",), "contains"),
    ("What is seven plus five?", ("12", "twelve"), "contains"),
    ("What is the capital city of France?", ("Paris",), "contains"),
    ("How many days are there in a week?", ("7", "seven"), "contains"),
    ("What do bees make?", ("honey",), "contains"),
    ("What is frozen water called?", ("ice",), "contains"),
    ("Which animal says 'moo'?", ("cow",), "contains"),
    ("What color is fresh grass?", ("green",), "contains"),
    ("How many wheels does a bicycle have?", ("2", "two"), "contains"),
    ("What is the opposite of up?", ("down",), "contains"),
    ("What is ten minus three?", ("7", "seven"), "contains"),
    ("Which season comes after winter?", ("spring",), "contains"),
    ("What is the capital city of Japan?", ("Tokyo",), "contains"),
    ("How many months are there in a year?", ("12", "twelve"), "contains"),
    ("What do cows drink?", ("water",), "contains"),
    ("What is the largest planet in our solar system?", ("Jupiter",), "contains"),
    ("What is two times four?", ("8", "eight"), "contains"),
    ("What gas do people need to breathe?", ("oxygen",), "contains"),
    ("On which continent is Egypt?", ("Africa",), "contains"),
    ("What is the color of a ripe banana?", ("yellow",), "contains"),
    ("How many sides does a triangle have?", ("3", "three"), "contains"),
    ("What do you call a baby cat?", ("kitten",), "contains"),
    ("What is the opposite of night?", ("day",), "contains"),
    ("What is the capital city of Italy?", ("Rome",), "contains"),
    ("Which planet do we live on?", ("Earth",), "contains"),
    ("How many hours are there in a day?", ("24", "twenty-four", "twenty four"), "contains"),
    ("What is nine plus one?", ("10", "ten"), "contains"),
    ("What falls from clouds when it rains?", ("water", "rain", "raindrops"), "contains"),
)


# Neutral opening lines (no facts, values or instructions to trip on), shared by shells and controls so a
# preamble is never a tell of which is which.
PREAMBLES: tuple[str, ...] = (
    "I am putting together a small quiz for a family evening and want to check something before I print it.",
    "My younger brother asked me this at dinner and I was not completely sure, so I am asking you.",
    "This is for a practice sheet I am writing for a study group that meets on weekends.",
    "I have a short question for you, and a clear, direct reply would be perfect.",
    "Please read the following carefully before you reply.",
    "Here is something from my notebook that I would like you to look at.",
    "A colleague sent me this this morning and I would like a second opinion.",
)


def preamble(rng: random.Random, p: float) -> str:
    """A neutral opening line with probability ``p``, else ''."""
    return rng.choice(PREAMBLES) if rng.random() < p else ""


def article(word: str) -> str:
    """'a' or 'an' for ``word`` (by its first letter; good enough for the word lists here)."""
    return "an" if word[:1].lower() in "aeiou" else "a"
