"""Write the prompt sets for skip-aware training: examples/train_prompts.parquet and a held-out set.

The prompts are the project's own (topic x instruction templates); training and held-out sets use
disjoint topics, so held-out quality is measured on subjects never seen in training.
Run: python examples/make_train_prompts.py
"""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

TOPICS = """photosynthesis; the water cycle; volcanoes; black holes; the moon; tides; earthquakes; rainbows;
gravity; magnets; electricity; the human heart; the immune system; vaccines; sleep; dreams; memory;
honeybees; ants; whales; dolphins; penguins; dinosaurs; fossils; the Roman Empire; ancient Egypt;
the printing press; the steam engine; the internet; email; smartphones; batteries; solar panels;
wind turbines; recycling; compost; coffee; tea; bread; cheese; chocolate; pizza; rice; olive oil;
the piano; the guitar; jazz; poetry; chess; football; the Olympics; marathons; yoga; meditation;
budgeting; saving money; interest rates; inflation; job interviews; writing a resume; public speaking;
time management; learning a language; reading habits; libraries; museums; maps; compasses; trains;
bicycles; airplanes; rockets; satellites; the Eiffel Tower; mountains; deserts; rainforests; oceans;
rivers; lakes; glaciers; climate; clouds; snow; thunderstorms; hurricanes; the alphabet; numbers;
fractions; prime numbers; geometry; probability; statistics; computers; programming; Python; databases;
passwords; encryption; robots; artificial intelligence; friendship; kindness; gardening; houseplants;
tomatoes; apples; bananas; cats; dogs; horses; owls; spiders; butterflies; frogs; sharks; octopuses;
the sun; Mars; Jupiter; comets; telescopes; microscopes; cells; DNA; bones; muscles; teeth; water;
salt; sugar; fire; ice; glass; paper; cotton; wool; clocks; calendars; birthdays; holidays; cooking pasta;
baking cookies; camping; hiking; swimming; painting; photography; movies; theater; newspapers; radio""".replace(
    "\n", " "
)

TEMPLATES = [
    "What is {t}?",
    "Explain {t} in simple terms.",
    "Give me three facts about {t}.",
    "Why is {t} important?",
    "Write a short paragraph about {t}.",
    "How would you explain {t} to a child?",
    "What are the main benefits of {t}?",
    "Write a haiku about {t}.",
    "List some common questions about {t}.",
    "Describe {t} in two sentences.",
    "What is a surprising fact about {t}?",
    "Tell me a short story involving {t}.",
    "What should a beginner know about {t}?",
    "Compare {t} with something similar.",
    "Summarize the history of {t}.",
]


def main(out_dir: str = "examples", heldout_topics: int = 25, seed: int = 0) -> None:
    topics = [t.strip() for t in TOPICS.split(";") if t.strip()]
    rng = random.Random(seed)
    rng.shuffle(topics)
    held, train = topics[:heldout_topics], topics[heldout_topics:]
    rows = lambda ts: [{"prompt": tpl.format(t=t)} for t in ts for tpl in TEMPLATES]  # noqa: E731
    train_rows, held_rows = rows(train), rows(held)
    rng.shuffle(train_rows)
    rng.shuffle(held_rows)
    held_rows = held_rows[:120]
    for name, data in (("train_prompts", train_rows), ("heldout_prompts", held_rows)):
        table = pa.table({"id": [f"{name}-{i}" for i in range(len(data))], "prompt": [r["prompt"] for r in data]})
        pq.write_table(table, Path(out_dir) / f"{name}.parquet")
        print(f"{name}: {len(data)} prompts")


if __name__ == "__main__":
    main()
