"""An offline E2E-like dataset: restaurant meaning representations -> varied English sentences.

Same surface format as the E2E NLG challenge (`name[...], eatType[...], ...` -> text), deterministic by
seed, so the default job runs on a fresh machine with no download. The realizer picks among several
phrasings and clause orders, so the mapping is learnable but not a lookup table.
"""

from __future__ import annotations

import random

NAMES = ["The Eagle", "Blue Spice", "The Mill", "Loch Fyne", "The Punter", "Green Man", "The Olive Grove",
         "Zizzi", "Fitzbillies", "The Phoenix", "Alimentum", "Aromi", "Bibimbap House", "The Wrestlers",
         "Cotto", "Giraffe", "Strada", "The Golden Curry", "Midsummer House", "Clowns"]
EAT_TYPES = ["restaurant", "pub", "coffee shop"]
FOODS = ["English", "French", "Italian", "Chinese", "Indian", "Japanese", "Fast food"]
PRICES = ["cheap", "moderate", "high", "less than £20", "£20-25", "more than £30"]
RATINGS = ["low", "average", "high", "1 out of 5", "3 out of 5", "5 out of 5"]
AREAS = ["city centre", "riverside"]

CLAUSES = {
    "food": ["serves {v} food", "offers {v} cuisine", "provides {v} dishes"],
    "priceRange": ["has a {v} price range", "has prices in the {v} range", "is in the {v} price range"],
    "customer rating": ["has a {v} customer rating", "is rated {v} by customers", "has received a {v} rating"],
    "area": ["is located in the {v}", "can be found in the {v}", "is in the {v} area"],
    "familyFriendly": {"yes": ["is family friendly", "welcomes children", "is kid friendly"],
                       "no": ["is not family friendly", "does not welcome children", "is not kid friendly"]},
    "near": ["is near {v}", "is close to {v}", "sits next to {v}"],
}


def _draw_mr(rng: random.Random) -> dict[str, str]:
    name = rng.choice(NAMES)
    mr = {"name": name, "eatType": rng.choice(EAT_TYPES)}
    options = {
        "food": lambda: rng.choice(FOODS),
        "priceRange": lambda: rng.choice(PRICES),
        "customer rating": lambda: rng.choice(RATINGS),
        "area": lambda: rng.choice(AREAS),
        "familyFriendly": lambda: rng.choice(["yes", "no"]),
        "near": lambda: rng.choice([n for n in NAMES if n != name]),
    }
    for key in rng.sample(list(options), k=rng.randint(1, 5)):
        mr[key] = options[key]()
    return mr


def format_mr(mr: dict[str, str]) -> str:
    order = ["name", "eatType", "food", "priceRange", "customer rating", "area", "familyFriendly", "near"]
    return ", ".join(f"{k}[{mr[k]}]" for k in order if k in mr)


def _realize(mr: dict[str, str], rng: random.Random) -> str:
    clauses = []
    for key, value in mr.items():
        if key in ("name", "eatType"):
            continue
        choices = CLAUSES[key][value] if key == "familyFriendly" else CLAUSES[key]
        clauses.append(rng.choice(choices).format(v=value))
    rng.shuffle(clauses)
    opener = rng.choice(["{n} is a {t}", "There is a {t} called {n}", "{n} is a {t} that"])
    head = opener.format(n=mr["name"], t=mr["eatType"])
    if opener.endswith("that"):
        first, rest = clauses[0], clauses[1:]
        text = f"{head} {first}"
    else:
        text, rest = head, clauses
    if len(rest) > 2 and rng.random() < 0.5:  # split into two sentences
        mid = len(rest) // 2
        text += (" and " if opener.endswith("that") else " that ") + " and ".join(rest[:mid]) + "."
        text += " It " + " and ".join(rest[mid:]) + "."
    elif rest:
        joiner = " and " if opener.endswith("that") else " that "
        text += joiner + (", ".join(rest[:-1]) + " and " + rest[-1] if len(rest) > 1 else rest[0]) + "."
    else:
        text += "."
    return text


def synthetic_e2e(n: int, seed: int) -> list[tuple[str, str]]:
    """n (mr, ref) pairs, identical for the same (n, seed)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        mr = _draw_mr(rng)
        rows.append((format_mr(mr), _realize(mr, rng)))
    return rows
