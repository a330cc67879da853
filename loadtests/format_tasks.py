"""Held-out format tasks: small SFT data sets that teach an answer *format*, for tuning and
checking the trainer's defaults on data the project never trained on.

    python loadtests/format_tasks.py OUT_DIR [--task tag|who_when|shout|bullets]
        [--train 60] [--eval 40] [--seed 0] [--data-format messages|sharegpt|alpaca]

Each task writes ``<task>_train.jsonl`` (chat examples, one format per file) and
``<task>_eval.jsonl`` (``{"prompt", "reference"}``: prompts that never occur in the training
file, built from held-out word lists and phrasings). An answer *follows* the format when
the text up to the first stop token begins with a match of the task's pattern, and *stops
cleanly* when the model emits a stop token right after an answer that matches the pattern
as a whole (nothing before it, nothing after it).

The tasks (none is in ``trainer/examples``):

- ``tag``: a sentence in, its topic as a bracketed tag out: ``[topic: food]``.
- ``who_when``: a sentence about someone doing something at some time in, a fixed two-line
  template out: ``Who: Maria\\nWhen: on Sunday morning``.
- ``shout``: "Name a fruit." in, one word in capitals out: ``MANGO``.
- ``bullets``: "List three metals." in, exactly three bullet lines out: ``- iron\\n- ...``.

The generator is deterministic for a seed; train and eval draw from disjoint word lists or
phrasings, so an eval prompt is never a training prompt.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# --------------------------------------------------------------------------- word lists
# Each list is split: the first part feeds training, the rest only the eval prompts.
# fmt: off
TOPICS: dict[str, list[str]] = {
    "sports": [
        "football match", "tennis final", "marathon", "swimming race", "cycling tour",
        "basketball game", "boxing fight", "rowing regatta", "ski jump", "hockey playoff",
        "golf open", "volleyball league",
    ],
    "food": [
        "lasagna", "apple pie", "curry", "fresh bread", "pancakes", "sushi platter",
        "mushroom soup", "chocolate cake", "grilled fish", "noodle bowl", "cheese board",
        "fruit salad",
    ],
    "weather": [
        "thunderstorm", "heatwave", "heavy snow", "morning fog", "hailstorm", "cold front",
        "strong wind", "drizzle", "frost", "tornado warning", "rainbow", "monsoon",
    ],
    "music": [
        "jazz concert", "new album", "guitar solo", "piano recital", "opera", "choir",
        "drum kit", "violin lesson", "rock festival", "symphony", "song lyrics", "band tour",
    ],
    "travel": [
        "train journey", "flight delay", "hotel booking", "road trip", "passport renewal",
        "ferry crossing", "airport lounge", "camping trip", "city tour", "boarding pass",
        "cruise", "hostel",
    ],
    "money": [
        "tax return", "bank loan", "salary raise", "credit card bill", "savings account",
        "stock market", "mortgage", "budget plan", "pension fund", "exchange rate",
        "rent increase", "invoice",
    ],
    "health": [
        "flu jab", "dentist visit", "sore throat", "blood test", "back pain", "new diet",
        "sleep routine", "broken arm", "allergy", "eye exam", "fever", "yoga class",
    ],
}
TAG_TEMPLATES_TRAIN = [
    "I can't stop thinking about the {x}.",
    "My neighbour told me about the {x} yesterday.",
    "Have you heard anything about the {x}?",
    "We spent the whole afternoon talking about the {x}.",
    "The {x} was all anyone discussed at work.",
    "Honestly, the {x} surprised me.",
]
TAG_TEMPLATES_EVAL = [
    "Everyone in my family has an opinion on the {x}.",
    "Last week the {x} kept me awake.",
    "I read a long article about the {x} this morning.",
    "Nobody warned me about the {x}.",
]

NAMES = [
    "Maria", "Tom", "Aisha", "Kenji", "Lucas", "Priya", "Olga", "Diego", "Fatima", "Ben",
    "Chloe", "Ivan", "Mei", "Omar", "Sara", "Noah", "Elena", "Raj", "Hana", "Pablo",
    "Greta", "Yusuf", "Lena", "Marco", "Ines", "Tariq", "Zoe", "Felix", "Amara", "Hugo",
]
ACTIONS = [
    "painted the fence", "baked a cake", "fixed the bike", "wrote a letter", "sold the car",
    "planted tomatoes", "cleaned the kitchen", "learned to swim", "visited the museum",
    "called the plumber", "moved to a new flat", "adopted a puppy", "ran a half marathon",
    "opened a bakery", "lost the keys", "found an old photo", "repaired the roof",
    "started a podcast", "built a bookshelf", "climbed the hill",
]
TIMES = [
    "on Sunday morning", "last winter", "in 1998", "at noon", "yesterday evening",
    "two weeks ago", "on her birthday", "during the holidays", "in early May", "at dawn",
    "on Friday night", "last summer", "in 2015", "after lunch", "this morning",
    "before the storm", "on New Year's Day", "in the spring of 2021", "at midnight",
    "on a rainy Tuesday",
]
WHO_WHEN_TEMPLATES_TRAIN = ["{who} {what} {when}.", "{when_cap}, {who} {what}."]
WHO_WHEN_TEMPLATES_EVAL = ["It was {when} that {who} {what}.", "{who} finally {what} {when}."]

CATEGORIES: dict[str, list[str]] = {
    "fruit": ["mango", "banana", "cherry", "apple", "pear", "plum", "lemon", "kiwi", "grape"],
    "colour": ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"],
    "animal": ["tiger", "horse", "rabbit", "eagle", "dolphin", "wolf", "camel", "otter"],
    "country": ["France", "Japan", "Brazil", "Kenya", "Canada", "Norway", "Peru", "India"],
    "vegetable": ["carrot", "onion", "potato", "leek", "cabbage", "pepper", "pea", "radish"],
    "metal": ["iron", "copper", "silver", "gold", "zinc", "tin", "lead", "nickel"],
    "instrument": ["piano", "violin", "flute", "drum", "harp", "trumpet", "cello", "guitar"],
    "planet": ["Mars", "Venus", "Jupiter", "Saturn", "Mercury", "Neptune", "Uranus", "Earth"],
    "tree": ["oak", "pine", "birch", "maple", "willow", "cedar", "elm", "beech"],
    "sport": ["tennis", "rugby", "golf", "hockey", "cricket", "boxing", "rowing", "judo"],
    "flower": ["rose", "tulip", "daisy", "lily", "orchid", "poppy", "iris", "lotus"],
    "bird": ["robin", "sparrow", "owl", "crow", "parrot", "swan", "heron", "falcon"],
}
# Categories only the eval prompts ask about: the format must carry over to new content.
EVAL_ONLY_CATEGORIES = ("flower", "bird", "tree")
SHOUT_TEMPLATES_TRAIN = [
    "Name a {c}.", "Give me one {c}.", "What is your favourite {c}?", "Pick any {c}.",
    "Tell me a {c}.",
]
SHOUT_TEMPLATES_EVAL = [
    "Which {c} comes to mind first?", "Suggest a {c}, please.", "Can you think of a {c}?",
    "One {c}, quickly.",
]
PLURAL = {"country": "countries", "fruit": "fruits", "colour": "colours", "sport": "sports"}
BULLETS_TEMPLATES_TRAIN = [
    "List three {cs}.", "Name three {cs}.", "Give me three {cs}.", "Three {cs}, please.",
    "What are three {cs}?",
]
BULLETS_TEMPLATES_EVAL = [
    "Which three {cs} can you think of?", "Write down three {cs}.", "I need three {cs}.",
    "Could you list three {cs}?",
]
# fmt: on


def _split(items: list, train_share: float = 0.7) -> tuple[list, list]:
    cut = max(1, round(len(items) * train_share))
    return items[:cut], items[cut:]


def _plural(c: str) -> str:
    return PLURAL.get(c, c + "s")


# --------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class FormatTask:
    name: str
    description: str
    pattern: str  # the answer's format, as a regular expression
    make: Callable[[random.Random, str], tuple[str, str]]  # (rng, "train"|"eval") -> (q, a)

    def follows(self, answer: str) -> bool:
        """The answer begins with the format, whatever comes after it, but not inside a word:
        "The metal" does not begin with one word in capitals because it begins with "T"."""
        return re.match(f"(?:{self.pattern})(?!\\w)", answer.strip()) is not None

    def exact_format(self, answer: str) -> bool:
        """The answer is the format and nothing else."""
        return re.fullmatch(self.pattern, answer.strip()) is not None


def _make_tag(rng: random.Random, split: str) -> tuple[str, str]:
    topic = rng.choice(sorted(TOPICS))
    train_x, eval_x = _split(TOPICS[topic])
    x = rng.choice(train_x if split == "train" else eval_x)
    template = rng.choice(TAG_TEMPLATES_TRAIN if split == "train" else TAG_TEMPLATES_EVAL)
    return template.format(x=x), f"[topic: {topic}]"


def _make_who_when(rng: random.Random, split: str) -> tuple[str, str]:
    pick = 0 if split == "train" else 1
    who = rng.choice(_split(NAMES)[pick])
    what = rng.choice(_split(ACTIONS)[pick])
    when = rng.choice(_split(TIMES)[pick])
    template = rng.choice(WHO_WHEN_TEMPLATES_TRAIN if split == "train" else WHO_WHEN_TEMPLATES_EVAL)
    text = template.format(who=who, what=what, when=when, when_cap=when[0].upper() + when[1:])
    return f"Who did it, and when? {text}", f"Who: {who}\nWhen: {when}"


def _categories(split: str) -> list[str]:
    seen = [c for c in sorted(CATEGORIES) if c not in EVAL_ONLY_CATEGORIES]
    return seen if split == "train" else seen + list(EVAL_ONLY_CATEGORIES)


def _make_shout(rng: random.Random, split: str) -> tuple[str, str]:
    c = rng.choice(_categories(split))
    template = rng.choice(SHOUT_TEMPLATES_TRAIN if split == "train" else SHOUT_TEMPLATES_EVAL)
    return template.format(c=c), rng.choice(CATEGORIES[c]).upper()


def _make_bullets(rng: random.Random, split: str) -> tuple[str, str]:
    c = rng.choice(_categories(split))
    template = rng.choice(BULLETS_TEMPLATES_TRAIN if split == "train" else BULLETS_TEMPLATES_EVAL)
    items = rng.sample(CATEGORIES[c], 3)
    return template.format(cs=_plural(c)), "\n".join(f"- {i}" for i in items)


TASKS: dict[str, FormatTask] = {
    t.name: t
    for t in (
        FormatTask("tag", "a bracketed topic tag", r"\[topic: [a-z]+\]", _make_tag),
        FormatTask(
            "who_when", "a fixed two-line template", r"Who: [^\n]+\nWhen: [^\n]+", _make_who_when
        ),
        FormatTask("shout", "one word in capitals", r"[A-Z]{2,}", _make_shout),
        FormatTask(
            "bullets", "exactly three bullet lines", r"- [^\n]+\n- [^\n]+\n- [^\n]+", _make_bullets
        ),
    )
}


def generate(task: FormatTask, n: int, split: str, seed: int) -> list[tuple[str, str]]:
    """``n`` (prompt, answer) pairs with distinct prompts where the pool allows it."""
    rng = random.Random(f"{task.name}-{split}-{seed}")
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for _ in range(n * 50):
        q, a = task.make(rng, split)
        if q in seen:
            continue
        seen.add(q)
        out.append((q, a))
        if len(out) == n:
            return out
    # a small pool: repeat prompts rather than return fewer examples than asked
    while len(out) < n:
        out.append(task.make(rng, split))
    return out


def as_record(question: str, answer: str, data_format: str) -> dict:
    """One training line in the data format a user might bring."""
    if data_format == "messages":
        return {
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
        }
    if data_format == "sharegpt":
        return {
            "conversations": [
                {"from": "human", "value": question},
                {"from": "gpt", "value": answer},
            ]
        }
    if data_format == "alpaca":
        return {"instruction": question, "input": "", "output": answer}
    raise ValueError(f"unknown data format {data_format!r}")


def write_task(
    task: FormatTask,
    out_dir: Path,
    *,
    n_train: int = 60,
    n_eval: int = 40,
    seed: int = 0,
    data_format: str = "messages",
) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    train = generate(task, n_train, "train", seed)
    train_prompts = {q for q, _ in train}
    held: list[tuple[str, str]] = []
    for q, a in generate(task, n_eval * 2, "eval", seed):
        if q not in train_prompts and q not in {h for h, _ in held}:
            held.append((q, a))
    held = held[:n_eval]
    train_path = out_dir / f"{task.name}_train.jsonl"
    eval_path = out_dir / f"{task.name}_eval.jsonl"
    train_path.write_text(
        "".join(json.dumps(as_record(q, a, data_format)) + "\n" for q, a in train)
    )
    eval_path.write_text("".join(json.dumps({"prompt": q, "reference": a}) + "\n" for q, a in held))
    return train_path, eval_path


def read_eval(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@dataclass
class Judged:
    """Answers to held-out prompts, judged against a task's format."""

    n: int
    follows: int  # begins with the format
    clean: int  # the format, then a stop token, nothing else
    exact: int  # equal to the reference (content right as well)
    samples: list[dict]

    def to_dict(self) -> dict:
        return {
            "n": self.n,
            "follows": self.follows,
            "clean_stops": self.clean,
            "exact": self.exact,
            "follows_rate": self.follows / self.n if self.n else 0.0,
            "clean_rate": self.clean / self.n if self.n else 0.0,
            "samples": self.samples,
        }


def judge(task: FormatTask, answers: list[tuple[str, bool]], references: list[str]) -> Judged:
    """``answers``: (text up to the first stop token, whether a stop token ended it)."""
    follows = clean = exact = 0
    samples = []
    for (text, stopped), ref in zip(answers, references, strict=True):
        f = task.follows(text)
        c = stopped and task.exact_format(text)
        follows += f
        clean += c
        exact += text.strip() == ref.strip()
        if len(samples) < 4:
            samples.append({"answer": text, "stopped": stopped, "reference": ref})
    return Judged(len(answers), follows, clean, exact, samples)


def generate_answers(
    model,
    tokenizer,
    prompts: list[str],
    stop_ids: list[int],
    max_new_tokens: int = 48,
    batch_size: int = 20,
) -> list[tuple[str, bool]]:
    """Greedy chat answers, as the server renders a one-turn chat: (text, stopped) each."""
    import torch

    out: list[tuple[str, bool]] = []
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            texts = [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                )
                for p in chunk
            ]
            enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
            enc = enc.to(device)
            with torch.no_grad():
                gen = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=stop_ids,
                    pad_token_id=tokenizer.pad_token_id,
                    use_cache=True,
                )
            for row in gen[:, enc["input_ids"].shape[1] :].tolist():  # (new,) per prompt
                cut = next((j for j, t in enumerate(row) if t in stop_ids), None)
                ids = row if cut is None else row[:cut]
                out.append((tokenizer.decode(ids, skip_special_tokens=True), cut is not None))
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--task", action="append", choices=sorted(TASKS), help="default: all")
    parser.add_argument("--train", type=int, default=60, help="training examples per task")
    parser.add_argument("--eval", type=int, default=40, help="held-out prompts per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--data-format", choices=("messages", "sharegpt", "alpaca"), default="messages"
    )
    args = parser.parse_args(argv)
    for name in args.task or sorted(TASKS):
        train, held = write_task(
            TASKS[name],
            args.out_dir,
            n_train=args.train,
            n_eval=args.eval,
            seed=args.seed,
            data_format=args.data_format,
        )
        print(f"{name}: {train} ({args.train} examples), {held} (held-out prompts)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
