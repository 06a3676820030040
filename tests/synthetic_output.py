"""A realistic pairsel output folder, written without running the job.

`make_output` lays out OUT/ exactly as notes/output_layout.md describes: data shards of OUTPUT_SCHEMA,
quarantine shards, manifest.json, plus a half-written `_staging/` file that readers must ignore. Scores
are drawn at random (seeded) and then scored and selected with the job's own code (stages/score.py,
stages/select.py), so every row is one the job could have written. Tests compute their expectations
from the written files, never from the generator's internals.

Subsets (round-robin over pairs):
  vqa        image query with the `<|image_1|>` marker, text target, one explicit negative
  retrieval  text query, image target, two explicit negatives with images
  captions   image query without a marker, text target, no explicit negative; with
             `no_valid_subset="captions"` (the default) every candidate is invalid, so chosen and
             best_delta are null, and the pairs are undecided: the edge case of a subset with nothing to
             choose from

With `n_controls` (default 1) every pair also has content-free control scores (s_control, s_control_neg),
drawn like a weak rationale's, so that the control turns some pairs from reason to direct.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pyarrow.parquet as pq

import schemas
from stages.files import file_sha256
from stages.score import score_rows
from stages.select import select_rows

GENERATORS = {"tiny-qwen": "models/tiny-qwen2vl", "tiny-llava": "models/tiny-llava"}
CONFIG_HASH = "0123456789abcdef"
WORDS = "the query asks for an object so look at colour shape context and the answer follows".split()
QUARANTINE_REASONS = ("image_missing", "query_too_long", "image_missing", "image_undecodable")


def _negatives(subset: str, i: int, rng: random.Random) -> list[dict]:
    explicit = []
    if subset == "vqa":
        explicit = [{"text": f"wrong answer {i}", "image_path": None}]
    elif subset == "retrieval":
        explicit = [{"text": "<|image_1|>\nRepresent the given image.", "image_path": f"images/retrieval/neg-{i:05d}-{j}.jpg"}
                    for j in range(2)]
    in_shard = [{"text": f"another target {rng.randrange(10_000)}", "image_path": None} for _ in range(rng.randint(1, 2))]
    return [{**n, "origin": "explicit"} for n in explicit] + [{**n, "origin": "in_shard"} for n in in_shard]


def _pair(subset: str, i: int) -> dict:
    if subset == "vqa":
        return {"query_text": f"<|image_1|>\nWhat is shown in picture {i}?", "query_image_path": f"images/vqa/{i:05d}.jpg",
                "target_text": f"answer {i}", "target_image_path": None}
    if subset == "retrieval":
        return {"query_text": f"Find the photo of item {i}.", "query_image_path": None,
                "target_text": "<|image_1|>\nRepresent the given image.", "target_image_path": f"images/retrieval/{i:05d}.jpg"}
    return {"query_text": f"Describe image {i} in one sentence.", "query_image_path": f"images/captions/{i:05d}.jpg",
            "target_text": f"a caption for image {i}", "target_image_path": None}


def _candidates(pair_id: str, all_invalid: bool, k: int, s_direct: float, s_direct_neg: list, rng: random.Random) -> list:
    cands = []
    for gen, model in GENERATORS.items():
        for seed in range(k):
            n_words = rng.randint(3, 30)
            text = f"Rationale {seed} by {gen} for {pair_id}: " + " ".join(rng.choice(WORDS) for _ in range(n_words))
            finish = "stop"
            if all_invalid or rng.random() < 0.15:
                finish = rng.choice(["length", "empty", "error"])
            if all_invalid and not cands and finish == "error":
                finish = "length"  # a pair whose every candidate errored is quarantined, not written (stages/select.py)
            scored = finish in ("stop", "length")  # empty and failed generations are never embedded
            shift = rng.gauss(-0.02, 0.05)  # most rationales barely move the query
            cands.append({
                "text": "" if finish in ("empty", "error") else text,
                "generator": gen, "model": model, "template": "query_only", "seed": seed,
                "sampling": json.dumps({"temperature": 1.0, "top_p": 0.95, "max_new_tokens": 48}),
                "tokens": 0 if finish in ("empty", "error") else n_words + 8,
                "finish_reason": finish,
                "error": "CUDA out of memory (synthetic)" if finish == "error" else None,
                "s_k": s_direct + shift if scored else None,
                "s_neg": [s + rng.gauss(0.0, 0.05) for s in s_direct_neg] if scored else None,
            })
    return cands


def _controls(n: int, s_direct: float, s_direct_neg: list, rng: random.Random) -> dict:
    if not n:
        return {}
    return {"s_control": [s_direct + rng.gauss(0.02, 0.02) for _ in range(n)],
            "s_control_neg": [[s + rng.gauss(0.0, 0.02) for s in s_direct_neg] for _ in range(n)]}


def output_for(request, tmp_path_factory) -> Path:
    """For a fixture parametrized with ("synthetic", "demo_job"): a synthetic output with known numbers, or a
    real demo job's output (the `demo_output` fixture), so each check runs on both."""
    if request.param == "demo_job":
        return request.getfixturevalue("demo_output")
    return output_under_test(tmp_path_factory.mktemp("out"))


def output_under_test(base_dir) -> Path:
    """The output folder the shared tests check: $PAIRSEL_TEST_OUTPUT (e.g. a real demo run) when set,
    otherwise a fresh synthetic one under base_dir."""
    real = os.environ.get("PAIRSEL_TEST_OUTPUT")
    if real:
        return Path(real)
    make_output(base_dir)
    return Path(base_dir)


def make_output(
    out_dir,
    n_pairs: int = 48,
    seed: int = 0,
    subsets: tuple = ("vqa", "retrieval", "captions"),
    rows_per_shard: int = 16,
    k: int = 2,
    scoring_mode: str = "cosine",
    temperature: float = 0.05,
    epsilon: float = 0.0,
    n_quarantined: int = 4,
    no_valid_subset: str | None = "captions",
    n_controls: int = 1,
) -> dict:
    """Write OUT/{data,quarantine}/shard-*.parquet and OUT/manifest.json; return the manifest."""
    out = Path(out_dir)
    rng = random.Random(seed)
    provenance = {"config_hash": CONFIG_HASH, "pairsel_version": "0.1.0", "schema_version": schemas.SCHEMA_VERSION,
                  "embedder": "models/tiny-embedder", "generators": list(GENERATORS), "epsilon": epsilon}
    rows = []
    for i in range(n_pairs):
        subset = subsets[i % len(subsets)]
        pair_id = f"{subset}-{i:05d}"
        negatives = _negatives(subset, i, rng)
        s_direct = rng.uniform(0.1, 0.6)
        s_direct_neg = [rng.uniform(0.0, s_direct + 0.1) for _ in negatives]
        rows.append({
            "pair_id": pair_id, "subset": subset, "source": f"input/{subset}.jsonl",
            "shard_id": i // rows_per_shard, "row_index": i % rows_per_shard,
            **_pair(subset, i), "negatives": negatives,
            "candidates": _candidates(pair_id, subset == no_valid_subset, k, s_direct, s_direct_neg, rng),
            "s_direct": s_direct, "s_direct_neg": s_direct_neg, "provenance": provenance,
            **_controls(n_controls, s_direct, s_direct_neg, rng),
        })
    select_rows(score_rows(rows, scoring_mode, temperature), epsilon)

    quarantined = []
    for j in range(n_quarantined):
        subset = subsets[j % len(subsets)]
        shard_id = j % max(1, -(-n_pairs // rows_per_shard))
        reason = QUARANTINE_REASONS[j % len(QUARANTINE_REASONS)]
        quarantined.append({"pair_id": f"{subset}-q{j:03d}", "subset": subset, "source": f"input/{subset}.jsonl",
                            "shard_id": shard_id, "row_index": rows_per_shard + j, "reason": reason,
                            "detail": f"synthetic {reason}", "raw": json.dumps({"qry": f"bad row {j}"})})

    shards = []
    n_shards = -(-n_pairs // rows_per_shard)
    for shard_id in range(n_shards):
        name = f"shard-{shard_id:06d}.parquet"
        good = [r for r in rows if r["shard_id"] == shard_id]
        bad = [r for r in quarantined if r["shard_id"] == shard_id]
        (out / "data").mkdir(parents=True, exist_ok=True)
        pq.write_table(schemas.conform(good, schemas.OUTPUT_SCHEMA), out / "data" / name)
        record = {"shard_id": shard_id, "path": f"data/{name}", "rows": len(good),
                  "sha256": file_sha256(out / "data" / name), "quarantine_path": None, "quarantine_rows": len(bad)}
        if bad:
            (out / "quarantine").mkdir(parents=True, exist_ok=True)
            pq.write_table(schemas.conform(bad, schemas.QUARANTINE_SCHEMA), out / "quarantine" / name)
            record["quarantine_path"] = f"quarantine/{name}"
        shards.append(record)
    # A crashed writer's leftover: readers must ignore names starting with "_".
    (out / "_staging" / "shard-000099").mkdir(parents=True, exist_ok=True)
    (out / "_staging" / "shard-000099" / "part-0.parquet").write_bytes(b"not a parquet file")

    manifest = _manifest(rows, quarantined, shards, provenance, scoring_mode, epsilon, k, n_controls)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def _outcomes(rows, epsilon) -> dict:
    """The manifest's outcome counts of these rows, worked out here from the labels."""
    n = len(rows)
    out = {"pairs": n}
    for key, decision in (("need_reasoning", "reason"), ("direct", "direct"), ("undecided", "undecided")):
        out[key] = sum(1 for r in rows if r["decision"] == decision)
        out[f"{key}_rate"] = out[key] / n if n else None
    out["control_turned_direct"] = sum(1 for r in rows if r["decision"] == "direct" and r["best_delta"] is not None
                                       and epsilon < r["best_delta"] <= r["base_threshold"])
    out["null_turned_direct"] = 0  # the fixed rule: no decoys
    return out


def _manifest(rows, quarantined, shards, provenance, scoring_mode, epsilon, k, n_controls) -> dict:
    cands = [c for r in rows for c in r["candidates"]]
    need = [r for r in rows if r["need_reasoning"]]
    by_reason: dict = {}
    for q in quarantined:
        by_reason[q["reason"]] = by_reason.get(q["reason"], 0) + 1
    invalid: dict = {}
    for c in cands:
        if not c["valid"]:
            invalid[c["finish_reason"]] = invalid.get(c["finish_reason"], 0) + 1
    generators = {}
    for gen, model in GENERATORS.items():
        mine = [c for c in cands if c["generator"] == gen]
        deltas = [c["delta"] for c in mine if c["valid"]]
        chosen = sum(1 for r in need if r["chosen_generator"] == gen)
        generators[gen] = {"backend": "transformers", "model": model, "candidates": len(mine),
                           "valid": sum(1 for c in mine if c["valid"]), "chosen": chosen,
                           "chosen_share": chosen / len(need) if need else 0.0,
                           "mean_delta": sum(deltas) / len(deltas) if deltas else None,
                           "tokens": sum(c["tokens"] for c in mine)}
    subsets = {name: _outcomes([r for r in rows if r["subset"] == name], epsilon)
               for name in sorted({r["subset"] for r in rows})}
    totals = {key: v for key, v in _outcomes(rows, epsilon).items() if key != "pairs"}
    config = {"generators": [{"name": g, "backend": "transformers", "model": m, "k": k} for g, m in GENERATORS.items()],
              "embedder": {"backend": "transformers", "model": provenance["embedder"]},
              "scoring": {"mode": scoring_mode, "epsilon": epsilon, "temperature": 0.05,
                          "controls": [f"control text {i}" for i in range(n_controls)], "decision": {"rule": "bar"}}}
    return {
        "pairsel_version": provenance["pairsel_version"], "schema_version": schemas.SCHEMA_VERSION,
        "config_hash": CONFIG_HASH, "config": config, "status": "complete",
        "started_at": "2025-01-01T00:00:00+00:00", "finished_at": "2025-01-01T00:01:00+00:00", "wall_seconds": 60.0,
        "counts": {"pairs_read": len(rows) + len(quarantined), "pairs_written": len(rows),
                   "pairs_quarantined": len(quarantined), **totals,
                   "quarantined_by_reason": by_reason, "candidates": len(cands),
                   "candidates_invalid_by_reason": invalid, "tokens_generated": sum(c["tokens"] for c in cands)},
        "generators": generators, "subsets": subsets,
        "decision": {"rule": "bar", "epsilon": epsilon, "controls": n_controls,
                     "promise": "reason iff best_delta > help_threshold = epsilon (and the best control's delta + "
                                "epsilon): a fixed bar, no stated error rate"},
        "embedder": {"backend": "transformers", "model": provenance["embedder"]},
        "shards": shards,
    }
