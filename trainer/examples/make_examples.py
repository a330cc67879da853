"""Write the example datasets of the trainer, deterministically (run: python make_examples.py).

The behaviour taught: answer every short general-knowledge question with one JSON object,
``{"answer": ..., "confidence": "high"|"medium"|"low"}``, and nothing else. A base model
does not do this unprompted, so an adapter trained on it shows a visible change.

Files (next to this script):
- house_style_sft.jsonl: chat examples (messages) for SFT
- house_style_eval.jsonl: held-out questions in the same format
- prefs_dpo.jsonl: preference pairs, chosen = house style, rejected = what models
  usually do instead (prose, markdown, JSON of another shape)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (question, answer, confidence). Written for this project; facts kept uncontroversial.
FACTS: list[tuple[str, str, str]] = [
    ("What is the capital of France?", "Paris", "high"),
    ("What is the capital of Japan?", "Tokyo", "high"),
    ("What is the capital of Canada?", "Ottawa", "high"),
    ("What is the capital of Australia?", "Canberra", "high"),
    ("What is the capital of Italy?", "Rome", "high"),
    ("What is the capital of Spain?", "Madrid", "high"),
    ("What is the capital of Germany?", "Berlin", "high"),
    ("What is the capital of Egypt?", "Cairo", "high"),
    ("What is the capital of Kenya?", "Nairobi", "high"),
    ("What is the capital of Brazil?", "Brasilia", "high"),
    ("What is the capital of Argentina?", "Buenos Aires", "high"),
    ("What is the capital of Norway?", "Oslo", "high"),
    ("What is the capital of Portugal?", "Lisbon", "high"),
    ("What is the capital of Greece?", "Athens", "high"),
    ("What is the capital of Peru?", "Lima", "high"),
    ("What is the capital of Thailand?", "Bangkok", "high"),
    ("What is the capital of Poland?", "Warsaw", "high"),
    ("What is the capital of Ireland?", "Dublin", "high"),
    ("What is the capital of Sweden?", "Stockholm", "high"),
    ("What is the capital of Mexico?", "Mexico City", "high"),
    ("How many days are in a leap year?", "366", "high"),
    ("How many continents are there?", "7", "medium"),
    ("How many legs does a spider have?", "8", "high"),
    ("How many sides does a hexagon have?", "6", "high"),
    ("How many minutes are in an hour?", "60", "high"),
    ("How many planets are in the Solar System?", "8", "high"),
    ("How many strings does a standard violin have?", "4", "high"),
    ("How many bones are in the adult human body?", "206", "medium"),
    ("How many players are on a soccer team on the field?", "11", "high"),
    ("How many hours are in a day?", "24", "high"),
    ("What is 7 times 8?", "56", "high"),
    ("What is 12 squared?", "144", "high"),
    ("What is the square root of 81?", "9", "high"),
    ("What is 15 plus 27?", "42", "high"),
    ("What is 100 divided by 4?", "25", "high"),
    ("What is the boiling point of water at sea level in Celsius?", "100", "high"),
    ("What is the freezing point of water in Fahrenheit?", "32", "high"),
    ("What is the chemical symbol for gold?", "Au", "high"),
    ("What is the chemical symbol for iron?", "Fe", "high"),
    ("What is the chemical symbol for sodium?", "Na", "high"),
    ("What gas do plants absorb from the air?", "carbon dioxide", "high"),
    ("What is the hardest natural substance?", "diamond", "high"),
    ("What planet is known as the Red Planet?", "Mars", "high"),
    ("What is the largest planet in the Solar System?", "Jupiter", "high"),
    ("What is the closest star to Earth?", "the Sun", "high"),
    ("What is the largest ocean on Earth?", "Pacific Ocean", "high"),
    ("What is the longest river in South America?", "Amazon", "high"),
    ("What is the tallest mountain above sea level?", "Mount Everest", "high"),
    ("What is the largest desert in the world?", "Antarctica", "medium"),
    ("What is the largest hot desert?", "Sahara", "high"),
    ("Which organ pumps blood through the body?", "heart", "high"),
    ("What is the largest mammal?", "blue whale", "high"),
    ("What is the fastest land animal?", "cheetah", "high"),
    ("Which animal is known as the king of the jungle?", "lion", "medium"),
    ("What do bees make?", "honey", "high"),
    ("What is a baby cat called?", "kitten", "high"),
    ("What is a baby dog called?", "puppy", "high"),
    ("What color do you get by mixing blue and yellow?", "green", "high"),
    ("What color do you get by mixing red and white?", "pink", "high"),
    ("Who wrote Romeo and Juliet?", "William Shakespeare", "high"),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci", "high"),
    ("Who developed the theory of relativity?", "Albert Einstein", "high"),
    ("Who was the first person to walk on the Moon?", "Neil Armstrong", "high"),
    ("Who wrote Pride and Prejudice?", "Jane Austen", "high"),
    ("Who composed the Four Seasons?", "Antonio Vivaldi", "high"),
    ("In which year did World War II end?", "1945", "high"),
    ("In which year did the Berlin Wall fall?", "1989", "high"),
    ("In which country are the pyramids of Giza?", "Egypt", "high"),
    ("In which city is the Eiffel Tower?", "Paris", "high"),
    ("In which country is the Great Barrier Reef?", "Australia", "high"),
    ("What language is spoken in Brazil?", "Portuguese", "high"),
    ("What language has the most native speakers?", "Mandarin Chinese", "medium"),
    ("What currency is used in Japan?", "yen", "high"),
    ("What currency is used in the United Kingdom?", "pound sterling", "high"),
    ("What is the main ingredient of guacamole?", "avocado", "high"),
    ("What is the main ingredient of hummus?", "chickpeas", "high"),
    ("Which metal is liquid at room temperature?", "mercury", "high"),
    ("What is the smallest prime number?", "2", "high"),
    ("How many sides does a triangle have?", "3", "high"),
    ("What is the opposite of hot?", "cold", "high"),
    ("What is the plural of mouse?", "mice", "high"),
    ("What shape has four equal sides and four right angles?", "square", "high"),
    ("What is the largest country by area?", "Russia", "high"),
    ("What is the smallest country in the world?", "Vatican City", "high"),
    ("What instrument has 88 keys?", "piano", "high"),
    ("What is the capital of Switzerland?", "Bern", "medium"),
    ("What is the capital of Turkey?", "Ankara", "high"),
    ("What is the capital of New Zealand?", "Wellington", "high"),
    ("How many weeks are in a year?", "52", "high"),
    ("What is 9 times 9?", "81", "high"),
    ("What is the chemical formula of water?", "H2O", "high"),
    ("What planet is closest to the Sun?", "Mercury", "high"),
    ("Who invented the telephone?", "Alexander Graham Bell", "medium"),
    ("What is the largest organ of the human body?", "skin", "high"),
    ("What is the currency of the United States?", "dollar", "high"),
    ("What is the capital of South Korea?", "Seoul", "high"),
    ("How many colors are in a rainbow?", "7", "medium"),
    ("What is the longest bone in the human body?", "femur", "high"),
    ("Which bird is a symbol of peace?", "dove", "medium"),
    ("What season comes after winter?", "spring", "high"),
]

N_EVAL = 18
N_DPO = 40


def house_style(answer: str, confidence: str) -> str:
    return json.dumps({"answer": answer, "confidence": confidence})


def rejected_variant(rng: random.Random, question: str, answer: str, confidence: str) -> str:
    """The answers a base model tends to give instead of the house style."""
    choice = rng.randrange(4)
    if choice == 0:
        return f"The answer is {answer}."
    if choice == 1:
        return f"**{answer}**\n\nThis is a well-known fact."
    if choice == 2:
        return json.dumps({"result": answer})
    return f"{answer}. Let me know if you have any other questions!"


def chat(question: str, answer: str, confidence: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": house_style(answer, confidence)},
        ]
    }


def main() -> None:
    rng = random.Random(20240611)
    facts = list(FACTS)
    rng.shuffle(facts)
    eval_facts, train_facts = facts[:N_EVAL], facts[N_EVAL:]
    write(HERE / "house_style_sft.jsonl", [chat(*f) for f in train_facts])
    write(HERE / "house_style_eval.jsonl", [chat(*f) for f in eval_facts])
    pairs = []
    for question, answer, confidence in train_facts[:N_DPO]:
        pairs.append(
            {
                "prompt": question,
                "chosen": house_style(answer, confidence),
                "rejected": rejected_variant(rng, question, answer, confidence),
            }
        )
    write(HERE / "prefs_dpo.jsonl", pairs)


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"wrote {len(rows)} rows to {path.name}")


if __name__ == "__main__":
    main()
