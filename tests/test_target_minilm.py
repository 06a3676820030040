"""Target-side labels under the decoy rule, measured with a real embedder (all-MiniLM-L6-v2) on the constructed
hard pairs (tests/constructed_pairs.py): a target-side rationale that names the query's decisive clue for the target
("Saturn has the most spectacular ring system.") makes the target side reason; target-side rationales without it
(the target's own description, format-only text) do not, although they beat the plain target on many pairs. The
rationales go in through the precomputed generator, whose target-side rationales are looked up under
"<pair_id>#target" (stages/generate.py); the real Generate, Decoys, Embed, Score and Select stages label them and
the calibration decides (run_local), with the demo's controls on both sides."""
import json

import pytest
import yaml

from pipeline import config
from pipeline.plan import run_local
from stages.inputs import plan_shards
from stages.select import REASON, select_rows
from tests.constructed_pairs import filler

SCORING = yaml.safe_load((config.REPO_ROOT / "configs" / "demo.yaml").read_text())["scoring"]


def world(root, hard: list[dict]) -> dict:
    pairs, rationales = [], []
    for subset, with_clue in (("target_clue", True), ("target_content_free", False)):
        for i, p in enumerate(hard):
            pid = f"{subset}-{i:03d}"
            off, fmt = filler(i)
            name = p["target"].split(",")[0]
            clue = p["evidence"].split("it ", 1)[1].split(",")[0]  # "has the most spectacular ring system"
            described = f"This is {p['target'][0].lower()}{p['target'][1:]}"
            pairs.append({"pair_id": pid, "subset": subset, "qry": p["query"], "pos_text": p["target"],
                          "neg_text": p["negatives"]})
            rationales.append({"pair_id": pid, "rationales": [off]})
            rationales.append({"pair_id": f"{pid}#target",
                               "rationales": [fmt, f"{name} {clue}." if with_clue else described]})
    root.mkdir(parents=True, exist_ok=True)
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (root / "rationales.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rationales))
    return {"input": str(root / "pairs.jsonl"), "rationales": str(root / "rationales.jsonl")}


@pytest.fixture(scope="module")
def rows(constructed_sets, tmp_path_factory):
    root = tmp_path_factory.mktemp("target-minilm")
    data = world(root / "data", constructed_sets["sets"]["hard"])
    spec = {"input": {"path": data["input"], "format": "mmeb", "rows_per_shard": 400},
            "generators": [{"name": "given", "backend": "precomputed", "model": "given", "k": 1, "k_target": 2,
                            "options": {"path": data["rationales"]}}],
            "embedder": {"backend": "sentence_transformers", "model": constructed_sets["model"],
                         "cache_dir": str(root / "cache"),
                         "resources": {"num_cpus": 1, "num_gpus": 0, "pool_size": 1, "batch_size": 64}},
            "scoring": {**SCORING, "in_shard_negatives": 0}, "output": {"dir": str(root / "out")}}
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    cfg = config.load(path, [])
    config.resolve_paths(cfg)
    out = run_local(cfg, plan_shards(config.to_dict(cfg)["input"]))
    assert not [r for r in out if r.get("quarantine_reason")]
    return out


def rate(rows, subset: str, decision_of=lambda r: r["target_decision"]) -> float:
    mine = [r for r in rows if r["subset"] == subset]
    return sum(decision_of(r) == REASON for r in mine) / len(mine)


def test_a_target_rationale_naming_the_clue_makes_the_target_side_reason(rows):
    assert rate(rows, "target_clue") >= 0.8
    for r in rows:
        if r["subset"] == "target_clue" and r["target_decision"] == REASON:
            assert r["target_chosen"] == 1 and r["target_best_delta"] > r["target_help_threshold"]
        assert len(r["target_decoys"]) == 2 and all(d["donor_pair_id"] != r["pair_id"] for d in r["target_decoys"])


def test_target_rationales_without_content_do_not(rows):
    assert rate(rows, "target_content_free") <= 0.05
    # the fixed rule on the same scores: the description of the target passes for reasoning on many pairs
    bar = select_rows([dict(r) for r in rows], SCORING.get("epsilon", 0.0))
    assert rate(bar, "target_content_free") > rate(rows, "target_content_free")
