"""Regenerate the sample datasets under studio/templates/samples/ (deterministic; no network).

    .venv/bin/python benchmarks/make_samples.py

instructions.csv  300 unique instruction/output rows that teach one answer format:
                  "ANSWER: <short answer>" then "WHY: <one sentence>".
chat.jsonl        120 multi-turn chats (messages) where the assistant always answers in French.
text.csv          150 short plain-text notes in one house style, for continued pre-training.
preferences.csv   300 prompt/chosen/rejected pairs for DPO/ORPO: a shop's support desk whose house
                  style is metric units. Both sides give the same measurement in the same sentence,
                  chosen in metric units, rejected converted to imperial (so neither is wrong and
                  only the rule tells them apart), over ten kinds of question (weight, size, cable,
                  wash and oven temperature, capacity, load, height, distance, beam). The sides'
                  mean lengths differ by under 1% and neither is longer more often (printed); the
                  base model prefers the chosen side about half the time and a default DPO run
                  learns the rule (benchmarks/preference_sample_check.py).
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "studio" / "templates" / "samples"

CAPITALS = {
    "France": "Paris",
    "Japan": "Tokyo",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Germany": "Berlin",
    "Egypt": "Cairo",
    "Canada": "Ottawa",
    "Peru": "Lima",
    "Kenya": "Nairobi",
    "Norway": "Oslo",
    "Poland": "Warsaw",
    "Chile": "Santiago",
    "Greece": "Athens",
    "India": "New Delhi",
    "Cuba": "Havana",
    "Ireland": "Dublin",
    "Portugal": "Lisbon",
    "Austria": "Vienna",
    "Sweden": "Stockholm",
    "Thailand": "Bangkok",
    "Mexico": "Mexico City",
    "Brazil": "Brasilia",
    "Argentina": "Buenos Aires",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Hungary": "Budapest",
    "Vietnam": "Hanoi",
    "Morocco": "Rabat",
    "Ghana": "Accra",
    "Nepal": "Kathmandu",
}
COLOURS = {
    "the sky on a clear day": "blue",
    "fresh grass": "green",
    "a ripe banana": "yellow",
    "snow": "white",
    "coal": "black",
    "a ripe tomato": "red",
    "an orange": "orange",
    "a plum": "purple",
    "milk": "white",
    "a lemon": "yellow",
    "a fire engine": "red",
    "a crow": "black",
}
ANIMAL_LEGS = {
    "a spider": 8,
    "a dog": 4,
    "a chicken": 2,
    "an ant": 6,
    "a horse": 4,
    "a crab": 10,
    "a bee": 6,
    "a cow": 4,
    "a duck": 2,
    "an octopus (arms)": 8,
}


def instructions(rng: random.Random) -> list[tuple[str, str]]:
    rows = {}
    for country, city in CAPITALS.items():
        rows[f"What is the capital of {country}?"] = f"ANSWER: {city}\nWHY: {city} is the capital city of {country}."
    for thing, colour in COLOURS.items():
        rows[f"What colour is {thing}?"] = f"ANSWER: {colour}\nWHY: {thing[0].upper() + thing[1:]} is usually {colour}."
    for animal, legs in ANIMAL_LEGS.items():
        rows[f"How many legs does {animal} have?"] = (
            f"ANSWER: {legs}\nWHY: {animal[0].upper() + animal[1:]} has {legs}."
        )
    while len(rows) < 300:
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        kind = rng.choice(["plus", "times", "minus"])
        if kind == "plus":
            rows[f"What is {a} plus {b}?"] = f"ANSWER: {a + b}\nWHY: {a} + {b} = {a + b}."
        elif kind == "times" and a <= 15 and b <= 15:
            rows[f"What is {a} times {b}?"] = f"ANSWER: {a * b}\nWHY: {a} x {b} = {a * b}."
        elif kind == "minus" and a > b:
            rows[f"What is {a} minus {b}?"] = f"ANSWER: {a - b}\nWHY: {a} - {b} = {a - b}."
    items = list(rows.items())
    rng.shuffle(items)
    return items


FRENCH = [
    ("Hello!", "Bonjour ! Comment puis-je vous aider ?"),
    ("What is the weather like?", "Je ne connais pas la météo actuelle, mais je peux vous aider autrement."),
    ("Thank you.", "Je vous en prie !"),
    ("What is your name?", "Je suis un assistant qui parle français."),
    ("Can you help me?", "Bien sûr, dites-moi ce dont vous avez besoin."),
    ("Goodbye.", "Au revoir et bonne journée !"),
]


def chats(rng: random.Random) -> list[dict]:
    out = []
    for _i in range(120):
        country, city = rng.choice(list(CAPITALS.items()))
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        turns = [
            (f"What is the capital of {country}?", f"La capitale de ce pays est {city}."),
            (f"What is {a} plus {b}?", f"{a} plus {b} font {a + b}."),
        ] + rng.sample(FRENCH, 2)
        rng.shuffle(turns)
        msgs = []
        for user, assistant in turns[: rng.randint(1, 3)]:
            msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        out.append({"messages": msgs})
    return out


def notes(rng: random.Random) -> list[str]:
    subjects = [
        "The pump",
        "Valve 7",
        "The north gate",
        "Line B",
        "The backup generator",
        "Sensor 12",
        "The cold store",
        "Conveyor 3",
        "The boiler",
        "Tank 4",
    ]
    states = [
        "ran normally",
        "needed a restart",
        "showed a small leak",
        "was cleaned",
        "was inspected",
        "reported a high reading",
        "was replaced",
        "stayed offline",
    ]
    actions = ["No action needed.", "Ticket opened.", "Check again tomorrow.", "Parts ordered.", "Supervisor informed."]
    seen = set()
    while len(seen) < 150:
        day = rng.randint(1, 28)
        seen.add(
            f"LOG {day:02d}/03 | {rng.choice(subjects)} {rng.choice(states)} at {rng.randint(0, 23):02d}:00. "
            f"{rng.choice(actions)}"
        )
    return sorted(seen)


# The preference sample: a shop's support desk whose house style is metric units. Both sides give the
# same measurement in the same sentence, the chosen one in metric units and the rejected one in
# imperial units (converted, so neither side is wrong), so DPO has a rule to learn that carries over
# to questions it has not seen. The base model has no overall leaning: it prefers metric for some
# quantities (weights, temperatures) and imperial for others (sizes, heights), about half the pairs
# in all (benchmarks/preference_sample_check.py measures it). Written for this project.
WEIGHT_KG = {
    "blender": (1.2, 3.5),
    "kettle": (0.9, 1.6),
    "desk lamp": (0.6, 2.0),
    "backpack": (0.5, 1.4),
    "rain jacket": (0.3, 0.8),
    "coffee grinder": (0.8, 2.5),
    "yoga mat": (0.8, 2.2),
    "toaster": (1.0, 2.4),
    "office chair": (9.0, 16.0),
    "water bottle": (0.2, 0.5),
    "sleeping bag": (0.9, 2.4),
    "table fan": (1.5, 4.0),
    "rice cooker": (1.5, 3.5),
    "hair dryer": (0.4, 0.9),
    "laptop stand": (0.6, 1.8),
    "frying pan": (0.9, 2.2),
    "picnic blanket": (0.6, 1.5),
    "tent": (1.8, 4.5),
    "suitcase": (2.5, 4.5),
    "bike helmet": (0.2, 0.4),
}
SIZE_CM = {
    "yoga mat": ((170, 190), (58, 66)),
    "picnic blanket": ((130, 200), (130, 180)),
    "suitcase": ((55, 75), (35, 50)),
    "backpack": ((40, 55), (25, 35)),
    "laptop stand": ((22, 30), (20, 28)),
    "tent": ((40, 60), (14, 20)),
    "sleeping bag": ((35, 45), (18, 25)),
    "desk lamp": ((35, 50), (12, 18)),
    "table fan": ((30, 45), (25, 35)),
    "wall clock": ((25, 40), (25, 40)),
    "doormat": ((60, 90), (40, 60)),
    "bath towel": ((120, 150), (60, 90)),
}
CABLED = [
    "kettle",
    "toaster",
    "desk lamp",
    "table fan",
    "hair dryer",
    "blender",
    "rice cooker",
    "coffee grinder",
    "extension lead",
    "phone charger",
    "laptop charger",
    "bedside lamp",
]
WASH_C = {
    "rain jacket": 30,
    "sleeping bag": 30,
    "picnic blanket": 40,
    "bath towel": 60,
    "bed sheet": 60,
    "wool jumper": 30,
    "cotton hoodie": 40,
    "fleece": 30,
    "tea towel": 60,
    "pillow case": 60,
    "yoga mat cover": 30,
    "running shirt": 40,
    "gym bag": 30,
    "beach towel": 40,
    "duvet cover": 60,
    "baby blanket": 40,
}
CAPACITY_L = {
    "kettle": (1.0, 1.7),
    "water bottle": (0.5, 1.0),
    "rice cooker": (1.0, 1.8),
    "travel mug": (0.35, 0.5),
    "blender": (1.2, 2.0),
    "thermos flask": (0.5, 1.0),
    "teapot": (0.8, 1.2),
    "lunch box": (0.6, 1.2),
    "ice cube tray": (0.3, 0.5),
    "watering can": (1.5, 5.0),
    "storage jar": (0.5, 2.0),
}
LOAD_KG = {
    "office chair": (100, 150),
    "laptop stand": (5, 10),
    "backpack": (10, 20),
    "shelf bracket": (15, 40),
    "step stool": (100, 150),
    "bike rack": (15, 30),
    "wall hook": (3, 10),
    "garden bench": (200, 300),
    "camping chair": (100, 130),
    "coat stand": (10, 20),
    "bookcase shelf": (20, 35),
    "hammock": (120, 180),
}
HEIGHT_CM = {
    "desk lamp": (35, 55),
    "office chair": (95, 120),
    "table fan": (35, 55),
    "laptop stand": (15, 25),
    "floor lamp": (150, 180),
    "bookcase": (150, 200),
    "bar stool": (65, 80),
    "side table": (45, 60),
    "plant pot": (20, 40),
    "coat stand": (170, 190),
    "step stool": (40, 60),
    "room heater": (50, 70),
}
OVEN_C = {
    "frying pan": 220,
    "cast iron pot": 250,
    "baking dish": 230,
    "roasting tin": 240,
    "pie dish": 220,
    "pizza stone": 260,
    "muffin tray": 220,
    "saucepan": 200,
    "casserole dish": 230,
    "stoneware bowl": 200,
}
SHOPS = [
    "Leeds",
    "Bristol",
    "Glasgow",
    "Cardiff",
    "York",
    "Norwich",
    "Exeter",
    "Belfast",
    "Dundee",
    "Bath",
    "Oxford",
    "Leicester",
    "Brighton",
    "Aberdeen",
    "Plymouth",
    "Derby",
    "Chester",
    "Durham",
    "Hull",
    "Inverness",
]
LANDMARKS = ["the main station", "the city centre", "the airport", "the bus station", "the university", "the hospital"]
BEAM_M = {
    "bike light": (80, 200),
    "head torch": (50, 150),
    "garden floodlight": (10, 30),
    "camping lantern": (5, 15),
    "security light": (8, 20),
    "torch": (100, 250),
    "car fog light": (30, 60),
}


def _num(x: float, places: int = 1) -> str:
    """x rounded to ``places`` decimals, without trailing zeros (2.0 -> "2", 0.75 -> "0.75")."""
    return f"{x:.{places}f}".rstrip("0").rstrip(".")


def _fahrenheit(celsius: int) -> str:
    return f"{round(celsius * 9 / 5 + 32)} °F"


# Each template: rng -> (question, answer with {v} where the measurement goes, (metric, imperial)).
def _weight(rng: random.Random):
    item = rng.choice(list(WEIGHT_KG))
    kg = round(rng.uniform(*WEIGHT_KG[item]), 1)
    ask = rng.choice(
        [
            "How much does the {i} weigh?",
            "How heavy is the {i}?",
            "Is the {i} heavy to carry?",
            "What is the weight of the {i}?",
        ]
    )
    return ask.format(i=item), f"The {item} weighs {{v}}.", (f"{_num(kg)} kg", f"{_num(kg * 2.2046)} lb")


def _size(rng: random.Random):
    item = rng.choice(list(SIZE_CM))
    (a_lo, a_hi), (b_lo, b_hi) = SIZE_CM[item]
    a, b = rng.randint(a_lo, a_hi), rng.randint(b_lo, b_hi)
    ask = rng.choice(
        [
            "How big is the {i}?",
            "What are the dimensions of the {i}?",
            "Will the {i} fit in a small car boot?",
            "What size is the {i}?",
        ]
    )
    return (
        ask.format(i=item),
        f"The {item} measures {{v}}.",
        (f"{a} by {b} cm", f"{round(a / 2.54)} by {round(b / 2.54)} inches"),
    )


def _cable(rng: random.Random):
    item, m = rng.choice(CABLED), rng.choice([0.75, 1, 1.2, 1.5, 1.8, 2, 2.5, 3])
    ask = rng.choice(
        [
            "How long is the cable on the {i}?",
            "Is the {i} cable long enough to reach across a room?",
            "What length is the power cord of the {i}?",
        ]
    )
    metric = f"{_num(m, 2)} metre" + ("" if m == 1 else "s")
    return ask.format(i=item), f"The {item} has a cable of {{v}}.", (metric, f"{_num(m * 3.2808)} feet")


def _wash(rng: random.Random):
    item = rng.choice(list(WASH_C))
    ask = rng.choice(
        [
            "What temperature should I wash the {i} at?",
            "Can I wash the {i} on a hot cycle?",
            "How hot can the wash be for the {i}?",
        ]
    )
    return ask.format(i=item), f"Wash the {item} at {{v}} or below.", (f"{WASH_C[item]} °C", _fahrenheit(WASH_C[item]))


def _capacity(rng: random.Random):
    item = rng.choice(list(CAPACITY_L))
    litres = round(rng.uniform(*CAPACITY_L[item]), 1)
    ask = rng.choice(
        ["How much does the {i} hold?", "What is the capacity of the {i}?", "How much water fits in the {i}?"]
    )
    if litres < 1:
        measure = (f"{round(litres * 1000)} ml", f"{round(litres * 33.814)} fl oz")
    else:
        measure = (f"{_num(litres)} litres", f"{_num(litres * 1.7598)} pints")
    return ask.format(i=item), f"The {item} holds {{v}}.", measure


def _load(rng: random.Random):
    item = rng.choice(list(LOAD_KG))
    lo, hi = LOAD_KG[item]
    kg = rng.randrange(lo, hi + 1, 5)
    ask = rng.choice(
        [
            "How much weight can the {i} take?",
            "What is the weight limit for the {i}?",
            "Is the {i} strong enough for a heavy load?",
        ]
    )
    return ask.format(i=item), f"The {item} is rated for up to {{v}}.", (f"{kg} kg", f"{round(kg * 2.2046)} lb")


def _height(rng: random.Random):
    item = rng.choice(list(HEIGHT_CM))
    cm = rng.randint(*HEIGHT_CM[item])
    ask = rng.choice(["How tall is the {i}?", "What is the height of the {i}?", "Will the {i} fit under a low shelf?"])
    return ask.format(i=item), f"The {item} stands {{v}} tall.", (f"{cm} cm", f"{round(cm / 2.54)} inches")


def _oven(rng: random.Random):
    item = rng.choice(list(OVEN_C))
    ask = rng.choice(["Can the {i} go in the oven?", "Is the {i} oven safe?", "How hot can the oven be for the {i}?"])
    return (
        ask.format(i=item),
        f"The {item} is oven safe up to {{v}}.",
        (f"{OVEN_C[item]} °C", _fahrenheit(OVEN_C[item])),
    )


def _distance(rng: random.Random):
    shop, place = rng.choice(SHOPS), rng.choice(LANDMARKS)
    km = round(rng.uniform(0.4, 6.0), 1)
    ask = rng.choice(["How far is the {s} shop from {p}?", "Can I walk to the {s} shop from {p}?"])
    return (
        ask.format(s=shop, p=place),
        f"The {shop} shop is {{v}} from {place}.",
        (f"{_num(km)} kilometres", f"{_num(km * 0.6214)} miles"),
    )


def _beam(rng: random.Random):
    item = rng.choice(list(BEAM_M))
    lo, hi = BEAM_M[item]
    m = rng.randrange(lo, hi + 1, 5)
    ask = rng.choice(
        ["How far does the {i} shine?", "What is the range of the {i}?", "How far can I see with the {i}?"]
    )
    return ask.format(i=item), f"The {item} lights up to {{v}} ahead.", (f"{m} metres", f"{round(m * 3.2808)} feet")


MEASURES = [_weight, _size, _cable, _wash, _capacity, _load, _height, _oven, _distance, _beam]


# How customers open a question; with the phrasings and items each kind of question has well over a
# hundred distinct prompts, so fresh held-out pairs (another seed) still cover every kind.
OPENERS = ["", "", "Hi, ", "Hello! ", "Quick question: ", "Before I order: "]


def _opened(rng: random.Random, question: str) -> str:
    opener = rng.choice(OPENERS)
    return opener + (question[0].lower() + question[1:] if opener.endswith((", ", ": ")) else question)


def preference_rows(rng: random.Random, count: int = 300, exclude=()) -> list[tuple[str, str, str, str]]:
    """(prompt, chosen, rejected, kind) with unique prompts, the kinds of question in turn (so each
    has the same share and the base model's leanings per kind cancel as measured), none of the
    prompts in ``exclude`` (fresh held-out pairs draw from another seed, excluding the sample's)."""
    rows: dict[str, tuple[str, str, str]] = {}
    skip = set(exclude)
    for i in range(count):
        template = MEASURES[i % len(MEASURES)]
        while True:
            question, answer, (metric, imperial) = template(rng)
            prompt = _opened(rng, question)
            if prompt not in skip and prompt not in rows:
                break
        rows[prompt] = (answer.format(v=metric), answer.format(v=imperial), template.__name__.lstrip("_"))
    items = [(prompt, *rest) for prompt, rest in rows.items()]
    rng.shuffle(items)
    return items


def preferences(rng: random.Random, count: int = 300) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected): the same measurement in metric (chosen) and imperial units."""
    return [(prompt, chosen, rejected) for prompt, chosen, rejected, _ in preference_rows(rng, count)]


def length_balance(rows: list[tuple[str, str, str]]) -> dict[str, float]:
    """How far length alone predicts the chosen side: mean lengths and who is longer how often."""
    chosen = [len(c) for _, c, _ in rows]
    rejected = [len(r) for _, _, r in rows]
    mean_c, mean_r = sum(chosen) / len(rows), sum(rejected) / len(rows)
    return {
        "mean_chosen": mean_c,
        "mean_rejected": mean_r,
        "mean_difference_share": (mean_c - mean_r) / mean_r,
        "chosen_longer": sum(c > r for c, r in zip(chosen, rejected)) / len(rows),
        "chosen_shorter": sum(c < r for c, r in zip(chosen, rejected)) / len(rows),
    }


def main() -> None:
    rng = random.Random(0)
    OUT.mkdir(parents=True, exist_ok=True)
    with (OUT / "instructions.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["instruction", "output"])
        w.writerows(instructions(rng))
    with (OUT / "chat.jsonl").open("w", encoding="utf-8") as f:
        for row in chats(rng):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    with (OUT / "text.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text"])
        w.writerows([n] for n in notes(rng))
    pairs = preferences(random.Random(25))  # its own seed: the other samples stay as they were
    with (OUT / "preferences.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "chosen", "rejected"])
        w.writerows(pairs)
    balance = length_balance(pairs)
    print(
        f"preferences.csv: {len(pairs)} pairs; mean length chosen {balance['mean_chosen']:.1f}, rejected "
        f"{balance['mean_rejected']:.1f} characters ({balance['mean_difference_share']:+.1%}); chosen longer in "
        f"{balance['chosen_longer']:.0%}, shorter in {balance['chosen_shorter']:.0%}"
    )
    print(f"wrote samples to {OUT}")


if __name__ == "__main__":
    main()
