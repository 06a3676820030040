"""Embed every side of a pair and store the cosine similarities that scoring needs.

Per pair: E(q) without reasoning, E(q ⊕ r_k) for each candidate, E(t+), E(t-_j) for each negative, and with
content-free controls (scoring.controls) E(q ⊕ c_i) for each control text, in the same reasoned template as a
rationale (so a control differs from a candidate only by its content).
Vectors are L2-normalised, so cos is a dot product. Only similarities leave this stage: a pair's
vectors would be (K + 2 + J) x dim floats, its similarities are (K + 1) x (J + 1).

The least model work: every input is keyed by its content (embedder identity, instruction-filled text, the
image's digest, which its reference carries; stages/embed_cache.py) and looked up in the embedding cache before
anything runs. With the disk cache
on, the cache is shared by every Embed actor of the job and by later jobs, so each distinct input is embedded
once per job (a label shared by a whole subset, an image shared by many pairs, a target that is another pair's
negative), not once per pair or batch. Within a batch, identical inputs are looked up once, and only the
inputs that miss load their images (stages/images.py:ImageLoader: read once, digest checked, kept decoded in
a small per-actor cache) and are sent to the model.

The target side (generators[].k_target > 0): E(t ⊕ r_t,j) in embedder.reasoned_target_instruction with the
target's image, and with controls E(t ⊕ c_i) ("{query}" in a control stands for the target's own text there:
the restatement that adds nothing). Stored: target_candidates[j].s_k = cos(E(q), E(t ⊕ r_t,j)),
target_s_control[i] = cos(E(q), E(t ⊕ c_i)), and per query candidate s_joint[j] = cos(E(q ⊕ r_q,k),
E(t ⊕ r_t,j)). A target-only rationale is the same text for every pair that shares the target
(stages/generate.py), so its input has one cache key: embedded once per job, looked up for the other pairs.
When a pass adds candidates on either side, every (k, j) is recomputed from vectors the cache returns.

Decoys (stages/decoys.py, the decoy rule): each decoy text is embedded as a candidate's would be, on the pair's
own input: E(q ⊕ d) with decoys[d].s_k = cos(E(q ⊕ d), E(t+)) and s_neg, and on the target side E(t ⊕ d) with
target_decoys[d].s_k = cos(E(q), E(t ⊕ d)). They are drawn once (round 1) and embedded the first time they pass.

Generation in rounds (stages/generate.py) calls this stage once per round: a row whose similarities are
already set only gets its new candidates embedded; its target and negatives come back from the cache.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import numpy as np
import pyarrow as pa

from stages.backends import embedder_class
from stages.backends.base import IMAGE_MARKER, EmbedInput
from stages.contract import Contract
from stages.counters import StageCounters
from stages.embed_cache import EmbeddingCache, embedder_identity
from stages.images import ImageError, ImageLoader, digest_bytes
from stages.side import QUERY, Side, sides_of
from stages.spec import StageSpec

log = logging.getLogger(__name__)

# Candidates that produced no text are not embedded.
NOT_EMBEDDED = frozenset({"error", "empty"})


def _fill(template: str, text: str | None, rationale: str | None = None) -> str:
    # str.replace, not str.format: user text may contain braces
    out = template.replace("{text}", text or "")
    return out if rationale is None else out.replace("{rationale}", rationale)


def control_text(control: str, query_text: str | None) -> str:
    """A control as it is appended to one query: "{query}" stands for the query's own text (without its image
    marker, which the template's {text} already holds), so a control can be a plain restatement of the query,
    the rationale that adds nothing the query did not say."""
    if "{query}" not in control:
        return control
    return control.replace("{query}", " ".join((query_text or "").replace(IMAGE_MARKER, " ").split()))


def embeddable(cand: dict) -> bool:
    return cand.get("finish_reason") not in NOT_EMBEDDED and bool(cand.get("text"))


def needs_embedding(cand: dict) -> bool:
    """A candidate this stage has not embedded yet (an earlier round's candidates already carry s_k)."""
    return embeddable(cand) and cand.get("s_k") is None


class _Inputs:
    """The distinct embedder inputs of a batch, by cache key."""

    def __init__(self, cache: EmbeddingCache):
        self.cache = cache
        self.keys: list[str] = []
        self.index: dict[str, int] = {}
        self.sources: list[tuple[str, Optional[dict]]] = []  # text, image reference

    def add(self, text: str, image: Optional[dict]) -> int:
        key = self.cache.key(text, digest_bytes(image))
        if key not in self.index:
            self.index[key] = len(self.keys)
            self.keys.append(key)
            self.sources.append((text, image))
        return self.index[key]


@dataclass(frozen=True)
class EmbedderSpec:
    """The embedder of the config (embedder:), as the stage needs it."""

    backend: str
    model: str
    pooling: str
    max_length: int
    trust_remote_code: bool
    options: Mapping[str, Any]
    query_instruction: str
    reasoned_query_instruction: str
    target_instruction: str
    reasoned_target_instruction: str

    @classmethod
    def from_config(cls, e) -> "EmbedderSpec":
        """From the config's embedder (the typed config's node, or the same as a dict)."""
        return cls(**{f: dict(e[f]) if f == "options" else e[f] for f in cls.__dataclass_fields__})

    def identity(self, vector_settings: Mapping) -> str:
        """What decides its vectors, for the embedding cache's keys (stages/embed_cache.py): the config's side and
        what the loaded backend decided on its machine (EmbedderBackend.vector_settings)."""
        return embedder_identity({"backend": self.backend, "model": self.model, "pooling": self.pooling,
                                  "max_length": self.max_length, "options": dict(self.options),
                                  "vector_settings": dict(vector_settings)})


@dataclass(frozen=True)
class EmbedSpec(StageSpec):
    """One Embed step (one per round). cache_dir: the disk cache shared by every actor and job (None: the actor's
    memory only). stats_dir: where the actor keeps its counters (lookups, hits, forwards, model seconds) as one
    small JSON file, rewritten after each batch; None: nowhere. controls: the content-free control texts
    (scoring.controls), embedded with each side's input the first time a pair passes; they go through the cache
    like any input, so a control on a query shared by many pairs is embedded once. sides: the sides that have
    rationales (the target side only with k_target > 0). decoys: the decoy rule's decoys are embedded too."""

    embedder: EmbedderSpec
    max_image_pixels: int
    cache_dir: Optional[str] = None
    stats_dir: Optional[str] = None
    round_index: int = 0
    controls: tuple[str, ...] = ()
    sides: tuple[Side, ...] = (QUERY,)
    decoys: bool = False

    def contract(self) -> Contract:
        """The columns the step reads and writes (nothing is loaded)."""
        reads = ["quarantine_reason", "query_text", "query_image", "target_text", "target_image", "negatives.text",
                 "negatives.image", "s_direct"]
        writes = ["s_direct", "s_direct_neg", "s_control_neg",
                  "quarantine_reason", "quarantine_detail"]  # embed_failed, or an image changed since the read
        for side in self.sides:
            reads += [side.column("s_control")] + [f"{side.candidates}.{n}" for n in ("text", "finish_reason", "s_k")]
            writes += [side.column("s_control")] + [f"{side.candidates}.{n}" for n in ("s_k", "s_neg")]
            if self.decoys:
                reads += [f"{side.decoys}.{n}" for n in ("text", "s_k")]
                writes += [f"{side.decoys}.{n}" for n in ("s_k", "s_neg")]
        if len(self.sides) > 1:
            writes += ["candidates.s_joint"]
        return Contract("embed", tuple(reads), tuple(writes))


class Embed:
    """Ray Data actor: loads the embedder once, serves batches (through its contract: it sees only the columns
    the contract names)."""

    def __init__(self, spec: EmbedSpec):
        self.spec = spec
        self._contract = spec.contract()
        self.stats = StageCounters(spec.stats_dir, "embed", stage="embed", round=spec.round_index, lookups=0,
                                   forwards=0)
        e = spec.embedder
        self.images = ImageLoader(spec.max_image_pixels)  # this actor's images, loaded from their references
        self.backend = embedder_class(e.backend)(e.model, pooling=e.pooling, max_length=e.max_length,
                                                 trust_remote_code=e.trust_remote_code, **e.options)
        self.cache = EmbeddingCache(spec.cache_dir, e.identity(self.backend.vector_settings))
        self.stats.ready()

    # ------------------------------------------------------------ one batch
    def _reasoned(self, inputs: _Inputs, row: dict, side: Side, rationale: str) -> int:
        """The input of the side's text with a rationale (or control, or decoy) appended, in the side's template."""
        return inputs.add(_fill(getattr(self.spec.embedder, side.reasoned_instruction), row.get(side.text) or "",
                                rationale), row.get(side.image))

    def _plan(self, row: dict, inputs: _Inputs) -> Optional[dict]:
        """Which inputs a row needs, or None if it needs nothing (all its similarities are set). Per side: the
        candidates and decoys not embedded yet, and the controls the first time; with both sides, every
        embeddable candidate of both whenever either side changed (the joint pairs them all; old ones are cache
        hits)."""
        e = self.spec.embedder
        fresh = row.get("s_direct") is None
        sides = sides_of(row, self.spec.sides)
        new = {side.name: [k for k, c in enumerate(row.get(side.candidates) or []) if needs_embedding(c)]
               for side in sides}
        decoys = {side.name: [d for d, x in enumerate(row.get(side.decoys) or []) if needs_embedding(x)]
                  for side in sides}
        controls = {side.name: self.spec.controls if row.get(side.column("s_control")) is None else ()
                    for side in sides}
        cands, targets = row.get("candidates") or [], row.get("target_candidates") or []
        # a later round that added only target candidates that are not embedded (empty) still changes the joint's
        # shape: every query candidate needs one s_joint entry per target candidate
        joint = bool(targets) and bool(cands) and (
            fresh or any(new.values()) or any(embeddable(c) and len(c.get("s_joint") or []) != len(targets)
                                              for c in cands))
        if not (fresh or joint or any(new.values()) or any(decoys.values())):
            return None
        # the plain query: its similarities (a fresh pair), and what the target side's reasoned inputs meet
        needs_q = fresh or joint or any(not side.own_negatives and (new[side.name] or decoys[side.name]
                                                                    or controls[side.name]) for side in sides)
        plan = {"q": inputs.add(_fill(e.query_instruction, row.get("query_text") or ""), row.get("query_image"))
                if needs_q else None,
                "t": inputs.add(_fill(e.target_instruction, row.get("target_text")), row.get("target_image")),
                "negs": [inputs.add(_fill(e.target_instruction, n.get("text")), n.get("image"))
                         for n in row.get("negatives") or []],
                "fresh": fresh, "joint": joint, "sides": {}}
        for side in sides:
            items = row.get(side.candidates) or []
            embed = [k for k, c in enumerate(items) if embeddable(c)] if joint else new[side.name]
            plan["sides"][side] = {
                "cands": {k: self._reasoned(inputs, row, side, items[k]["text"]) for k in embed},
                "write": set(new[side.name]),
                "controls": [self._reasoned(inputs, row, side, control_text(text, row.get(side.text)))
                             for text in controls[side.name]],
                "decoys": {d: self._reasoned(inputs, row, side, row[side.decoys][d]["text"])
                           for d in decoys[side.name]},
            }
        return plan

    def _embed_rows(self, rows: list[dict]) -> None:
        inputs = _Inputs(self.cache)
        plans = [self._plan(row, inputs) for row in rows]
        if not inputs.keys:
            return
        vecs = self._vectors(inputs)
        for row, p in zip(rows, plans):
            if p is None:
                continue
            q, t = (None if p["q"] is None else vecs[p["q"]]), vecs[p["t"]]
            negs = np.stack([vecs[j] for j in p["negs"]]) if p["negs"] else np.zeros((0, len(t)), np.float32)
            if p["fresh"]:
                row["s_direct"] = float(q @ t)
                row["s_direct_neg"] = [float(x) for x in negs @ q]
            for side, sp in p["sides"].items():
                # the query side's reasoned inputs meet t+ and the negatives, the target side's the plain query
                anchor = t if side.own_negatives else q

                def sims(i: int) -> tuple[float, Optional[list[float]]]:
                    v = vecs[i]
                    return float(v @ anchor), ([float(x) for x in negs @ v] if side.own_negatives else None)

                for k, cand in enumerate(row.get(side.candidates) or []):
                    if k in sp["write"]:
                        cand["s_k"], cand["s_neg"] = sims(sp["cands"][k])
                    elif not embeddable(cand):
                        cand["s_k"], cand["s_neg"] = None, None
                if sp["controls"] and side.own_negatives:  # against t+ and each negative: one matrix product
                    controls = np.stack([vecs[i] for i in sp["controls"]])
                    row[side.column("s_control")] = [float(x) for x in controls @ anchor]
                    row[side.column("s_control_neg")] = [[float(x) for x in r] for r in controls @ negs.T]
                elif sp["controls"]:
                    row[side.column("s_control")] = [sims(i)[0] for i in sp["controls"]]
                for d, i in sp["decoys"].items():
                    row[side.decoys][d]["s_k"], row[side.decoys][d]["s_neg"] = sims(i)
            if p["joint"]:
                self._fill_joint(row, p, vecs)

    @staticmethod
    def _fill_joint(row: dict, p: dict, vecs: list) -> None:
        """s_joint[j] of each query candidate: cos(E(q ⊕ r_q,k), E(t ⊕ r_t,j)), null where either is not embedded."""
        (query, qp), (target, tp) = p["sides"].items()
        targets = row[target.candidates]
        for k, cand in enumerate(row[query.candidates]):
            if k not in qp["cands"]:
                cand["s_joint"] = None
                continue
            r = vecs[qp["cands"][k]]
            cand["s_joint"] = [float(vecs[tp["cands"][j]] @ r) if j in tp["cands"] else None
                               for j in range(len(targets))]

    def _vectors(self, inputs: _Inputs) -> list[np.ndarray]:
        """Each input's vector: from the cache, else from the model (then cached)."""
        vectors = self.cache.get_many(inputs.keys)
        missing = [i for i, v in enumerate(vectors) if v is None]
        self.stats["lookups"] += len(inputs.keys)
        if missing:
            batch = []
            for i in missing:  # images only for the inputs that miss (each loaded once: the loader keeps it)
                text, image = inputs.sources[i]
                batch.append(EmbedInput(text=text, image=None if image is None else self.images.image(image)))
            t0 = time.perf_counter()
            computed = self.backend.embed(batch)
            self.stats["model_seconds"] += time.perf_counter() - t0
            self.stats["forwards"] += len(batch)
            self.cache.put_many([inputs.keys[i] for i in missing], computed)
            for i, vector in zip(missing, computed):
                vectors[i] = vector
        return vectors

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.stats.batch_started()
        out = self._contract.apply(batch, self._process)
        self.stats.save(self.cache.stats)
        return out

    def _process(self, rows: list[dict]) -> None:
        """Fill the rows' similarities (in place); a row that fails alone is quarantined."""
        todo = [r for r in rows if not r.get("quarantine_reason")]
        try:
            self._embed_rows(todo)
        except Exception as e:  # one bad row must not sink its batch: retry row by row to find it
            log.warning("embedding a batch of %d failed (%s); retrying row by row", len(todo), e)
            for row in todo:
                try:
                    self._embed_rows([row])
                except ImageError as ie:
                    row["quarantine_reason"], row["quarantine_detail"] = ie.reason, ie.detail
                except Exception as re:
                    row["quarantine_reason"], row["quarantine_detail"] = "embed_failed", f"{type(re).__name__}: {re}"
        self.stats["rows"] += len(todo)


EmbedSpec.stage = Embed
