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

The target side (generators[].k_target > 0, side="target"): the same stage samples the target's rationales
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
from typing import Optional

import pyarrow as pa

from stages.contract import Contract
from stages.select import satisfied
from stages.backends import generator_class
from stages.backends.base import IMAGE_MARKER, GenRequest
from stages.backends.parsing import classify, select_rationale
from stages.backends.prompt_text import with_image_marker
from stages.counters import StageCounters
from stages.images import ImageError, ImageLoader, load_image_bytes

# Backends whose k-th answer is the pair's k-th stored rationale whatever the seed (precomputed): a later round
# asks them for candidates 0..k_stop and keeps the new ones. (A GenRequest field for the first candidate index
# would spare that; base.py has none yet.)
ANSWER_BY_POSITION = frozenset({"precomputed"})

SIDES = {"query": "candidates", "target": "target_candidates"}
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


class Generate:
    """Ray Data actor: loads one generator in __init__, serves batches in __call__ (through its contract: it
    sees only the columns `contract` names).

    k_stop: sample candidates up to this index (default: the generator's k); a row that already holds some
    of this generator's candidates continues from there. satisfied_above: the rounds' margin: skip rows whose side
    is already satisfied at it (later rounds; None in round 1), with epsilon and decoys_required as select has
    them. generator_order: the job's generator names, to keep pooled candidates in generator order across rounds.
    stats_dir: where this actor keeps its counters."""

    @staticmethod
    def contract(generator: dict, template: str, max_image_pixels: int, k_stop: Optional[int] = None,
                 satisfied_above: Optional[float] = None, generator_order: Optional[list[str]] = None,
                 stats_dir: Optional[str] = None, round_index: int = 0, side: str = "query", epsilon: float = 0.0,
                 decoys_required: int = 0) -> Contract:
        """The columns one Generate step reads and writes (its constructor's arguments; nothing is loaded)."""
        field = SIDES[side]
        reads = ["pair_id", "quarantine_reason", "query_text", "query_image", "target_text",
                 f"{field}.generator"]  # the candidates this generator already added (rounds)
        # the query side shows the query's image and names the target ("[image]" for an image-only one); the
        # target side shows the target's image, and seeds a target-only prompt from the target's bytes
        reads.append("target_image_path" if side == "query" else "target_image")
        if satisfied_above is not None:  # a later round skips the pairs that a candidate already helps
            prefix = "" if side == "query" else "target_"
            reads += [f"{prefix}control_delta"] + [f"{field}.{name}" for name in SATISFIED_FIELDS]
            reads += [f"{prefix}decoys.delta"] if decoys_required else []
        writes = [field] + [f"{field}.{name}" for name in GENERATED_FIELDS]
        writes += ["quarantine_reason", "quarantine_detail"]  # an image changed or gone since the read
        suffix = "" if side == "query" else ",target"
        return Contract(f"generate[{generator['name']}{suffix}]", tuple(reads), tuple(writes))

    def __init__(self, generator: dict, template: str, max_image_pixels: int, k_stop: Optional[int] = None,
                 satisfied_above: Optional[float] = None, generator_order: Optional[list[str]] = None,
                 stats_dir: Optional[str] = None, round_index: int = 0, side: str = "query", epsilon: float = 0.0,
                 decoys_required: int = 0):
        self._contract = Generate.contract(generator, template, max_image_pixels, k_stop, satisfied_above,
                                           generator_order, stats_dir, round_index, side, epsilon, decoys_required)
        self.side = side
        self.field = SIDES[side]
        suffix = "" if side == "query" else "-target"
        self.stats = StageCounters(stats_dir, f"generate-{generator['name']}{suffix}", stage="generate",
                                   generator=generator["name"], round=round_index, rows_satisfied=0, requests=0,
                                   samples=0, tokens=0, **({} if side == "query" else {"side": side,
                                                                                     "requests_shared": 0}))
        self.cfg = generator
        self.template = template
        self.images = ImageLoader(max_image_pixels)  # this actor's images, loaded from their references
        backend_cls = generator_class(generator["backend"])
        self.backend = backend_cls(
            generator["model"], trust_remote_code=generator["trust_remote_code"], **generator.get("options", {})
        )
        self.sampling = dict(generator["sampling"])
        self.sampling_json = json.dumps(self.sampling, sort_keys=True)
        # rounds
        k_max = generator["k"] if side == "query" else generator["k_target"]
        self.k_stop = k_max if k_stop is None else min(k_stop, k_max)
        self.satisfied_above = satisfied_above
        self.epsilon = epsilon
        self.decoys_required = decoys_required
        self.rank = {name: i for i, name in enumerate(generator_order or [generator["name"]])}
        self.stats.ready()

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.stats.batch_started()
        out = self._contract.apply(batch, self._generate_rows)
        self.stats.save()
        return out

    def _generate_rows(self, rows: list[dict]) -> None:
        """Add this generator's candidates to the rows (in place)."""
        requests, owners, digests = [], [], []  # digests: each request's image
        for row in rows:
            if row.get("quarantine_reason"):
                continue
            self.stats["rows"] += 1
            if self.satisfied_above is not None and satisfied(row, self.side, self.epsilon, self.satisfied_above,
                                                              self.decoys_required):
                self.stats["rows_satisfied"] += 1
                continue
            have = sum(1 for c in row.get(self.field) or [] if c.get("generator") == self.cfg["name"])
            if have >= self.k_stop:
                continue
            ref = row["query_image"] if self.side == "query" else row.get("target_image")
            shared = (self.side == "target" and target_only(self.template)
                      and self.cfg["backend"] not in ANSWER_BY_POSITION)
            try:
                # seeds of a shared target come from its bytes (as they did when the bytes travelled with the row),
                # loaded (and digest-checked) once for the key and the image
                data = load_image_bytes(ref) if shared and ref is not None else None
                image = None if ref is None else self.images.image(ref, data)
                key_id = target_key(row.get("target_text"), data) if shared else None
            except ImageError as e:  # the reader validated it; only a file changed or gone since gets here
                row["quarantine_reason"], row["quarantine_detail"] = e.reason, e.detail
                continue
            first = 0 if self.cfg["backend"] in ANSWER_BY_POSITION else have
            if self.side == "query":
                seeds = [candidate_seed(self.cfg["seed"], self.cfg["name"], row["pair_id"], k)
                         for k in range(first, self.k_stop)]
                prompt, key_id = render_prompt(self.template, row), row["pair_id"]
            else:
                key_id = key_id if shared else row["pair_id"]
                seeds = [candidate_seed(self.cfg["seed"], f"{self.cfg['name']}|target", key_id, k)
                         for k in range(first, self.k_stop)]
                # precomputed target rationales are looked up under "<pair_id>#target"
                prompt = render_target_prompt(self.template, row)
                key_id = key_id if shared else f"{row['pair_id']}#target"
            requests.append(
                GenRequest(
                    prompt=prompt,
                    image=image,
                    seeds=seeds,
                    temperature=self.sampling["temperature"],
                    top_p=self.sampling["top_p"],
                    max_new_tokens=self.sampling["max_new_tokens"],
                    pair_id=row["pair_id"] if self.side == "query" else key_id,
                )
            )
            owners.append((row, have - first))
            digests.append(ref and ref["digest"])
        t0 = time.perf_counter()
        results = self._generate(requests, digests)
        self.stats["model_seconds"] += time.perf_counter() - t0
        for (row, skip), request, generations in zip(owners, requests, results):
            pool = list(row.get(self.field) or [])
            for seed, g in zip(request.seeds[skip:], generations[skip:]):
                # thinking models: keep the part the config names; cut-off, empty or echoed output is marked
                rationale = select_rationale(g.text, self.cfg["rationale"])
                pool.append(
                    {
                        "text": rationale,
                        "generator": self.cfg["name"],
                        "model": self.backend.model_id,
                        "template": self.cfg["template" if self.side == "query" else "target_template"],
                        "seed": seed,
                        "sampling": self.sampling_json,
                        "tokens": g.tokens,
                        "finish_reason": classify(rationale, g.finish_reason, request.prompt),
                        "error": g.error,
                    }
                )
            # generator order, then candidate index (a stable sort keeps each generator's own order)
            row[self.field] = sorted(pool, key=lambda c: self.rank.get(c["generator"], len(self.rank)))
            self.stats["requests"] += 1
            self.stats["samples"] += len(request.seeds) - skip
            self.stats["tokens"] += sum(g.tokens or 0 for g in generations[skip:])

    def _generate(self, requests: list[GenRequest], digests: list[Optional[str]]) -> list:
        """The backend's answers; on the target side each distinct (prompt, image, seeds, key) is sent once (a
        target shared by many pairs of the batch, with a target-only prompt), its answer given to every pair.
        An image is told apart by its digest: equal bytes, equal image."""
        if not requests:
            return []
        if self.side == "query":
            return self.backend.generate(requests)
        keys = [(r.prompt, digest, tuple(r.seeds), r.pair_id) for r, digest in zip(requests, digests)]
        distinct: dict = {}
        for key, r in zip(keys, requests):
            distinct.setdefault(key, r)
        self.stats["requests_shared"] += len(requests) - len(distinct)
        answers = dict(zip(distinct, self.backend.generate(list(distinct.values()))))
        return [answers[k] for k in keys]
