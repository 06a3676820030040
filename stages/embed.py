"""Embed every side of a pair and store the cosine similarities that scoring needs.

Per pair: E(q) without reasoning, E(q ⊕ r_k) for each candidate, E(t+), E(t-_j) for each negative.
Vectors are L2-normalised, so cos is a dot product. Only similarities leave this stage: a pair's
vectors would be (K + 2 + J) x dim floats, its similarities are (K + 1) x (J + 1).

Identical inputs (same instruction-filled text and image bytes) within a batch are embedded once;
each distinct image is decoded once.
"""
from __future__ import annotations

import hashlib
import logging

import numpy as np
import pyarrow as pa

from schemas import WORK_SCHEMA, conform
from stages.backends import embedder_class
from stages.backends.base import EmbedInput
from stages.images import ImageError, decode_image

INPUTS = ("query_text", "query_image", "target_text", "target_image", "negatives", "candidates.text",
          "candidates.finish_reason")
OUTPUTS = ("s_direct", "s_direct_neg", "candidates.s_k", "candidates.s_neg")

log = logging.getLogger(__name__)

# Candidates that produced no text are not embedded.
NOT_EMBEDDED = frozenset({"error", "empty"})


def _fill(template: str, text: str | None, rationale: str | None = None) -> str:
    # str.replace, not str.format: user text may contain braces
    out = template.replace("{text}", text or "")
    return out if rationale is None else out.replace("{rationale}", rationale)


class _Inputs:
    """Distinct embedder inputs of a batch, keyed by content."""

    def __init__(self, max_image_pixels: int):
        self.max_image_pixels = max_image_pixels
        self.items: list[EmbedInput] = []
        self.index: dict[tuple, int] = {}
        self.images: dict[bytes, object] = {}

    def _image(self, data: bytes | None):
        if data is None:
            return None, None
        digest = hashlib.sha256(data).digest()
        if digest not in self.images:
            self.images[digest] = decode_image(data, self.max_image_pixels)
        return digest, self.images[digest]

    def add(self, text: str, image_bytes: bytes | None) -> int:
        digest, image = self._image(image_bytes)
        key = (text, digest)
        if key not in self.index:
            self.index[key] = len(self.items)
            self.items.append(EmbedInput(text=text, image=image))
        return self.index[key]


class Embed:
    """Ray Data actor: loads the embedder once, serves batches."""

    def __init__(self, embedder: dict, max_image_pixels: int):
        self.cfg = embedder
        self.max_image_pixels = max_image_pixels
        backend_cls = embedder_class(embedder["backend"])
        self.backend = backend_cls(
            embedder["model"],
            pooling=embedder["pooling"],
            max_length=embedder["max_length"],
            trust_remote_code=embedder["trust_remote_code"],
            **embedder.get("options", {}),
        )

    def _plan(self, row: dict, inputs: _Inputs) -> dict:
        c = self.cfg
        q_text = row.get("query_text") or ""
        plan = {
            "q": inputs.add(_fill(c["query_instruction"], q_text), row.get("query_image")),
            "t": inputs.add(_fill(c["target_instruction"], row.get("target_text")), row.get("target_image")),
            "negs": [inputs.add(_fill(c["target_instruction"], n.get("text")), n.get("image"))
                     for n in row.get("negatives") or []],
            "cands": [],
        }
        for cand in row.get("candidates") or []:
            if cand.get("finish_reason") in NOT_EMBEDDED or not cand.get("text"):
                plan["cands"].append(None)
            else:
                text = _fill(c["reasoned_query_instruction"], q_text, cand["text"])
                plan["cands"].append(inputs.add(text, row.get("query_image")))
        return plan

    def _embed_rows(self, rows: list[dict]) -> None:
        inputs = _Inputs(self.max_image_pixels)
        plans = [self._plan(row, inputs) for row in rows]
        vecs = self.backend.embed(inputs.items) if inputs.items else np.zeros((0, 0), np.float32)
        for row, p in zip(rows, plans):
            t, negs = vecs[p["t"]], vecs[p["negs"]] if p["negs"] else np.zeros((0, vecs.shape[1]), np.float32)
            q = vecs[p["q"]]
            row["s_direct"] = float(q @ t)
            row["s_direct_neg"] = [float(x) for x in negs @ q]
            for cand, idx in zip(row.get("candidates") or [], p["cands"]):
                if idx is None:
                    cand["s_k"], cand["s_neg"] = None, None
                else:
                    r = vecs[idx]
                    cand["s_k"] = float(r @ t)
                    cand["s_neg"] = [float(x) for x in negs @ r]

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
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
        return conform(rows, WORK_SCHEMA)
