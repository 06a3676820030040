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
from typing import Optional

import numpy as np
import pyarrow as pa

from stages.backends import embedder_class
from stages.backends.base import IMAGE_MARKER, EmbedInput
from stages.contract import Contract
from stages.counters import StageCounters
from stages.embed_cache import EmbeddingCache, embedder_identity
from stages.images import ImageError, ImageLoader, digest_bytes

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


class Embed:
    """Ray Data actor: loads the embedder once, serves batches (through its contract: it sees only the columns
    `contract` names).

    cache_dir: the disk cache shared by every actor and job (None: this actor's memory only).
    stats_dir: where this actor keeps its counters (lookups, hits, forwards, model seconds) as one small
    JSON file, rewritten after each batch; None: nowhere.
    controls: the content-free control texts (scoring.controls), embedded with each pair's query the first
    time the pair passes (with its plain query); they go through the cache like any input, so a control on a
    query shared by many pairs is embedded once."""

    @staticmethod
    def contract(embedder: dict, max_image_pixels: int, cache_dir: Optional[str] = None,
                 stats_dir: Optional[str] = None, round_index: int = 0, controls=(), target_side: bool = True,
                 decoys: bool = False) -> Contract:
        """The columns Embed reads and writes (its constructor's arguments; nothing is loaded). target_side: some
        generator has k_target > 0 (without, nothing writes the target columns and this stage leaves them)."""
        reads = ["quarantine_reason", "query_text", "query_image", "target_text", "target_image", "negatives.text",
                 "negatives.image", "s_direct", "candidates.text", "candidates.finish_reason", "candidates.s_k"]
        writes = ["s_direct", "s_direct_neg", "s_control", "s_control_neg", "candidates.s_k", "candidates.s_neg",
                  "quarantine_reason", "quarantine_detail"]  # embed_failed, or an image changed since the read
        sides = [""] + (["target_"] if target_side else [])
        if target_side:
            reads += ["target_s_control", "target_candidates.text", "target_candidates.finish_reason",
                      "target_candidates.s_k"]
            writes += ["target_candidates.s_k", "target_candidates.s_neg", "target_s_control", "candidates.s_joint"]
        if decoys:
            reads += [f"{prefix}decoys.{name}" for prefix in sides for name in ("text", "s_k")]
            writes += [f"{prefix}decoys.{name}" for prefix in sides for name in ("s_k", "s_neg")]
        return Contract("embed", tuple(reads), tuple(writes))

    def __init__(self, embedder: dict, max_image_pixels: int, cache_dir: Optional[str] = None,
                 stats_dir: Optional[str] = None, round_index: int = 0, controls=(), target_side: bool = True,
                 decoys: bool = False):
        self._contract = Embed.contract(embedder, max_image_pixels, cache_dir, stats_dir, round_index, controls,
                                        target_side, decoys)
        self.stats = StageCounters(stats_dir, "embed", stage="embed", round=round_index, lookups=0, forwards=0)
        self.cfg = embedder
        self.images = ImageLoader(max_image_pixels)  # this actor's images, loaded from their references
        self.controls = list(controls or ())
        backend_cls = embedder_class(embedder["backend"])
        self.backend = backend_cls(
            embedder["model"],
            pooling=embedder["pooling"],
            max_length=embedder["max_length"],
            trust_remote_code=embedder["trust_remote_code"],
            **embedder.get("options", {}),
        )
        self.cache = EmbeddingCache(cache_dir, embedder_identity(embedder))
        self.stats.ready()

    # ------------------------------------------------------------ one batch
    def _plan(self, row: dict, inputs: _Inputs) -> Optional[dict]:
        """Which inputs a row needs, or None if it needs nothing (all its similarities are set)."""
        c = self.cfg
        cands = row.get("candidates") or []
        fresh = row.get("s_direct") is None
        new = [k for k, cand in enumerate(cands) if needs_embedding(cand)]
        targets = row.get("target_candidates") or []
        # a later round that added only target candidates that are not embedded (empty) still changes the joint's
        # shape: every query candidate needs one s_joint entry per target candidate
        joint_stale = any(embeddable(c) and len(c.get("s_joint") or []) != len(targets) for c in cands)
        target_pass = bool(targets) and (fresh or bool(new) or joint_stale or any(needs_embedding(t) for t in targets))
        decoys = [d for d, x in enumerate(row.get("decoys") or []) if needs_embedding(x)]
        target_decoys = [d for d, x in enumerate(row.get("target_decoys") or []) if needs_embedding(x)]
        if not fresh and not new and not target_pass and not decoys and not target_decoys:
            return None
        q_text = row.get("query_text") or ""
        q_image = row.get("query_image")
        t_text, t_image = row.get("target_text"), row.get("target_image")
        plan = {
            "q": (inputs.add(_fill(c["query_instruction"], q_text), q_image)
                  if fresh or target_pass or target_decoys else None),
            "t": inputs.add(_fill(c["target_instruction"], row.get("target_text")), row.get("target_image")),
            "negs": [inputs.add(_fill(c["target_instruction"], n.get("text")), n.get("image"))
                     for n in row.get("negatives") or []],
            "cands": {k: inputs.add(_fill(c["reasoned_query_instruction"], q_text, cands[k]["text"]), q_image)
                      for k in new},
            "fresh": fresh,
            "controls": [inputs.add(_fill(c["reasoned_query_instruction"], q_text, control_text(text, q_text)), q_image)
                         for text in self.controls] if fresh else [],
            "decoys": {d: inputs.add(_fill(c["reasoned_query_instruction"], q_text, row["decoys"][d]["text"]), q_image)
                       for d in decoys},
            "target_decoys": {d: inputs.add(_fill(c["reasoned_target_instruction"], t_text,
                                                  row["target_decoys"][d]["text"]), t_image) for d in target_decoys},
        }
        if target_pass:  # every embeddable candidate of both sides: the joint needs them all (old ones: cache hits)
            reasoned = c["reasoned_target_instruction"]
            plan["targets"] = {j: inputs.add(_fill(reasoned, t_text, tc["text"]), t_image)
                               for j, tc in enumerate(targets) if embeddable(tc)}
            plan["joint_q"] = {k: plan["cands"][k] if k in plan["cands"] else
                               inputs.add(_fill(c["reasoned_query_instruction"], q_text, cand["text"]), q_image)
                               for k, cand in enumerate(cands) if embeddable(cand)}
            plan["target_controls"] = [
                inputs.add(_fill(reasoned, t_text, control_text(text, t_text)), t_image)
                for text in self.controls] if row.get("target_s_control") is None else []
        return plan

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

    def _embed_rows(self, rows: list[dict]) -> None:
        inputs = _Inputs(self.cache)
        plans = [self._plan(row, inputs) for row in rows]
        if not inputs.keys:
            return
        vecs = self._vectors(inputs)
        for row, p in zip(rows, plans):
            if p is None:
                continue
            t = vecs[p["t"]]
            negs = np.stack([vecs[j] for j in p["negs"]]) if p["negs"] else np.zeros((0, len(t)), np.float32)
            if p["fresh"]:
                q = vecs[p["q"]]
                row["s_direct"] = float(q @ t)
                row["s_direct_neg"] = [float(x) for x in negs @ q]
                if p["controls"]:
                    controls = np.stack([vecs[i] for i in p["controls"]])
                    row["s_control"] = [float(x) for x in controls @ t]
                    row["s_control_neg"] = [[float(x) for x in row_] for row_ in controls @ negs.T]
            for k, cand in enumerate(row.get("candidates") or []):
                if k in p["cands"]:
                    r = vecs[p["cands"][k]]
                    cand["s_k"] = float(r @ t)
                    cand["s_neg"] = [float(x) for x in negs @ r]
                elif not embeddable(cand):
                    cand["s_k"], cand["s_neg"] = None, None
            for d, i in p["decoys"].items():
                decoy = row["decoys"][d]
                decoy["s_k"], decoy["s_neg"] = float(vecs[i] @ t), [float(x) for x in negs @ vecs[i]]
            for d, i in p["target_decoys"].items():
                decoy = row["target_decoys"][d]
                decoy["s_k"], decoy["s_neg"] = float(vecs[i] @ vecs[p["q"]]), None
            if "targets" in p:
                self._fill_target_side(row, p, vecs)

    @staticmethod
    def _fill_target_side(row: dict, p: dict, vecs: list) -> None:
        q = vecs[p["q"]]
        targets = row["target_candidates"]
        for j, tc in enumerate(targets):
            tc["s_k"] = float(vecs[p["targets"][j]] @ q) if j in p["targets"] else None
            tc["s_neg"] = None
        if p["target_controls"]:
            row["target_s_control"] = [float(vecs[i] @ q) for i in p["target_controls"]]
        for k, cand in enumerate(row.get("candidates") or []):
            if k not in p["joint_q"]:
                cand["s_joint"] = None
                continue
            r = vecs[p["joint_q"][k]]
            cand["s_joint"] = [float(vecs[p["targets"][j]] @ r) if j in p["targets"] else None
                               for j in range(len(targets))]

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
