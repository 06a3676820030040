"""The embed stage with the tiny embedder: each distinct input embedded once per job, a warm cache does no
model work, cached and uncached similarities agree, and a later round embeds only its new candidates."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline import config
from schemas import WORK_SCHEMA, conform
from stages.embed import Embed, EmbedderSpec, EmbedSpec
from stages.embed_cache import EmbeddingCache
from stages.images import digest_bytes
from stages.inputs import plan_shards
from stages.read import ReadSpec, read_shard

BATCH = 5  # pairs of one subset (8 of them in the demo data) span batches


def image_digest(ref):
    """The sha256 of the image a reference names, computed here from its file (demo images are whole files)."""
    return None if ref is None else hashlib.sha256(Path(ref["path"]).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def setup(tiny_models, demo_data):
    cfg = config.load("configs/demo.yaml", [f"input.path={demo_data['path']}", f"input.image_root={demo_data['root']}",
                                            f"embedder.model={tiny_models['embedder']}", "input.rows_per_shard=1000"])
    c = config.to_dict(cfg)
    rows = read_shard(plan_shards(c["input"])[0], ReadSpec.from_input(c["input"], 3, 0))
    assert rows and not any(r["quarantine_reason"] for r in rows)
    for i, row in enumerate(rows):
        # rationales repeat across pairs, and one per pair produced nothing (never embedded)
        row["candidates"] = [{"text": f"look at the {('shape', 'colour', 'text')[i % 3]}", "generator": "g",
                              "finish_reason": "stop"},
                             {"text": f"pair {i} needs its own reasoning", "generator": "g", "finish_reason": "length"},
                             {"text": "", "generator": "g", "finish_reason": "empty"}]
    return {"embedder": c["embedder"], "rows": rows}


def embed_stage(embedder: dict, **options) -> Embed:
    """The Embed stage of a spec for this embedder (a config's `embedder` as a dict)."""
    return EmbedSpec(embedder=EmbedderSpec.from_config(embedder), max_image_pixels=40_000_000, **options).build()


def distinct_inputs(embedder: dict, rows: list[dict]) -> set:
    """What the job must embed at least once, worked out here independently of the stage."""
    digest = image_digest
    q_ins, t_ins = embedder["query_instruction"], embedder["target_instruction"]
    need = set()
    for row in rows:
        q = row["query_text"] or ""
        need.add((q_ins.replace("{text}", q), digest(row["query_image"])))
        need.add((t_ins.replace("{text}", row["target_text"] or ""), digest(row["target_image"])))
        for n in row["negatives"]:
            need.add((t_ins.replace("{text}", n["text"] or ""), digest(n["image"])))
        for c in row["candidates"]:
            if c["text"]:
                text = embedder["reasoned_query_instruction"].replace("{text}", q).replace("{rationale}", c["text"])
                need.add((text, digest(row["query_image"])))
    return need


def embed_all(stage: Embed, rows: list[dict]) -> list[dict]:
    out = []
    for start in range(0, len(rows), BATCH):
        out += stage(conform(rows[start:start + BATCH], WORK_SCHEMA)).to_pylist()
    return out


def similarities(rows):
    return [(r["s_direct"], r["s_direct_neg"], [(c["s_k"], c["s_neg"]) for c in r["candidates"]]) for r in rows]


@pytest.fixture(scope="module")
def first_pass(setup, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    stats = tmp_path_factory.mktemp("stats")
    stage = embed_stage(setup["embedder"], cache_dir=str(cache), stats_dir=str(stats))
    return {"rows": embed_all(stage, setup["rows"]), "stage": stage, "cache": cache, "stats": stats}


def test_each_distinct_input_is_embedded_once_per_job(setup, first_pass):
    need = distinct_inputs(setup["embedder"], setup["rows"])
    stats = first_pass["stage"].stats
    assert stats["forwards"] == len(need)
    # labels, images and targets repeat across batches: most lookups were hits
    per_pair = sum(1 + len(r["negatives"]) + 1 + 2 for r in setup["rows"])
    assert stats["lookups"] < per_pair and stats["forwards"] < stats["lookups"]
    written = [json.loads(p.read_text()) for p in first_pass["stats"].glob("embed-*.json")]
    assert [w["forwards"] for w in written] == [len(need)]
    for row in first_pass["rows"]:
        assert row["s_direct"] is not None and len(row["s_direct_neg"]) == len(row["negatives"])
        assert [c["s_k"] is None for c in row["candidates"]] == [False, False, True]


def test_a_warm_cache_does_no_model_work_and_gives_the_same_numbers(setup, first_pass):
    again = embed_stage(setup["embedder"], cache_dir=str(first_pass["cache"]))
    rows = embed_all(again, setup["rows"])
    assert again.stats["forwards"] == 0 and again.cache.stats["disk_hits"] > 0
    assert similarities(rows) == similarities(first_pass["rows"])


def test_vectors_cached_under_other_machine_settings_are_not_served(setup, first_pass):
    """The same config on another machine (a GPU's default device, dtype and batching, where the config sets none)
    embeds differently: the cache keys on what the backend decided here, so such a job misses this job's vectors
    instead of mixing them with its own."""
    stage = first_pass["stage"]
    spec, here = stage.spec.embedder, stage.backend.vector_settings
    q = setup["rows"][0]
    query = (setup["embedder"]["query_instruction"].replace("{text}", q["query_text"] or ""),
             digest_bytes(q["query_image"]))
    same = EmbeddingCache(first_pass["cache"], spec.identity(here))
    assert same.get_many([same.key(*query)])[0] is not None
    elsewhere = EmbeddingCache(first_pass["cache"], spec.identity({**here, "device": "cuda", "batching": "sorted"}))
    assert elsewhere.get_many([elsewhere.key(*query)]) == [None]


def test_without_the_cache_the_similarities_agree(setup, first_pass):
    plain = embed_stage(setup["embedder"], cache_dir=None)
    rows = []
    for row in setup["rows"]:  # one pair per call: other batch shapes than the first pass
        rows += plain(conform([row], WORK_SCHEMA)).to_pylist()
    for got, want in zip(similarities(rows), similarities(first_pass["rows"])):
        np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-6)
        np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-6)
        for (sk, sn), (wk, wn) in zip(got[2], want[2]):
            assert (sk is None) == (wk is None)
            if sk is not None:
                np.testing.assert_allclose([sk, *sn], [wk, *wn], rtol=0, atol=1e-6)


def test_a_later_round_embeds_only_its_new_candidates(setup, first_pass):
    rows = [dict(r, candidates=[dict(c) for c in r["candidates"]]) for r in first_pass["rows"]]
    for i, row in enumerate(rows[:10]):
        row["candidates"].append({"text": f"a new thought {i}", "generator": "g", "finish_reason": "stop"})
    later = embed_stage(setup["embedder"], cache_dir=str(first_pass["cache"]))
    out = embed_all(later, rows)
    assert later.stats["forwards"] == 10
    # rows without new candidates are not even looked up; the others fetch target and negatives (once a batch)
    expected = 0
    for start in range(0, 10, BATCH):
        batch = rows[start:min(start + BATCH, 10)]
        sides = {(r["target_text"], image_digest(r["target_image"])) for r in batch}
        sides |= {(n["text"], image_digest(n["image"])) for r in batch for n in r["negatives"]}
        expected += len(sides) + len(batch)
    assert later.stats["lookups"] == expected
    for before, after in zip(first_pass["rows"], out):
        assert after["s_direct"] == before["s_direct"]
        assert similarities([after])[0][2][:3] == similarities([before])[0][2]
    assert all(r["candidates"][3]["s_k"] is not None for r in out[:10])


CONTROLS = ["Let me think step by step.", "{query}"]


def test_controls_are_embedded_once_per_distinct_query_and_stored(setup, first_pass, tmp_path):
    """Each control goes through the reasoned template with the pair's query ("{query}": the query itself) and
    through the cache: the model sees each (query, control) once, however many pairs share the query, and only
    the control inputs are new work over a warm cache."""
    from stages.embed import control_text

    stage = embed_stage(setup["embedder"], cache_dir=str(first_pass["cache"]), controls=tuple(CONTROLS))
    # five more pairs that share their query (and target) with earlier ones, in later batches
    shared = [dict(r, pair_id=f"{r['pair_id']}-again") for r in setup["rows"][:5]]
    rows = embed_all(stage, [dict(r, s_direct=None) for r in setup["rows"] + shared])
    reasoned = setup["embedder"]["reasoned_query_instruction"]
    control_inputs = {(reasoned.replace("{text}", r["query_text"] or "").replace(
        "{rationale}", control_text(c, r["query_text"])), image_digest(r["query_image"])) for r in setup["rows"]
        for c in CONTROLS}
    assert len(control_inputs) == len(CONTROLS) * len(setup["rows"]) < len(CONTROLS) * len(rows)
    assert stage.stats["forwards"] == len(control_inputs)
    assert "{query}" not in control_text("{query}", "<|image_1|>\nWhat is it?")
    assert control_text("{query}", "<|image_1|>\nWhat is it?") == "What is it?"
    for row, before in zip(rows, first_pass["rows"] + first_pass["rows"][:5]):
        assert len(row["s_control"]) == len(CONTROLS)
        assert [len(n) for n in row["s_control_neg"]] == [len(row["negatives"])] * len(CONTROLS)
        assert similarities([row]) == similarities([before])  # the controls change nothing else
    # the same (query, control) gets the same similarity in every pair that shares query and target
    by_input = {}
    for row in rows:
        key = (row["query_text"], image_digest(row["query_image"]), row["target_text"], image_digest(row["target_image"]))
        assert by_input.setdefault(key, row["s_control"]) == row["s_control"]
    # a later round (s_direct already set) does not embed the controls again
    again = embed_stage(setup["embedder"], cache_dir=str(first_pass["cache"]), controls=tuple(CONTROLS))
    later = embed_all(again, rows)
    assert again.stats["lookups"] == 0 and [r["s_control"] for r in later] == [r["s_control"] for r in rows]
