"""Text pairs whose right answer is known, for measuring labels with a real embedder (all-MiniLM-L6-v2), built from
tests/constructed_facts.py and checked against the embedder itself:

- hard: the query is mostly a hard negative's description plus one decisive clue of the target ("Which planet is
  the largest gas giant ..., and has the most spectacular ring system?"). Kept only where the plain query ranks
  a negative above the target and the evidence rationale puts the target first.
- easy: the query is the target's own description; kept only where the plain query already ranks the target first.

Each pair has five candidates of known kind, in an order that moves with the pair (so that ties or index order
cannot pass for a choice): evidence (names the clue and whose it is), misleading (names the hard negative),
off-topic text, format-only "reasoning" and a restatement of the query; every filler text differs. The
`*_content_free` subsets hold the same pairs without the evidence candidate.

Two wordings of the same facts (WORDINGS): `plain`, the one the tests and the README's tables use, and `varied`,
other templates for every text (queries, evidence, misleading, restatements, longer filler), to check that the
labels hold for sets written another way.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from tests.constructed_facts import CATEGORIES

REPO = Path(__file__).resolve().parent.parent

KINDS = ("evidence", "misleading", "off_topic", "format_only", "restating")
CONTENT_FREE = KINDS[1:]
QUERY, TARGET, REASONED = "Query: {text}", "Candidate: {text}", "Query: {text}\nReasoning: {rationale}"

_SUBJECTS = ["The bakery on the corner", "My neighbour's dog", "The evening train", "A new coffee machine",
             "The city council", "Our garden hose", "The school choir", "A yellow umbrella", "The local football club",
             "An old bicycle", "The weekend market", "A paper kite", "The office printer", "A jar of honey",
             "The night bus"]
_PREDICATES = ["opened an hour late this morning", "was repainted green last spring", "needs new batteries again",
               "won a small prize at the fair", "was left out in the rain", "costs less than it did last year",
               "made a lot of noise on Sunday", "was moved to the back room", "has a loose handle",
               "sold out before noon", "is older than it looks"]
_OPENINGS = ["Let me think about this step by step.", "Okay, let's reason through this carefully.",
             "First, I will read the question closely.", "To answer this, I need to analyse the request.",
             "Let me break this problem down.", "I will consider each option in turn.",
             "Let's approach this methodically.", "Thinking it over carefully:"]
_CLOSINGS = ["Then I will give my answer.", "After that, the answer should be clear.", "Then I can decide.",
             "This should lead to the right choice.", "I will weigh the options before deciding.",
             "Then the conclusion follows.", "Finally I will state the result.", "Then I will pick the best match.",
             "That settles it."]


@dataclass(frozen=True)
class Wording:
    """How a set's texts are written: templates over {category}, {described} (a description), {clue} and {name}
    (an entity's name, lowered after "the"), and the parts of the filler."""

    hard_query: str
    easy_query: str
    hard_restating: str
    easy_restating: str
    evidence: str
    misleading: str
    subjects: tuple
    predicates: tuple
    openings: tuple
    closings: tuple


WORDINGS = {
    "plain": Wording(
        hard_query="Which {category} is {described}, and {clue}?", easy_query="Which {category} is {described}?",
        hard_restating="We are looking for the {category} that is {described} and {clue}.",
        easy_restating="We are looking for the {category} that is {described}.",
        evidence="The deciding detail is that it {clue}, which is true only of {name}.",
        misleading="The description fits {name}, so the answer is {name}.",
        subjects=tuple(_SUBJECTS), predicates=tuple(_PREDICATES), openings=tuple(_OPENINGS),
        closings=tuple(_CLOSINGS)),
    "varied": Wording(
        hard_query="Name the {category} that is {described} and that {clue}.",
        easy_query="Name the {category} that is {described}.",
        hard_restating="So the task asks for a {category} which is {described}, and which {clue}.",
        easy_restating="So the task asks for a {category} which is {described}.",
        evidence="The key clue is that it {clue}. Of all the options, that holds only for {name}, so {name} is "
                 "the answer.",
        misleading="Everything in the description matches {name}; I would pick {name}.",
        subjects=("The harbour ferry", "A ceramic teapot", "The village library", "My cousin's bicycle",
                  "The museum cafe", "A stack of old maps", "The hotel lift", "Our kitchen radio", "The tram depot",
                  "A wooden chess set", "The corner pharmacy", "A box of crayons", "The swimming pool",
                  "The rooftop garden", "A pair of hiking boots", "The parking meter", "A glass vase"),
        predicates=("was closed for cleaning all of last week, and nobody seemed to mind very much",
                    "got a fresh coat of paint that everyone agreed looked nicer than before",
                    "has been making an odd rattling sound whenever the weather turns cold",
                    "was featured in a small article in the weekend newspaper",
                    "ended up costing a little more than what had been planned at first",
                    "was moved across the street to make room for the new bus stop",
                    "turned out to be older than the records had suggested"),
        openings=("Before answering, let me carefully consider what is being asked here.",
                  "I want to be careful and methodical about this one.",
                  "Let me go through the question slowly and make sure I understand it.",
                  "There are a few things to weigh before settling on an answer.",
                  "I'll start by laying out my reasoning in a clear way."),
        closings=("Once I have done that, the answer should follow naturally.",
                  "After weighing everything, I will commit to a single choice.",
                  "With that done, I can state my final answer.", "That way the conclusion will be well supported.",
                  "Then I will name the option that fits best.")),
}
PLAIN = WORDINGS["plain"]


def _lower(name: str) -> str:
    return name[0].lower() + name[1:] if name.split()[0] in ("The", "A", "An") else name


def filler(i: int, wording: Wording = PLAIN) -> tuple[str, str]:
    """(off-topic, format-only) texts of pair i: different for every pair of a set."""
    w = wording
    off = f"{w.subjects[i % len(w.subjects)]} {w.predicates[(i // len(w.subjects)) % len(w.predicates)]}."
    fmt = f"{w.openings[i % len(w.openings)]} {w.closings[(i // len(w.openings)) % len(w.closings)]}"
    return off, fmt


def _pair(category: str, target: tuple, negative: tuple, others: list[tuple], hard: bool, wording: Wording) -> dict:
    (name, desc, clue), (neg_name, neg_desc, _) = target, negative
    fields = {"category": category, "described": neg_desc if hard else desc, "clue": clue}
    query, restating = ((wording.hard_query, wording.hard_restating) if hard else
                        (wording.easy_query, wording.easy_restating))
    return {"query": query.format(**fields), "target": f"{name}, {desc}.",
            "negatives": [f"{e[0]}, {e[1]}." for e in [negative, *others]],
            "evidence": wording.evidence.format(**fields, name=_lower(name)),
            "misleading": wording.misleading.format(name=_lower(neg_name)),
            "restating": restating.format(**fields)}


def _pairs_with(shift: int, hard: bool, wording: Wording) -> list[tuple[str, dict]]:
    out = []
    for category, entities in CATEGORIES.items():
        size = len(entities)
        for i, entity in enumerate(entities):
            others = [entities[(i + d) % size] for d in range(1, size) if d != shift][:2]
            out.append((f"{category}-{i}", _pair(category, entity, entities[(i + shift) % size], others, hard,
                                                 wording)))
    return out


def _ranks_first(embed, queries: list[str], pairs: list[dict]) -> list[bool]:
    """Whether each query ranks its pair's target above every negative."""
    texts = sorted({TARGET.replace("{text}", t) for p in pairs for t in [p["target"], *p["negatives"]]})
    vectors = dict(zip(texts, embed(texts)))
    out = []
    for v, p in zip(embed(queries), pairs):
        sims = [vectors[TARGET.replace("{text}", t)] @ v for t in [p["target"], *p["negatives"]]]
        out.append(bool(max(sims[1:]) < sims[0]))
    return out


def build(embed, wording: Wording = PLAIN) -> dict[str, list[dict]]:
    """{"hard": [...], "easy": [...]}: the pairs that the embedder (texts -> unit vectors) gets as their name says.
    A hard pair takes, for each target, the first hard negative whose pair qualifies."""
    hard: dict[str, dict] = {}
    for shift in range(1, 6):
        todo = [(key, p) for key, p in _pairs_with(shift, True, wording) if key not in hard]
        todo = [(key, p) for key, p in todo if len(p["negatives"]) == 3]
        plain = _ranks_first(embed, [QUERY.replace("{text}", p["query"]) for _, p in todo], [p for _, p in todo])
        fixed = _ranks_first(embed, [REASONED.replace("{text}", p["query"]).replace("{rationale}", p["evidence"])
                                     for _, p in todo], [p for _, p in todo])
        hard.update({key: p for (key, p), a, b in zip(todo, plain, fixed) if not a and b})
    easy_all = _pairs_with(1, False, wording)
    plain = _ranks_first(embed, [QUERY.replace("{text}", p["query"]) for _, p in easy_all], [p for _, p in easy_all])
    return {"hard": [hard[key] for key, _ in easy_all if key in hard],  # in the facts' order
            "easy": [p for (_, p), ok in zip(easy_all, plain) if ok]}


def candidates(i: int, pair: dict, with_evidence: bool, wording: Wording = PLAIN) -> list[tuple[str, str]]:
    off, fmt = filler(i, wording)
    texts = {"misleading": pair["misleading"], "off_topic": off, "format_only": fmt, "restating": pair["restating"]}
    out = [(kind, texts[kind]) for kind in CONTENT_FREE]
    if with_evidence:
        out.insert(i % (len(out) + 1), ("evidence", pair["evidence"]))
    return out


LAYOUTS = ("per_set", "one_subset")


def write(root: Path, sets: dict[str, list[dict]], wording: Wording = PLAIN, layout: str = "per_set") -> dict:
    """An MMEB-style input and the rationales for the precomputed generator, in the wording the sets were built
    with. Layout per_set: each set and condition is its own subset (`<set>_evidence`: all five candidates,
    `<set>_content_free`: without the evidence one). Layout one_subset: each condition holds every set's pairs in
    one subset, `all_<condition>`, in a seeded shuffle, so that decoys are drawn and margins calibrated across hard
    and easy pairs, as in a real subset. A pair's id is `<set>_<condition>-<index>` in both (set_of). Returns the
    paths and {pair_id: [candidate kinds]}."""
    files: dict[str, list[str]] = {}
    kinds, rationales = {}, []
    for name, pairs in sets.items():
        for condition, with_evidence in (("evidence", True), ("content_free", False)):
            for i, p in enumerate(pairs):
                pair_id = f"{name}_{condition}-{i:03d}"
                subset = f"{name}_{condition}" if layout == "per_set" else f"all_{condition}"
                files.setdefault(subset, []).append(json.dumps({"pair_id": pair_id, "subset": subset,
                                                                "qry": p["query"], "pos_text": p["target"],
                                                                "neg_text": p["negatives"]}))
                cands = candidates(i, p, with_evidence, wording)
                kinds[pair_id] = [k for k, _ in cands]
                rationales.append(json.dumps({"pair_id": pair_id, "rationales": [t for _, t in cands]}))
    (root / "pairs").mkdir(parents=True, exist_ok=True)
    for subset, lines in files.items():
        if layout == "one_subset":
            lines = [lines[j] for j in np.random.default_rng(0).permutation(len(lines))]
        (root / "pairs" / f"{subset}.jsonl").write_text("\n".join(lines) + "\n")
    (root / "rationales.jsonl").write_text("\n".join(rationales) + "\n")
    return {"input": str(root / "pairs"), "rationales": str(root / "rationales.jsonl"), "kinds": kinds}


def set_of(row: dict) -> str:
    """The set and condition a labelled row was written for (`hard_evidence`, ...), whatever the layout."""
    return row["pair_id"].rsplit("-", 1)[0]


def run_job(world: dict, root: Path, mode: str, overrides=(), baseline: bool = False):
    """Label the written sets (world: write()'s paths and kinds, and the MiniLM "model") with the job's own stages
    through pipeline/plan.py:run_local, with job_config's config. Returns the config and the labelled rows."""
    from pipeline import config
    from pipeline.plan import run_local
    from stages.inputs import plan_shards

    cfg = config.load(job_config(world, root, mode, baseline), list(overrides))
    config.resolve_paths(cfg)
    return cfg, run_local(cfg, plan_shards(config.to_dict(cfg)["input"]))


def job_config(world: dict, root: Path, mode: str, baseline: bool = False, rows_per_shard: int = 200) -> Path:
    """A job config (written under root) over the written sets: the precomputed generator gives each pair its five
    candidates, configs/demo.yaml's scoring in `mode` or (baseline) the fixed rule it replaces, bench/baseline.yaml's
    keys on top of it. No in-shard negatives: each pair brings its own. Embeddings are cached in root/cache, the
    output goes to root/out-<mode>."""
    scoring = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["scoring"]
    if baseline:
        scoring.update(yaml.safe_load((REPO / "bench" / "baseline.yaml").read_text())["scoring"])
    name = f"{mode}-baseline" if baseline else mode
    spec = {"input": {"path": world["input"], "format": "mmeb", "rows_per_shard": rows_per_shard},
            "generators": [{"name": "given", "backend": "precomputed", "model": "given", "k": 5,
                            "options": {"path": world["rationales"]}}],
            "embedder": {"backend": "sentence_transformers", "model": world["model"], "cache_dir": str(root / "cache"),
                         "resources": {"num_cpus": 1, "num_gpus": 0, "pool_size": 1, "batch_size": 64}},
            "scoring": {**scoring, "mode": mode, "in_shard_negatives": 0}, "output": {"dir": str(root / f"out-{name}")}}
    path = root / f"job-{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def minilm_embed(model_path: str):
    """texts -> unit vectors with the job's own sentence-transformers backend."""
    from stages.backends.base import EmbedInput
    from stages.backends.hf.embedders import SentenceTransformersEmbedder

    backend = SentenceTransformersEmbedder(model_path, batch_size=64)
    return lambda texts: np.asarray(backend.embed([EmbedInput(text=t, image=None) for t in texts]))
