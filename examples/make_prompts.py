"""Write examples/prompts.parquet: ~200 prompts written for this project (no external data).

Contract: deterministic (same file every run); columns ``id`` (string), ``prompt`` (string),
``category`` (string, passed through by the job). Lengths vary from a few words to a paragraph so
that length bucketing has something to do. Run: ``python examples/make_prompts.py [OUT]``.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

QUESTIONS = [
    "What is the capital of {place}?",
    "Why is the sky blue?",
    "How do bees make honey?",
    "What causes the seasons on Earth?",
    "Who invented the printing press?",
    "How does a rainbow form?",
    "What is photosynthesis?",
    "Why do cats purr?",
    "How far away is the Moon?",
    "What is a prime number?",
    "How does a refrigerator keep food cold?",
    "Why does ice float on water?",
    "What is gravity?",
    "How do airplanes stay in the air?",
    "What is the largest ocean?",
    "Why do leaves change color in autumn?",
    "What does a compiler do?",
    "How does the heart pump blood?",
    "What is inflation in economics?",
    "Why do we have time zones?",
]
PLACES = ["France", "Japan", "Canada", "Kenya", "Brazil", "Norway", "Egypt", "India", "Chile", "Poland"]
INSTRUCTIONS = [
    "Write a {form} about {topic}.",
    "Give {count} tips for {task}.",
    "Explain {topic} to {audience}.",
    "List five words that rhyme with {word}.",
    "Summarize the story of {story} in two sentences.",
    "Write a short thank-you note to {person}.",
    "Describe {topic} in one sentence.",
    "Suggest a name for a {pet}.",
    "Translate 'good morning' into {language}.",
    "What is one surprising fact about {topic}?",
]
FORMS = ["haiku", "limerick", "short poem", "two-line rhyme", "product slogan"]
COUNTS = ["two", "three", "five"]
AUDIENCES = ["a ten-year-old", "a grandparent", "a busy engineer"]
TOPICS = [
    "the ocean",
    "autumn leaves",
    "a rainy city",
    "mountains",
    "coffee",
    "the night sky",
    "trains",
    "a quiet library",
    "volcanoes",
    "friendship",
    "machine learning",
    "the water cycle",
]
TASKS = [
    "learning a new language",
    "sleeping better",
    "saving money",
    "staying focused",
    "cooking rice",
    "running a first marathon",
    "writing clean code",
    "keeping houseplants alive",
]
WORDS = ["cat", "light", "day", "stone", "tree", "blue"]
STORIES = ["Cinderella", "the tortoise and the hare", "Little Red Riding Hood", "Jack and the beanstalk"]
PEOPLE = ["a teacher", "a neighbour", "a nurse", "an old friend", "a bus driver"]
PETS = ["goldfish", "grey kitten", "parrot", "puppy"]
LANGUAGES = ["Spanish", "German", "Italian", "French", "Portuguese"]
LONG = [
    "I am planning a weekend trip to a small town by the sea. I like walking, old buildings and trying "
    "local food, but I do not want to spend much money. Suggest a simple plan for Saturday and Sunday.",
    "My team keeps missing deadlines because tasks are not clearly assigned and meetings run long. Give me "
    "a short list of practical changes we could try next week, and explain why each one might help.",
    "Here is a sentence with mistakes: 'Me and him goes to the store yesterday and buyed three apple.' "
    "Rewrite it correctly and briefly explain each correction.",
    "A farmer has chickens and cows. Together they have 30 heads and 74 legs. How many chickens and how "
    "many cows does the farmer have? Show your reasoning step by step.",
    "Write the opening paragraph of a mystery story set in a lighthouse during a storm. The narrator is "
    "the lighthouse keeper, who has just noticed that the light has gone out for no reason.",
    "Compare walking, cycling and taking the bus as ways to get to work in a city. Consider cost, time, "
    "health and the weather, and finish with a one-line recommendation.",
    "Explain the difference between a list and a tuple in Python, with a short example of when you would "
    "use each one, and mention what happens if you try to change a tuple.",
    "You are helping a student prepare for an exam on the solar system. Ask them five short quiz "
    "questions, from easy to hard, and give the answers at the end.",
]


def make(n: int = 200, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    fill = {
        "place": PLACES,
        "topic": TOPICS,
        "task": TASKS,
        "word": WORDS,
        "story": STORIES,
        "person": PEOPLE,
        "pet": PETS,
        "language": LANGUAGES,
        "form": FORMS,
        "count": COUNTS,
        "audience": AUDIENCES,
    }
    rows, seen = [], set()
    for _ in range(100 * n):  # bounded: stops with fewer rows rather than spinning
        if len(rows) >= n:
            break
        kind = rng.random()
        if kind < 0.35:
            cat, text = "question", rng.choice(QUESTIONS)
        elif kind < 0.85:
            cat, text = "instruction", rng.choice(INSTRUCTIONS)
        else:
            cat, text = "long", rng.choice(LONG)
        text = text.format(**{k: rng.choice(v) for k, v in fill.items()})
        if text in seen and cat != "long":
            continue
        if text in seen:  # a long prompt again: vary it so every prompt is distinct
            text += f" Keep the answer under {rng.choice([50, 80, 120, 150])} words."
            if text in seen:
                continue
        seen.add(text)
        rows.append({"id": f"p{len(rows):04d}", "prompt": text, "category": cat})
    return rows


def main() -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("prompts.parquet")
    rows = make()
    pq.write_table(pa.Table.from_pylist(rows), out)
    print(f"wrote {len(rows)} prompts to {out}")


if __name__ == "__main__":
    main()
