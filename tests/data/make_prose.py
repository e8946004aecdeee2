"""Writes the tests' small text corpus, tests/data/prose/: original English prose about an invented coast, made
from the sentence patterns and words below by a seeded generator (deterministic: running it again rewrites the
same bytes). `python tests/data/make_prose.py` from the repository root.

The two files carry the names that `llama_surgery_jax.io.corpora` reads from a --data-dir folder (wiki.valid.tokens for
training, wiki.test.raw for evaluation): only that file layout is borrowed; every sentence comes from here.
"""

from __future__ import annotations

import random
from pathlib import Path

OUT = Path(__file__).resolve().parent / "prose"

TOWNS = ["Harrowby", "Saltmere", "Kelding", "Oxwater", "Brannock", "Duncairn", "Fellhaven", "Marrow Cross",
         "Windle", "Ashcombe", "Greyport", "Lantry", "Caddon", "Holloway Bay", "Pellingford", "Scarth"]
RIVERS = ["the Lune", "the Wendle", "the Orrin", "the Cask", "the Silverburn", "the Tamble"]
HILLS = ["Crow Fell", "the Long Rigg", "Beacon Knoll", "Harrow Edge", "the Blackstone Moor", "Tod Hill"]
FIRST = ["Agnes", "Thomas", "Margaret", "William", "Eliza", "Robert", "Hannah", "Samuel", "Ruth", "Edward",
         "Martha", "Joseph", "Clara", "Henry", "Alice", "Walter", "Mary", "Arthur", "Ellen", "George"]
LAST = ["Fenwick", "Marsh", "Calder", "Holt", "Ashby", "Pryor", "Whitlock", "Dunmore", "Trent", "Lisle",
        "Garside", "Rook", "Hebden", "Coyle", "Tulley", "Brand"]
TRADES = ["weaver", "miller", "schoolteacher", "ferryman", "blacksmith", "surveyor", "harbour master", "printer",
          "carpenter", "shepherd", "clockmaker", "chemist", "net maker", "stonemason", "baker", "doctor"]
BUILDINGS = ["mill", "chapel", "library", "market hall", "lighthouse", "bridge", "school", "granary", "inn",
             "station", "harbour wall", "town hall", "rope walk", "water tower", "museum", "bathhouse"]
GOODS = ["wool", "salt", "barley", "slate", "herring", "timber", "linen", "coal", "cheese", "leather", "oysters",
         "apples", "lime", "flax", "honey", "iron nails"]
ADJ = ["old", "narrow", "quiet", "busy", "grey", "stone", "broad", "crooked", "windy", "small", "handsome",
       "plain", "sturdy", "muddy", "bright", "long", "low", "steep", "famous", "modest"]
WEATHER = ["a hard frost", "three weeks of rain", "an early snow", "a dry summer", "a great storm from the west",
           "a warm autumn", "fog that lasted for days", "a flood in the spring", "a gale that broke the pier",
           "a mild winter"]
SEASONS = ["spring", "summer", "autumn", "winter"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
GROUPS = ["the fishermen", "the farmers of the upper valley", "the mill workers", "the parish council",
          "the children of the school", "the traders", "the railway company", "a society of naturalists",
          "the lifeboat crew", "the women of the lace guild", "the town band", "the ferry company"]
VERBS_PAST = ["built", "repaired", "rebuilt", "painted", "extended", "opened", "enlarged", "restored", "moved",
              "closed", "sold", "measured"]
FEELINGS = ["proud of", "worried about", "fond of", "tired of", "curious about", "grateful for", "amused by"]
ANIMALS = ["gulls", "curlews", "seals", "sheep", "ponies", "otters", "herons", "hares", "geese", "oystercatchers"]
TOPICS = ["the tides", "the price of bread", "the new road", "the old families", "the weather", "the harvest",
          "the railway", "the lighthouse keeper", "the summer fair", "the county election", "the long winter"]
CONNECT = ["However,", "Later that year,", "By then,", "In the same decade,", "Even so,", "For a time,",
           "Before long,", "At first,", "In the end,", "Meanwhile,", "Afterwards,", "Some years later,"]
BOOKS = ["a history of the parish", "a book of local songs", "a guide to the coast path", "a diary of the floods",
         "a list of every ship lost on the sands", "a study of the birds of the estuary", "a cookery book"]


UNITS = ["", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def spelled(rng: random.Random, low: int, high: int) -> str:
    """A whole number in [low, high] (≤ 99) in words, as prose writes small numbers."""
    n = rng.randint(low, high)
    if n < 20:
        return UNITS[n]
    return TENS[n // 10] + ("-" + UNITS[n % 10] if n % 10 else "")


def person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


def year(rng: random.Random) -> int:
    return rng.randint(1781, 1938)


def sentences(rng: random.Random, town: str, count: int) -> list[str]:
    """`count` sentences about `town`, each from another of the patterns below."""
    r = rng
    patterns = [
        lambda: f"The {r.choice(ADJ)} {r.choice(BUILDINGS)} of {town} was {r.choice(VERBS_PAST)} in {year(r)}.",
        lambda: f"{person(r)}, a {r.choice(TRADES)} from {r.choice(TOWNS)}, settled in {town} as a young "
                f"{r.choice(['man', 'woman'])} and stayed for {spelled(r, 3, 40)} years.",
        lambda: f"Most of the {r.choice(GOODS)} sold in {town} came down {r.choice(RIVERS)} on flat boats.",
        lambda: f"One {r.choice(MONTHS)} {r.choice(WEATHER)} kept the boats in the harbour, and "
                f"{r.choice(GROUPS)} waited for better days.",
        lambda: f"From the top of {r.choice(HILLS)} you can see {town}, {r.choice(RIVERS)} and, on a clear day, "
                f"the roofs of {r.choice(TOWNS)}.",
        lambda: f"{r.choice(GROUPS).capitalize()} met every {r.choice(SEASONS)} in the {r.choice(BUILDINGS)} to "
                f"talk about {r.choice(TOPICS)}.",
        lambda: f"The road from {town} to {r.choice(TOWNS)} is {spelled(r, 2, 29)} miles long and crosses "
                f"{r.choice(RIVERS)} twice.",
        lambda: f"{person(r)} wrote {r.choice(BOOKS)}, which is still kept in the {r.choice(BUILDINGS)}.",
        lambda: f"People in {town} were {r.choice(FEELINGS)} their {r.choice(BUILDINGS)}, though few of them "
                f"had seen it built.",
        lambda: f"Each {r.choice(SEASONS)} the marsh below the town filled with {r.choice(ANIMALS)} and "
                f"{r.choice(ANIMALS)}.",
        lambda: f"There were about {spelled(r, 12, 95)} houses in {town} when the first map was drawn, and "
                f"{spelled(r, 2, 9)} of them were inns.",
        lambda: f"The trade in {r.choice(GOODS)} made the town rich for a while, but it ended when the "
                f"{r.choice(BUILDINGS)} closed.",
        lambda: f"Children walked {spelled(r, 2, 6)} miles to the {r.choice(ADJ)} school at "
                f"{r.choice(TOWNS)} until one was opened in {town}.",
        lambda: f"A fair was held on the green every {r.choice(MONTHS)}, with music, races and a sale of "
                f"{r.choice(GOODS)}.",
        lambda: f"{person(r)} kept the {r.choice(BUILDINGS)} for {spelled(r, 4, 35)} years and never once missed "
                f"a morning.",
        lambda: f"When the railway reached {town} in {year(r)}, the carriers lost most of their work.",
        lambda: f"The {r.choice(ADJ)} streets near the water still follow the lines of the old "
                f"{r.choice(['timber', 'coal', 'slate', 'rope', 'salt', 'lime'])} yards.",
        lambda: f"Visitors came for the {r.choice(ANIMALS)} on the sands and the view of {r.choice(HILLS)}.",
        lambda: f"It is said that {person(r)} once walked from {town} to {r.choice(TOWNS)} in a single night "
                f"to fetch a {r.choice(TRADES)}.",
        lambda: f"The {r.choice(BUILDINGS)} burned down in {year(r)}; it was "
                f"{r.choice(['rebuilt', 'restored', 'repaired'])} with money raised by {r.choice(GROUPS)}.",
        lambda: f"Nobody agrees on where the name {town} comes from, but many think it means "
                f"\"the {r.choice(ADJ)} ford\".",
        lambda: f"{r.choice(CONNECT)} the price of {r.choice(GOODS)} fell by a third, and many families moved "
                f"to {r.choice(TOWNS)}.",
        lambda: f"{r.choice(CONNECT)} the council paid {spelled(r, 20, 99)} pounds for a new "
                f"{r.choice(BUILDINGS)}.",
        lambda: f"{r.choice(CONNECT)} {person(r)} opened a shop that sold {r.choice(GOODS)} and "
                f"{r.choice(GOODS)}.",
    ]
    return [pattern() for pattern in rng.sample(patterns, count)]


def paragraph(rng: random.Random) -> str:
    return " ".join(sentences(rng, rng.choice(TOWNS), rng.randint(4, 8)))


def corpus(seed: int, size: int) -> str:
    """Paragraphs separated by blank lines, at least `size` characters."""
    rng = random.Random(seed)
    parts, length = [], 0
    while length < size:
        text = paragraph(rng)
        parts.append(text)
        length += len(text) + 2
    return "\n\n".join(parts) + "\n"


def main() -> None:
    OUT.mkdir(exist_ok=True)
    (OUT / "wiki.valid.tokens").write_text(corpus(1, 36_000), encoding="utf-8")  # training text
    (OUT / "wiki.test.raw").write_text(corpus(2, 18_000), encoding="utf-8")  # evaluation text


if __name__ == "__main__":
    main()
