"""Sample K rationales per pair from one generator; its candidates are appended to the pair's pool.

A job with several generators runs one Generate stage per generator, one after the other, each in its own
actor pool: every candidate keeps its generator's name, and selection runs over the pooled list.
"""
from __future__ import annotations

import hashlib
import json

import pyarrow as pa

from schemas import WORK_SCHEMA, conform
from stages.backends import generator_class
from stages.backends.base import IMAGE_MARKER, GenRequest
from stages.backends.parsing import classify, select_rationale
from stages.images import ImageError, decode_image

INPUTS = ("pair_id", "query_text", "query_image", "target_text", "target_image_path", "candidates")
OUTPUTS = ("candidates",)


def candidate_seed(base_seed: int, generator: str, pair_id: str, k: int) -> int:
    """Seed of candidate k of a pair: a function of the pair, not of batching or order, so reruns and
    resumed runs sample the same rationales."""
    digest = hashlib.sha256(f"{base_seed}|{generator}|{pair_id}|{k}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def render_prompt(template: str, row: dict) -> str:
    """Fill {query} and {target}. The query keeps its image marker so the backend puts the image there;
    the generator is shown the query's image only, so an image-only target reads as "[image]"."""
    target = (row.get("target_text") or "").replace(IMAGE_MARKER, "").strip()
    if not target and row.get("target_image_path"):
        target = "[image]"
    query = row.get("query_text") or ""
    if row.get("query_image") is not None and IMAGE_MARKER not in query:
        query = f"{IMAGE_MARKER}\n{query}"
    return template.replace("{query}", query).replace("{target}", target)


class Generate:
    """Ray Data actor: loads one generator in __init__, serves batches in __call__."""

    def __init__(self, generator: dict, template: str, max_image_pixels: int):
        self.cfg = generator
        self.template = template
        self.max_image_pixels = max_image_pixels
        backend_cls = generator_class(generator["backend"])
        self.backend = backend_cls(
            generator["model"], trust_remote_code=generator["trust_remote_code"], **generator.get("options", {})
        )
        self.sampling = dict(generator["sampling"])
        self.sampling_json = json.dumps(self.sampling, sort_keys=True)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        requests, owners = [], []
        for row in rows:
            if row.get("quarantine_reason"):
                continue
            try:
                image = None if row["query_image"] is None else decode_image(row["query_image"], self.max_image_pixels)
            except ImageError as e:  # the reader validated it; only a changed file gets here
                row["quarantine_reason"], row["quarantine_detail"] = e.reason, e.detail
                continue
            seeds = [candidate_seed(self.cfg["seed"], self.cfg["name"], row["pair_id"], k) for k in range(self.cfg["k"])]
            requests.append(
                GenRequest(
                    prompt=render_prompt(self.template, row),
                    image=image,
                    seeds=seeds,
                    temperature=self.sampling["temperature"],
                    top_p=self.sampling["top_p"],
                    max_new_tokens=self.sampling["max_new_tokens"],
                    pair_id=row["pair_id"],
                )
            )
            owners.append(row)
        results = self.backend.generate(requests) if requests else []
        for row, request, generations in zip(owners, requests, results):
            pool = list(row.get("candidates") or [])
            for seed, g in zip(request.seeds, generations):
                # thinking models: keep the part the config names; cut-off, empty or echoed output is marked
                rationale = select_rationale(g.text, self.cfg["rationale"])
                pool.append(
                    {
                        "text": rationale,
                        "generator": self.cfg["name"],
                        "model": self.backend.model_id,
                        "template": self.cfg["template"],
                        "seed": seed,
                        "sampling": self.sampling_json,
                        "tokens": g.tokens,
                        "finish_reason": classify(rationale, g.finish_reason, request.prompt),
                        "error": g.error,
                    }
                )
            row["candidates"] = pool
        return conform(rows, WORK_SCHEMA)
