"""Regenerate the sample datasets under studio/templates/samples/ (deterministic; no network).

    .venv/bin/python benchmarks/make_samples.py

instructions.csv  300 unique instruction/output rows that teach one answer format:
                  "ANSWER: <short answer>" then "WHY: <one sentence>".
chat.jsonl        120 multi-turn chats (messages) where the assistant always answers in French.
text.csv          150 short plain-text notes in one house style, for continued pre-training.
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
    print(f"wrote samples to {OUT}")


if __name__ == "__main__":
    main()
