"""Text pairs whose right answer is known, for measuring labels with a real embedder (MiniLM).

Each item is a query that does not name its answer, a target that does, a hard negative of the same kind, and
rationales of known quality:
  evidence    names the target by the evidence the query asks for: should help
  misleading  points at the hard negative: should hurt (delta < 0 in pair-aware mode)
  restating   the query in other words: no content
and, shared by all items, off-topic text and format-only "reasoning" with no content.
"""
from __future__ import annotations

import json
from pathlib import Path

# (query, what the query asks for, target, its description, hard negative, its description). The target does
# not repeat the query's words: only knowing the answer links them, so the plain query is unsure between the
# target and the hard negative, and a rationale can move it either way.
FACTS = [
    ("Which planet is known for its spectacular ring system?", "the planet with the spectacular ring system",
     "Saturn", "the sixth planet from the Sun", "Jupiter", "the fifth planet from the Sun"),
    ("Which animal is the fastest runner on land?", "the fastest land animal",
     "The cheetah", "a big cat of the African savanna", "The leopard", "a big cat of Africa and Asia"),
    ("Which instrument has hammers that strike strings when keys are pressed?",
     "the keyboard instrument whose hammers strike strings",
     "The piano", "an instrument invented in Italy around 1700", "The harpsichord", "an instrument of the Baroque era"),
    ("Which city is home to the Eiffel Tower?", "the city of the Eiffel Tower",
     "Paris", "a city in northern France", "Lyon", "a city in southeastern France"),
    ("Which metal is liquid at room temperature?", "the metal that is liquid at room temperature",
     "Mercury", "a chemical element with the symbol Hg", "Gallium", "a chemical element with the symbol Ga"),
    ("Which organ pumps blood through the body?", "the organ that pumps blood",
     "The heart", "an organ in the chest", "The lungs", "organs in the chest"),
    ("Which gas do plants absorb for photosynthesis?", "the gas plants absorb for photosynthesis",
     "Carbon dioxide", "a gas made of carbon and oxygen atoms", "Oxygen", "a gas made of oxygen atoms"),
    ("Which sport is played at Wimbledon?", "the sport of Wimbledon",
     "Tennis", "a racket sport played by two or four players", "Badminton", "a racket sport played by two or four players"),
    ("Which painter cut off part of his own ear?", "the painter who cut off part of his ear",
     "Vincent van Gogh", "a Dutch painter of the 19th century", "Paul Gauguin", "a French painter of the 19th century"),
    ("Which is the largest hot desert in the world?", "the largest hot desert",
     "The Sahara", "a desert in Africa", "The Gobi", "a desert in Asia"),
    ("Which is the largest living bird?", "the largest living bird",
     "The ostrich", "a flightless bird of Africa", "The emu", "a flightless bird of Australia"),
    ("Which language has the most native speakers?", "the language with the most native speakers",
     "Mandarin Chinese", "a language of East Asia", "Japanese", "a language of East Asia"),
    ("Which vitamin does skin make in sunlight?", "the vitamin that skin makes in sunlight",
     "Vitamin D", "a fat-soluble vitamin", "Vitamin A", "a fat-soluble vitamin"),
    ("Which ocean is the largest?", "the largest ocean",
     "The Pacific Ocean", "an ocean between Asia and the Americas", "The Atlantic Ocean",
     "an ocean between Europe and the Americas"),
    ("Who proposed the theory of general relativity?", "the scientist who proposed general relativity",
     "Albert Einstein", "a physicist born in Germany in 1879", "Max Planck", "a physicist born in Germany in 1858"),
    ("Which fruit is dried to make raisins?", "the fruit dried to make raisins",
     "Grapes", "small round fruit that grow in bunches", "Cherries", "small round fruit that grow on trees"),
    ("Which element is the basis of all organic compounds?", "the element at the basis of organic compounds",
     "Carbon", "the element with atomic number 6", "Nitrogen", "the element with atomic number 7"),
    ("Which country gave the Statue of Liberty to the United States?", "the country that gave the Statue of Liberty",
     "France", "a country in Western Europe", "Belgium", "a country in Western Europe"),
    ("Which instrument measures atmospheric pressure?", "the instrument that measures air pressure",
     "A barometer", "a weather instrument", "A hygrometer", "a weather instrument"),
    ("Which mountain is the highest above sea level?", "the highest mountain above sea level",
     "Mount Everest", "a mountain on the border of Nepal and China", "K2", "a mountain on the border of Pakistan and China"),
    ("Which blood cells carry oxygen?", "the blood cells that carry oxygen",
     "Red blood cells", "cells found in human blood", "White blood cells", "cells found in human blood"),
    ("Which composer kept writing music after going deaf?", "the composer who kept writing after going deaf",
     "Ludwig van Beethoven", "a German composer born in 1770", "Joseph Haydn", "an Austrian composer born in 1732"),
    ("Which insect makes honey?", "the insect that makes honey",
     "The honeybee", "an insect that lives in colonies", "The ant", "an insect that lives in colonies"),
    ("Which shape has exactly three sides?", "the shape with exactly three sides",
     "A triangle", "a polygon studied in geometry", "A square", "a polygon studied in geometry"),
]


def _name(name: str) -> str:
    """"The cheetah" in the middle of a sentence: "the cheetah"."""
    return name[0].lower() + name[1:] if name.split()[0] in ("The", "A") else name


def _item(query, fact, target, target_desc, negative, negative_desc) -> tuple:
    sentence = fact[0].upper() + fact[1:]
    return (query, f"{target}, {target_desc}.", f"{negative}, {negative_desc}.",
            f"{sentence} is {_name(target)}.",    # evidence: the answer the query needs
            f"{sentence} is {_name(negative)}.",  # misleading: the same claim about the hard negative
            f"We are looking for {fact}.")        # restating: the query in other words


# (query, target, hard negative, evidence, misleading, restating)
ITEMS = [_item(*fact) for fact in FACTS]

OFF_TOPIC = [
    "Bread dough rises when yeast ferments the sugars in warm water.",
    "The stock market closed slightly higher on Tuesday afternoon.",
    "Remember to water houseplants once a week during the summer.",
    "A good pair of running shoes should fit snugly at the heel.",
]
FORMAT_ONLY = [
    "Let me think about this step by step before answering.",
    "First, I will carefully consider the question. Then I will give my answer.",
    "Okay, let's reason through this carefully and logically.",
    "To answer this, I need to analyze the query and think it through.",
]
KINDS = ("evidence", "misleading", "off_topic", "format_only", "restating")


def candidates(i: int, item: tuple, with_evidence: bool) -> list[tuple[str, str]]:
    """(kind, text) of one pair's candidates, in a fixed order that varies with i (the evidence one is not
    always first, so that ties or index order cannot pass for a choice)."""
    _, _, _, evidence, misleading, restating = item
    cands = [("misleading", misleading), ("off_topic", OFF_TOPIC[i % len(OFF_TOPIC)]),
             ("format_only", FORMAT_ONLY[i % len(FORMAT_ONLY)]), ("restating", restating)]
    if with_evidence:
        cands.insert(i % (len(cands) + 1), ("evidence", evidence))
    return cands


def write(root: Path) -> dict:
    """An MMEB-style input with two subsets, and the rationales for the precomputed generator.
    `evidence`: every kind of rationale; `content_free`: the same pairs without the evidence one.
    Negatives: the hard negative and two other items' targets. Returns paths and {pair_id: [kinds]}."""
    (root / "pairs").mkdir(parents=True, exist_ok=True)
    kinds, rationales = {}, []
    for subset, with_evidence in (("evidence", True), ("content_free", False)):
        lines = []
        for i, item in enumerate(ITEMS):
            query, target, hard = item[:3]
            others = [ITEMS[(i + d) % len(ITEMS)][1] for d in (5, 11)]
            pair_id = f"{subset}-{i:02d}"
            lines.append(json.dumps({"pair_id": pair_id, "subset": subset, "qry": query, "pos_text": target,
                                     "neg_text": [hard, *others]}))
            cands = candidates(i, item, with_evidence)
            kinds[pair_id] = [k for k, _ in cands]
            rationales.append(json.dumps({"pair_id": pair_id, "rationales": [t for _, t in cands]}))
        (root / "pairs" / f"{subset}.jsonl").write_text("\n".join(lines) + "\n")
    (root / "rationales.jsonl").write_text("\n".join(rationales) + "\n")
    return {"input": str(root / "pairs"), "rationales": str(root / "rationales.jsonl"), "kinds": kinds}
