"""Sample rationales per pair from one generator; its candidates are appended to the pair's pool.

A job with several generators runs one Generate stage per generator, one after the other, each in its own
actor pool: every candidate keeps its generator's name, and selection runs over the pooled list, which is kept
in generator order (the order of `generators:`), then candidate index.

Generation in rounds (adaptive sampling, config `rounds`): round 1 samples the first k0 candidates of each
pair; each later round runs this stage again with a higher `k_stop` and `satisfied_above` = rounds.margin, and
samples the next candidates only for pairs whose best valid candidate does not beat their threshold yet
(stages/select.py:satisfied: the pair's decoys and bar, with the rounds' margin; pipeline/plan.py chains
generate -> embed -> score once per round). Candidate k always gets candidate_seed(seed, generator, pair_id, k),
so a pair that runs to the last round has exactly the candidates of a run without rounds.

The target side (generators[].k_target > 0, stages/side.py): the same stage samples the target's rationales
into `target_candidates` with the generator's `target_template`, shown the target's image. Rounds apply per
side (a pair stops getting target rationales once one helps the target side). Seeds: with a pair-aware
target prompt (one that holds {query}) candidate j gets candidate_seed(seed, "<generator>|target", pair_id, j);
with a target-only prompt the pair_id is replaced by a digest of the target's content (text and image bytes),
so every pair that shares a target asks for the same (prompt, image, seeds): the batch sends each distinct
request once, and the embedding cache then embeds each distinct t ⊕ r_t,j once per job. A target-only
rationale is a function of the target alone: pairs that share a target share its rationales and its
target-side label. (Seeding from pair_id would give a shared target one set of rationales per pair.)
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional

import pyarrow as pa

from stages.contract import Contract
from stages.select import HEADROOM_COLUMNS, satisfied
from stages.backends import generator_class
from stages.backends.base import IMAGE_MARKER, GenRequest
from stages.backends.parsing import classify, select_rationale
from stages.backends.prompt_text import with_image_marker
from stages.counters import StageCounters
from stages.images import ImageError, ImageLoader, load_image_bytes
from stages.side import QUERY, TARGET, Side
from stages.spec import StageSpec

# Backends whose k-th answer is the pair's k-th stored rationale whatever the seed (precomputed): a later round
# asks them for candidates 0..k_stop and keeps the new ones. (A GenRequest field for the first candidate index
# would spare that; base.py has none yet.)
ANSWER_BY_POSITION = frozenset({"precomputed"})

# what this stage fills in each candidate it adds (the rest is filled by embed and score)
GENERATED_FIELDS = ("text", "generator", "model", "template", "seed", "sampling", "tokens", "finish_reason", "error")
# what `satisfied` (stages/select.py) reads of a side's candidates and decoys, after a round's embed and score
SATISFIED_FIELDS = ("valid", "delta")


def candidate_seed(base_seed: int, generator: str, pair_id: str, k: int) -> int:
    """Seed of candidate k of a pair: a function of the pair, not of batching or order, so reruns and
    resumed runs sample the same rationales."""
    digest = hashlib.sha256(f"{base_seed}|{generator}|{pair_id}|{k}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def target_only(template: str) -> bool:
    """A target-side prompt that does not show the query: its rationale depends on the target alone."""
    return "{query}" not in template


def target_key(target_text: Optional[str], target_image: Optional[bytes]) -> str:
    """The target's content (its text and image bytes), for seeding target-only rationales: equal targets get
    equal seeds."""
    h = hashlib.sha256((target_text or "").encode())
    h.update(b"\0" + (target_image or b""))
    return "target:" + h.hexdigest()[:32]


def render_target_prompt(template: str, row: dict) -> str:
    """Fill {target} (with its image marker: the generator is shown the target's image) and {query} (text
    only; an image-only query reads as "[image]")."""
    query = (row.get("query_text") or "").replace(IMAGE_MARKER, "").strip()
    if not query and row.get("query_image") is not None:
        query = "[image]"
    target = with_image_marker((row.get("target_text") or "").replace(IMAGE_MARKER, "").strip(),
                               row.get("target_image") is not None)
    return template.replace("{target}", target).replace("{query}", query)


def render_prompt(template: str, row: dict) -> str:
    """Fill {query} and {target}. The query keeps its image marker so the backend puts the image there;
    the generator is shown the query's image only, so an image-only target reads as "[image]"."""
    target = (row.get("target_text") or "").replace(IMAGE_MARKER, "").strip()
    if not target and row.get("target_image_path"):
        target = "[image]"
    # the image marker placed by the one rule every backend follows (first, on its own line, without one)
    query = with_image_marker(row.get("query_text") or "", row.get("query_image") is not None)
    return template.replace("{query}", query).replace("{target}", target)


# each side's prompt: the query side shows the query's image and names the target; the target side shows the target's
RENDER = {QUERY.name: render_prompt, TARGET.name: render_target_prompt}


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    max_new_tokens: int


@dataclass(frozen=True)
class GeneratorSpec:
    """One generator of the config (generators[]), as the stage needs it."""

    name: str
    backend: str
    model: str
    trust_remote_code: bool
    options: Mapping[str, Any]
    sampling: Sampling
    rationale: str  # which part of a thinking model's output is the rationale (stages/backends/parsing.py)
    seed: int

    @classmethod
    def from_config(cls, g) -> "GeneratorSpec":
        """From a generators[] entry (the typed config's node, or the same as a dict)."""
        return cls(name=g["name"], backend=g["backend"], model=g["model"], trust_remote_code=g["trust_remote_code"],
                   options=dict(g["options"]), rationale=g["rationale"], seed=g["seed"],
                   sampling=Sampling(**{k: g["sampling"][k] for k in ("temperature", "top_p", "max_new_tokens")}))


@dataclass(frozen=True)
class GenerateSpec(StageSpec):
    """One Generate step: a generator on one side, in one round.

    k_stop: sample candidates up to this index (at most the generator's count for the side); a row that already
    holds some of this generator's candidates continues from there. satisfied_above: the rounds' margin:
    skip rows whose side is already satisfied at it (later rounds; None in round 1), with epsilon and
    decoys_required as select has them. generator_order: the job's generator names, to keep pooled candidates in
    generator order across rounds. stats_dir: where the actor keeps its counters."""

    generator: GeneratorSpec
    side: Side
    template_name: str
    template: str
    k_stop: int
    max_image_pixels: int
    generator_order: tuple[str, ...] = ()
    satisfied_above: Optional[float] = None
    epsilon: float = 0.0
    decoys_required: int = 0
    stats_dir: Optional[str] = None
    round_index: int = 0

    def contract(self) -> Contract:
        """The columns the step reads and writes (nothing is loaded)."""
        side, field = self.side, self.side.candidates
        # the prompt shows the side's image and names the other side's input; a target-only prompt is seeded from
        # the target's bytes
        reads = ["pair_id", "quarantine_reason", "query_text", "query_image", "target_text", "target_image",
                 "target_image_path", f"{field}.generator"]  # the candidates this generator already added (rounds)
        if self.satisfied_above is not None:  # a later round skips the pairs that a candidate already helps
            reads += [side.column("control_delta")] + [f"{field}.{name}" for name in SATISFIED_FIELDS]
            # the decoys and, as the margin is a share of it, the headroom (stages/score.py)
            reads += [f"{side.decoys}.delta", *HEADROOM_COLUMNS] if self.decoys_required else []
        writes = [field] + [f"{field}.{name}" for name in GENERATED_FIELDS]
        writes += ["quarantine_reason", "quarantine_detail"]  # an image changed or gone since the read
        return Contract(f"generate[{self.generator.name},{side.name}]", tuple(reads), tuple(writes))


class Generate:
    """Ray Data actor: loads one generator in __init__, serves batches in __call__ (through its contract: it
    sees only the columns the contract names)."""

    def __init__(self, spec: GenerateSpec):
        self.spec = spec
        self._contract = spec.contract()
        g = spec.generator
        self.stats = StageCounters(spec.stats_dir, f"generate-{g.name}-{spec.side.name}", stage="generate",
                                   generator=g.name, side=spec.side.name, round=spec.round_index, rows_satisfied=0,
                                   requests=0, requests_shared=0, samples=0, tokens=0)
        self.images = ImageLoader(spec.max_image_pixels)  # this actor's images, loaded from their references
        self.backend = generator_class(g.backend)(g.model, trust_remote_code=g.trust_remote_code, **g.options)
        self.sampling_json = json.dumps(asdict(g.sampling), sort_keys=True)
        self.rank = {name: i for i, name in enumerate(spec.generator_order or [g.name])}
        # a prompt that is a function of the side's input alone (a target-only prompt): pairs that share the input
        # share its rationales, seeded from its content
        self.shared = (spec.side.content_keyed and target_only(spec.template)
                       and g.backend not in ANSWER_BY_POSITION)
        self.stats.ready()

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.stats.batch_started()
        out = self._contract.apply(batch, self._generate_rows)
        self.stats.save()
        return out

    def _generate_rows(self, rows: list[dict]) -> None:
        """Add this generator's candidates to the rows (in place)."""
        spec, g, side = self.spec, self.spec.generator, self.spec.side
        requests, owners, digests = [], [], []  # digests: each request's image
        for row in rows:
            if row.get("quarantine_reason"):
                continue
            self.stats["rows"] += 1
            if spec.satisfied_above is not None and satisfied(row, side, spec.epsilon, spec.satisfied_above,
                                                              spec.decoys_required):
                self.stats["rows_satisfied"] += 1
                continue
            have = sum(1 for c in row.get(side.candidates) or [] if c.get("generator") == g.name)
            if have >= spec.k_stop:
                continue
            ref = row.get(side.image)
            try:
                # seeds of a shared input come from its bytes (as they did when the bytes travelled with the row),
                # loaded (and digest-checked) once for the key and the image
                data = load_image_bytes(ref) if self.shared and ref is not None else None
                image = None if ref is None else self.images.image(ref, data)
            except ImageError as e:  # the reader validated it; only a file changed or gone since gets here
                row["quarantine_reason"], row["quarantine_detail"] = e.reason, e.detail
                continue
            first = 0 if g.backend in ANSWER_BY_POSITION else have
            key_id = target_key(row.get(side.text), data) if self.shared else row["pair_id"]
            seeds = [candidate_seed(g.seed, f"{g.name}{side.seed_namespace}", key_id, k)
                     for k in range(first, spec.k_stop)]
            requests.append(
                GenRequest(
                    prompt=RENDER[side.name](spec.template, row),
                    image=image,
                    seeds=seeds,
                    temperature=g.sampling.temperature,
                    top_p=g.sampling.top_p,
                    max_new_tokens=g.sampling.max_new_tokens,
                    # where a backend looks the side's rationales up (precomputed: "<pair_id>#target")
                    pair_id=key_id if self.shared else f"{row['pair_id']}{side.request_suffix}",
                )
            )
            owners.append((row, have - first))
            digests.append(ref and ref["digest"])
        t0 = time.perf_counter()
        results = self._generate(requests, digests)
        self.stats["model_seconds"] += time.perf_counter() - t0
        for (row, skip), request, generations in zip(owners, requests, results):
            pool = list(row.get(side.candidates) or [])
            for seed, out in zip(request.seeds[skip:], generations[skip:]):
                # thinking models: keep the part the config names; cut-off, empty or echoed output is marked
                rationale = select_rationale(out.text, g.rationale)
                pool.append(
                    {
                        "text": rationale,
                        "generator": g.name,
                        "model": self.backend.model_id,
                        "template": spec.template_name,
                        "seed": seed,
                        "sampling": self.sampling_json,
                        "tokens": out.tokens,
                        "finish_reason": classify(rationale, out.finish_reason, request.prompt),
                        "error": out.error,
                    }
                )
            # generator order, then candidate index (a stable sort keeps each generator's own order)
            row[side.candidates] = sorted(pool, key=lambda c: self.rank.get(c["generator"], len(self.rank)))
            self.stats["requests"] += 1
            self.stats["samples"] += len(request.seeds) - skip
            self.stats["tokens"] += sum(out.tokens or 0 for out in generations[skip:])

    def _generate(self, requests: list[GenRequest], digests: list[Optional[str]]) -> list:
        """The backend's answers, each distinct (prompt, image, seeds, key) sent once: an input shared by many pairs
        of the batch (a target-only prompt) gets one answer, given to every pair. An image is told apart by its
        digest: equal bytes, equal image."""
        if not requests:
            return []
        keys = [(r.prompt, digest, tuple(r.seeds), r.pair_id) for r, digest in zip(requests, digests)]
        distinct: dict = {}
        for key, r in zip(keys, requests):
            distinct.setdefault(key, r)
        self.stats["requests_shared"] += len(requests) - len(distinct)
        answers = dict(zip(distinct, self.backend.generate(list(distinct.values()))))
        return [answers[k] for k in keys]


GenerateSpec.stage = Generate
