"""Regenerate the sample datasets under studio/templates/samples/ (deterministic; no network).

    .venv/bin/python benchmarks/make_samples.py

instructions.csv  300 unique instruction/output rows that teach one answer format:
                  "ANSWER: <short answer>" then "WHY: <one sentence>".
chat.jsonl        120 multi-turn chats (messages) where the assistant always answers in French.
text.csv          150 short plain-text notes in one house style, for continued pre-training.
preferences.csv   300 prompt/chosen/rejected pairs for DPO/ORPO: the chosen answer is right, the
                  rejected one a plausible mistake in the same words (a wrong sum, product,
                  conversion, capital or day), so only the content tells them apart: the two sides'
                  mean lengths differ by under 1% and neither side is longer more often (printed).
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


# Each country with a well-known city that is not its capital: the mistake people make.
NOT_CAPITALS = {
    "Australia": ("Canberra", "Sydney"),
    "Canada": ("Ottawa", "Toronto"),
    "Brazil": ("Brasilia", "Rio de Janeiro"),
    "Turkey": ("Ankara", "Istanbul"),
    "Switzerland": ("Bern", "Zurich"),
    "India": ("New Delhi", "Mumbai"),
    "Japan": ("Tokyo", "Osaka"),
    "China": ("Beijing", "Shanghai"),
    "Germany": ("Berlin", "Munich"),
    "Italy": ("Rome", "Milan"),
    "Spain": ("Madrid", "Barcelona"),
    "Nigeria": ("Abuja", "Lagos"),
    "Morocco": ("Rabat", "Casablanca"),
    "Vietnam": ("Hanoi", "Ho Chi Minh City"),
    "New Zealand": ("Wellington", "Auckland"),
    "Pakistan": ("Islamabad", "Karachi"),
    "Egypt": ("Cairo", "Alexandria"),
    "Kenya": ("Nairobi", "Mombasa"),
    "Russia": ("Moscow", "Saint Petersburg"),
    "Poland": ("Warsaw", "Krakow"),
    "Ecuador": ("Quito", "Guayaquil"),
    "Colombia": ("Bogota", "Medellin"),
    "Tanzania": ("Dodoma", "Dar es Salaam"),
    "Kazakhstan": ("Astana", "Almaty"),
    "Belgium": ("Brussels", "Antwerp"),
    "Portugal": ("Lisbon", "Porto"),
    "Norway": ("Oslo", "Bergen"),
    "Sweden": ("Stockholm", "Gothenburg"),
    "Finland": ("Helsinki", "Turku"),
    "Denmark": ("Copenhagen", "Aarhus"),
    "Austria": ("Vienna", "Salzburg"),
    "Greece": ("Athens", "Thessaloniki"),
    "Ireland": ("Dublin", "Cork"),
    "Argentina": ("Buenos Aires", "Cordoba"),
    "Chile": ("Santiago", "Valparaiso"),
    "Peru": ("Lima", "Cusco"),
    "Mexico": ("Mexico City", "Guadalajara"),
    "Ghana": ("Accra", "Kumasi"),
    "Saudi Arabia": ("Riyadh", "Jeddah"),
    "the United Arab Emirates": ("Abu Dhabi", "Dubai"),
    "South Korea": ("Seoul", "Busan"),
    "Thailand": ("Bangkok", "Chiang Mai"),
    "the Philippines": ("Manila", "Cebu"),
    "Hungary": ("Budapest", "Debrecen"),
    "Czechia": ("Prague", "Brno"),
    "Romania": ("Bucharest", "Cluj-Napoca"),
    "Ukraine": ("Kyiv", "Kharkiv"),
    "Iceland": ("Reykjavik", "Akureyri"),
    "Croatia": ("Zagreb", "Split"),
    "Serbia": ("Belgrade", "Novi Sad"),
    "Bulgaria": ("Sofia", "Plovdiv"),
    "the Netherlands": ("Amsterdam", "Rotterdam"),
    "Scotland": ("Edinburgh", "Glasgow"),
    "the United States": ("Washington, D.C.", "New York"),
}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
# (unit, smaller unit, how many smaller in one, the factor people confuse it with)
UNITS = [
    ("metres", "centimetres", 100, 10),
    ("kilometres", "metres", 1000, 100),
    ("kilograms", "grams", 1000, 100),
    ("hours", "minutes", 60, 100),
    ("minutes", "seconds", 60, 100),
    ("days", "hours", 24, 12),
    ("weeks", "days", 7, 5),
    ("litres", "millilitres", 1000, 100),
    ("feet", "inches", 12, 10),
    ("years", "months", 12, 10),
]


def _near(rng: random.Random, right: int) -> int:
    """A wrong number a careless sum or product gives: close to the right one, same digit count."""
    while True:
        wrong = right + rng.choice([-10, -2, -1, 1, 2, 10])
        if wrong > 0 and len(str(wrong)) == len(str(right)):
            return wrong


def preferences(rng: random.Random) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected): right and wrong answers in the same sentence."""
    rows: dict[str, tuple[str, str]] = {}
    for country, (capital, city) in NOT_CAPITALS.items():
        rows[f"What is the capital of {country}?"] = (
            f"The capital of {country} is {capital}.",
            f"The capital of {country} is {city}.",
        )
    for i, day in enumerate(DAYS):
        after, wrong = DAYS[(i + 1) % 7], DAYS[(i + 2) % 7]
        rows[f"What day comes after {day}?"] = (f"The day after {day} is {after}.", f"The day after {day} is {wrong}.")
        before, wrong = DAYS[i - 1], DAYS[i - 2]
        rows[f"What day comes before {day}?"] = (
            f"The day before {day} is {before}.",
            f"The day before {day} is {wrong}.",
        )
    for i, month in enumerate(MONTHS):
        after, wrong = MONTHS[(i + 1) % 12], MONTHS[(i + 2) % 12]
        rows[f"Which month comes after {month}?"] = (
            f"The month after {month} is {after}.",
            f"The month after {month} is {wrong}.",
        )
    while len(rows) < 125:
        unit, small, per, confused = rng.choice(UNITS)
        n = rng.randint(2, 9)
        rows[f"How many {small} are in {n} {unit}?"] = (
            f"{n} {unit} is {n * per} {small}.",
            f"{n} {unit} is {n * confused} {small}.",
        )
    while len(rows) < 300:
        a, b = rng.randint(2, 49), rng.randint(2, 49)
        kind = rng.choice(["plus", "minus", "times"])
        if kind == "plus":
            right = a + b
        elif kind == "minus" and a > b:
            right = a - b
        elif kind == "times" and a <= 12 and b <= 12:
            right = a * b
        else:
            continue
        rows[f"What is {a} {kind} {b}?"] = (f"{a} {kind} {b} is {right}.", f"{a} {kind} {b} is {_near(rng, right)}.")
    items = [(prompt, chosen, rejected) for prompt, (chosen, rejected) in rows.items()]
    rng.shuffle(items)
    return items


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
