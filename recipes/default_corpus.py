"""The embedded default corpus: short English documents generated from a fixed seed.

``documents(n)`` returns the same ``n`` documents on every machine and Python version (it uses only
``random.Random(seed)`` with ``randrange``/``choice``/``shuffle``, whose outputs Python keeps stable),
so the default recipe needs no download and its numbers are comparable across runs and machines.

Why generated, not shipped text: a few hundred KB of public-domain prose would be a large file in the
repository, and the Python standard library's own texts differ between Python versions. The documents
here are self-written templates with random choices: stories, letters, recipes, travel logs, counting
and arithmetic drills, facts, questions and answers. They have the properties a packing recipe needs:
lengths from a few tokens to several hundred (a few are longer than a 128- or 256-token row, so
splitting is exercised), structure a small model learns within a few dozen steps (the loss falls
visibly), and randomness it cannot memorise (the loss stays above zero on held-out documents).
"""

from __future__ import annotations

import random

__all__ = ["documents", "SEED"]

SEED = 1234

NAMES = [
    "Ada", "Ben", "Cora", "Dev", "Elin", "Finn", "Greta", "Hugo", "Iris", "Jonas", "Kira", "Leo", "Mira",
    "Nils", "Olga", "Pavel", "Quinn", "Rosa", "Sami", "Tess", "Uma", "Viktor", "Wren", "Yara", "Zeno",
    "Anouk", "Bram", "Clio", "Dario", "Esme", "Farah", "Gideon", "Hana", "Ivo", "June", "Kofi", "Lina",
]
ANIMALS = [
    "fox", "owl", "badger", "otter", "heron", "hedgehog", "rabbit", "crow", "beaver", "mole", "lynx",
    "goat", "turtle", "sparrow", "wolf", "bear", "deer", "squirrel", "frog", "swan", "mouse", "seal",
]
PLACES = [
    "forest", "valley", "harbour", "village", "meadow", "mountain", "river bank", "old mill", "lighthouse",
    "orchard", "market", "library", "bakery", "island", "marsh", "canyon", "garden", "station", "bridge",
]
ADJECTIVES = [
    "small", "brave", "curious", "quiet", "clever", "gentle", "lazy", "proud", "shy", "cheerful", "old",
    "young", "tired", "hungry", "careful", "noisy", "patient", "restless", "kind", "stubborn", "wise",
]
COLOURS = ["red", "blue", "green", "yellow", "grey", "white", "black", "brown", "orange", "purple", "silver"]
OBJECTS = [
    "lantern", "basket", "map", "key", "kite", "book", "drum", "boat", "coat", "bell", "box", "compass",
    "ladder", "letter", "ribbon", "shell", "stone", "whistle", "cup", "feather", "clock", "blanket",
]
ACTIVITIES = [
    "collect shiny stones", "watch the clouds", "count the boats", "sing old songs", "read by the fire",
    "bake bread", "fix broken things", "paint the sunset", "climb the tall trees", "swim in the cold lake",
    "draw maps of the hills", "listen to the rain", "plant seeds", "tell long stories", "fly a kite",
]
WEATHER = ["sunny", "rainy", "windy", "foggy", "cold", "warm", "stormy", "cloudy", "bright", "snowy"]
TIMES = ["morning", "evening", "afternoon", "night", "spring", "summer", "autumn", "winter"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
FOODS = [
    "flour", "butter", "sugar", "eggs", "milk", "salt", "apples", "onions", "carrots", "potatoes", "rice",
    "beans", "cheese", "honey", "lemons", "tomatoes", "garlic", "oats", "pepper", "mushrooms", "spinach",
]
DISHES = ["soup", "pie", "stew", "bread", "cake", "porridge", "salad", "pancakes", "biscuits", "curry", "tart"]
COOKING = [
    "Mix the {a} and the {b} in a large bowl.", "Chop the {a} finely.", "Melt the {a} in a pan.",
    "Stir in the {b} and wait for {n} minutes.", "Add a pinch of {a}.", "Bake for {m} minutes until golden.",
    "Let it rest for {n} minutes.", "Pour the {a} over the {b}.", "Boil the {a} for {n} minutes.",
    "Season with {a} and serve warm.", "Whisk the {a} until smooth.", "Fold the {b} in gently.",
]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve"]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _story(r: random.Random) -> str:
    name, animal, place = r.choice(NAMES), r.choice(ANIMALS), r.choice(PLACES)
    friend, fanimal = r.choice(NAMES), r.choice(ANIMALS)
    adj, obj, colour = r.choice(ADJECTIVES), r.choice(OBJECTS), r.choice(COLOURS)
    s = [
        f"Once upon a time, there was a {adj} {animal} named {name}.",
        f"{name} lived in the {place} with a friend, a {r.choice(ADJECTIVES)} {fanimal} called {friend}.",
        f"Every {r.choice(TIMES)}, {name} liked to {r.choice(ACTIVITIES)}.",
    ]
    events = [
        lambda: f"One {r.choice(WEATHER)} day, {name} found a {colour} {obj} near the {r.choice(PLACES)}.",
        lambda: f"\"Look at this {obj}!\" said {name}. \"I think it belongs to someone.\"",
        lambda: f"{friend} the {fanimal} said, \"Let us take it to the {r.choice(PLACES)}.\"",
        lambda: f"So {name} and {friend} walked for {r.randrange(2, 12)} hours until they reached the "
                f"{r.choice(PLACES)}.",
        lambda: f"On the way, they met a {r.choice(ADJECTIVES)} {r.choice(ANIMALS)} who wanted to "
                f"{r.choice(ACTIVITIES)}.",
        lambda: f"The sky became {r.choice(WEATHER)}, and {name} felt {r.choice(ADJECTIVES)}.",
        lambda: f"{friend} laughed and said that a {colour} {obj} is the best thing to find on a {r.choice(DAYS)}.",
        lambda: f"They stopped to {r.choice(ACTIVITIES)} and to share some {r.choice(FOODS)}.",
        lambda: f"At the {r.choice(PLACES)}, an old {r.choice(ANIMALS)} told them a story about the {r.choice(TIMES)}.",
        lambda: f"{name} put the {obj} in a {r.choice(COLOURS)} {r.choice(OBJECTS)} to keep it safe.",
    ]
    for _ in range(r.randrange(0, 7)):
        s.append(r.choice(events)())
    s.append(r.choice([
        f"In the end, {name} gave the {obj} to its owner, and everyone was happy.",
        f"From that day on, {name} and {friend} were the best of friends.",
        f"And that is why the {animal}s of the {place} still {r.choice(ACTIVITIES)} every {r.choice(TIMES)}.",
        f"{name} went home, tired but {r.choice(ADJECTIVES)}, and slept until the {r.choice(TIMES)}.",
    ]))
    return " ".join(s)


def _letter(r: random.Random) -> str:
    to, frm = r.choice(NAMES), r.choice(NAMES)
    place = r.choice(PLACES)
    lines = [f"Dear {to},", "", f"I hope this letter finds you well. The weather at the {place} has been "
             f"{r.choice(WEATHER)} all week."]
    for _ in range(r.randrange(0, 6)):
        lines.append(r.choice([
            f"On {r.choice(DAYS)} I went to the {r.choice(PLACES)} to {r.choice(ACTIVITIES)}.",
            f"I saw a {r.choice(ADJECTIVES)} {r.choice(ANIMALS)} carrying a {r.choice(COLOURS)} {r.choice(OBJECTS)}.",
            f"Do you still remember the {r.choice(OBJECTS)} we found in the {r.choice(PLACES)}?",
            f"My neighbour baked a {r.choice(DISHES)} with {r.choice(FOODS)} and {r.choice(FOODS)}.",
            f"I have been learning to {r.choice(ACTIVITIES)}, and it is harder than it looks.",
            f"The {r.choice(TIMES)} here is long, and I think of you often.",
        ]))
    lines += ["", f"Please write back soon and tell me about the {r.choice(PLACES)}.", "", "Yours,", frm]
    return "\n".join(lines)


def _recipe(r: random.Random) -> str:
    dish = r.choice(DISHES)
    food = r.sample(FOODS, r.randrange(3, 8))
    lines = [f"Recipe: {_cap(r.choice(ADJECTIVES))} {r.choice(FOODS)} {dish}", f"Serves {r.randrange(2, 9)}.",
             "", "Ingredients:"]
    lines += [f"- {r.randrange(1, 6) * 50} g of {f}" if r.randrange(2) else f"- {r.randrange(1, 5)} cups of {f}"
              for f in food]
    lines += ["", "Steps:"]
    for i in range(r.randrange(3, 9)):
        step = r.choice(COOKING).format(a=r.choice(food), b=r.choice(food), n=r.randrange(2, 30), m=r.randrange(10, 60))
        lines.append(f"{i + 1}. {step}")
    lines.append(f"Enjoy your {dish}!")
    return "\n".join(lines)


def _travel_log(r: random.Random) -> str:
    name = r.choice(NAMES)
    lines = [f"Travel log of {name}"]
    miles = 0
    for day in range(1, r.randrange(2, 10)):
        walked = r.randrange(3, 25)
        miles += walked
        lines.append(
            f"Day {day} ({r.choice(DAYS)}): {r.choice(WEATHER)}. Walked {walked} miles from the "
            f"{r.choice(PLACES)} to the {r.choice(PLACES)}. Total so far: {miles} miles. "
            f"Saw a {r.choice(ANIMALS)} and ate {r.choice(DISHES)}."
        )
    lines.append(f"End of the journey: {miles} miles in {day} days.")
    return "\n".join(lines)


def _counting(r: random.Random) -> str:
    step, start = r.randrange(1, 11), r.randrange(0, 200)
    n = r.randrange(4, 40)
    seq = ", ".join(str(start + i * step) for i in range(n))
    return f"Counting by {step} from {start}: {seq}."


def _arithmetic(r: random.Random) -> str:
    kind = r.randrange(3)
    if kind == 0:
        k = r.randrange(2, 13)
        lines = [f"The {k} times table:"] + [f"{k} x {i} = {k * i}" for i in range(1, r.randrange(6, 13) + 1)]
    elif kind == 1:
        lines = ["Sums:"] + [f"{a} + {b} = {a + b}" for a, b in
                             ((r.randrange(100), r.randrange(100)) for _ in range(r.randrange(2, 20)))]
    else:
        lines = ["Number words:"] + [f"{NUMBER_WORDS[i]} plus {NUMBER_WORDS[j]} is {NUMBER_WORDS[i + j]}."
                                     for i, j in ((r.randrange(7), r.randrange(6)) for _ in range(r.randrange(4, 16)))]
    return "\n".join(lines)


def _fact(r: random.Random) -> str:
    animal, place, adj = r.choice(ANIMALS), r.choice(PLACES), r.choice(ADJECTIVES)
    return " ".join(r.sample([
        f"The {animal} is a {adj} animal.", f"Most {animal}s live near the {place}.",
        f"A {animal} likes to eat {r.choice(FOODS)}.", f"In {r.choice(TIMES)}, the {animal} sleeps a lot.",
        f"A young {animal} weighs about {r.randrange(1, 40)} kilograms.",
    ], r.randrange(1, 4)))


def _question(r: random.Random) -> str:
    name, obj, colour = r.choice(NAMES), r.choice(OBJECTS), r.choice(COLOURS)
    qa = [(f"What colour is the {obj} of {name}?", f"The {obj} of {name} is {colour}."),
          (f"Where does {name} live?", f"{name} lives in the {r.choice(PLACES)}."),
          (f"How many {obj}s does {name} have?", f"{name} has {NUMBER_WORDS[r.randrange(2, 13)]} {obj}s.")]
    return "\n".join(f"Q: {q}\nA: {a}" for q, a in r.sample(qa, r.randrange(1, 3)))


_KINDS = [(_story, 4), (_letter, 2), (_recipe, 2), (_travel_log, 1), (_counting, 1), (_arithmetic, 2), (_fact, 3),
          (_question, 3)]


def documents(n: int = 10000, seed: int = SEED) -> list[str]:
    """``n`` generated documents (deterministic for a given ``n`` and ``seed``)."""
    r = random.Random(seed)
    kinds = [k for k, w in _KINDS for _ in range(w)]
    out = []
    for _ in range(n):
        doc = r.choice(kinds)(r)
        if r.randrange(20) == 0:  # a few long documents: several stories in a collection
            doc = "\n\n".join([doc] + [_story(r) for _ in range(r.randrange(2, 8))])
        out.append(doc)
    return out
