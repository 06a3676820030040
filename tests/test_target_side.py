"""Target-side rationales (generators[].k_target): scores, labels and the joint choice against values worked
out by hand; the config keys and their checks; a target shared by many pairs reasoned about and embedded
once (counted model inputs, real tiny models)."""
import copy
import math
import re
from pathlib import Path

import pytest

from pipeline import config
from schemas import TARGET_COLUMNS, WORK_SCHEMA, conform
from stages.score import score_rows
from stages.select import DIRECT, REASON, UNDECIDED, select_rows
from stages.side import TARGET

REPO = Path(__file__).resolve().parent.parent


def lp(pos: float, negs: list, tau: float) -> float:
    """log p(t+ | x) by hand."""
    return pos / tau - math.log(math.exp(pos / tau) + sum(math.exp(n / tau) for n in negs))


def cand(s_k, s_neg=None, s_joint=None, finish="stop", generator="g"):
    return {"text": "r", "generator": generator, "finish_reason": finish, "s_k": s_k, "s_neg": s_neg,
            "s_joint": s_joint}


def label(row: dict, mode: str, tau: float, epsilon: float) -> dict:
    row = conform([row], WORK_SCHEMA).to_pylist()[0]  # through the schema, as in the job
    return select_rows(score_rows([row], mode, tau), epsilon)[0]


def pair(**kw) -> dict:
    base = {"pair_id": "p", "s_direct": 0.5, "s_direct_neg": [0.4],
            "candidates": [cand(0.6, [0.2], [0.8, 0.55]), cand(0.3, [0.5], [0.4, 0.35])],
            "target_candidates": [cand(0.7), cand(0.45)]}
    return {**base, **kw}


def test_pair_aware_both_sides_and_joint_by_hand():
    tau = 0.5
    row = label(pair(), "pair_aware", tau, 0.0)
    direct = lp(0.5, [0.4], tau)
    q_delta = [lp(0.6, [0.2], tau) - direct, lp(0.3, [0.5], tau) - direct]
    # the target side: the plain query against t ⊕ r_t,j, the negatives as embedded for the query side
    t_delta = [lp(0.7, [0.4], tau) - direct, lp(0.45, [0.4], tau) - direct]
    joint = [[lp(0.8, [0.2], tau) - direct, lp(0.55, [0.2], tau) - direct],
             [lp(0.4, [0.5], tau) - direct, lp(0.35, [0.5], tau) - direct]]
    assert [c["delta"] for c in row["candidates"]] == pytest.approx(q_delta)
    assert [c["delta"] for c in row["target_candidates"]] == pytest.approx(t_delta)
    assert [c["delta_joint"] for c in row["candidates"]] == [pytest.approx(j) for j in joint]
    assert row["target_candidates"][0]["lse"] == pytest.approx(
        math.log(math.exp(0.7 / tau) + math.exp(0.4 / tau)))
    assert all(c["neg_delta"] is None for c in row["target_candidates"])
    assert (row["decision"], row["chosen"], row["need_reasoning"], row["rejected"]) == (REASON, 0, True, [1])
    assert (row["target_decision"], row["target_chosen"], row["target_need_reasoning"], row["target_rejected"]) \
        == (REASON, 0, True, [1])
    assert row["target_best_delta"] == pytest.approx(t_delta[0])
    assert row["target_chosen_generator"] == "g"
    assert (row["joint_query"], row["joint_target"]) == (0, 0)
    assert row["joint_delta"] == pytest.approx(joint[0][0])
    assert row["joint_beats_query"] is True and row["joint_beats_target"] is True


def test_cosine_joint_that_does_not_beat_the_query_side():
    row = label(pair(s_direct=0.5, candidates=[cand(0.9, [0.1], [0.85, 0.6]), cand(0.2, [0.1], [0.3, 0.2])],
                     target_candidates=[cand(0.55), cand(0.52)]), "cosine", 0.05, 0.0)
    assert [c["delta"] for c in row["target_candidates"]] == pytest.approx([0.05, 0.02])
    assert row["best_delta"] == pytest.approx(0.4) and row["target_best_delta"] == pytest.approx(0.05)
    assert (row["joint_query"], row["joint_target"], row["joint_delta"]) == (0, 0, pytest.approx(0.35))
    assert row["joint_beats_query"] is False and row["joint_beats_target"] is True


def test_target_control_per_side():
    """The target side's control (t ⊕ c_i) decides the target side only; the query side keeps its own."""
    base = pair(s_direct=0.5, target_candidates=[cand(0.7), cand(0.45)], target_s_control=[0.68],
                candidates=[cand(0.6, [0.2], [0.8, 0.55])])
    row = label(base, "cosine", 0.05, 0.0)
    assert row["target_control_delta"] == pytest.approx([0.18])
    assert row["target_candidates"][0]["delta_control"] == pytest.approx(0.02)
    assert row["target_decision"] == REASON and row["decision"] == REASON
    assert row["s_control"] is None and row["candidates"][0]["delta_control"] is None
    row = label(base, "cosine", 0.05, 0.05)  # delta 0.2 > 0.05 but only 0.02 over the control
    assert (row["target_decision"], row["target_chosen"], row["target_need_reasoning"]) == (DIRECT, 0, False)
    # a direct side's choice is the plain input (0): the joint 0.3 beats it by more than epsilon
    assert row["joint_delta"] == pytest.approx(0.3) and row["joint_beats_target"] is True
    assert row["joint_beats_query"] is True  # 0.3 > query 0.1 + 0.05


def test_undecided_target_side_leaves_the_query_label_alone():
    row = label(pair(target_candidates=[cand(0.9, finish="length"), cand(None, finish="empty")]),
                "pair_aware", 0.5, 0.0)
    assert (row["target_decision"], row["target_chosen"], row["target_need_reasoning"]) == (UNDECIDED, None, None)
    assert row["target_rejected"] == []
    assert (row["joint_query"], row["joint_target"], row["joint_delta"], row["joint_beats_query"]) == \
        (None, None, None, None)
    assert row["decision"] == REASON and row["quarantine_reason"] is None


def test_without_target_candidates_every_target_column_is_null():
    row = label(pair(target_candidates=None, candidates=[cand(0.6, [0.2])]), "pair_aware", 0.5, 0.0)
    target_columns = TARGET_COLUMNS
    assert len(target_columns) == 20  # 15 target-side columns, 5 joint ones
    assert all(row[name] is None for name in target_columns)
    assert row["candidates"][0]["s_joint"] is None and row["candidates"][0]["delta_joint"] is None


def test_labels_recompute_from_stored_scores():
    row = label(pair(), "pair_aware", 0.5, 0.0)
    again = select_rows(score_rows([copy.deepcopy(row)], "pair_aware", 0.5), 0.0)[0]
    assert again == row


def _load(tmp_path, *overrides):
    path = tmp_path / "job.yaml"
    path.write_text((REPO / "configs" / "demo.yaml").read_text())
    # input.image_root: a folder that exists in a fresh clone too (data/demo/ is built by make demo-data)
    return config.load(path, ["input.path=data/demo/pairs.jsonl", f"input.image_root={tmp_path}", *overrides])


@pytest.mark.parametrize("override, key", [
    ("generators.0.k_target=-1", "generators[0].k_target"),
    ("generators.0.target_template=nope", "generators[0].target_template"),
    ("embedder.reasoned_target_instruction=Candidate: {text}", "embedder.reasoned_target_instruction"),
])
def test_config_checks_the_target_keys(tmp_path, override, key):
    overrides = [override] + (["generators.0.k_target=2"] if "target_template" in override else [])
    with pytest.raises(config.ConfigError, match="^" + re.escape(key + ":")):
        _load(tmp_path, *overrides)


def test_config_defaults(tmp_path):
    cfg = _load(tmp_path)
    assert cfg.generators[0].k_target == 0 and cfg.generators[0].target_template == "target_only"
    assert "{query}" not in cfg.prompts.target_only and "{query}" in cfg.prompts.target_pair_aware
    assert "{rationale}" in cfg.embedder.reasoned_target_instruction


def test_a_shared_target_is_reasoned_about_and_embedded_once(tmp_path, tiny_models):
    """Real tiny models, run_local: with a target-only prompt, the pairs of a batch that share a target send
    one generation request for it, get the same rationales, and each distinct t ⊕ r_t,j is embedded once."""
    from pipeline.plan import run_local
    from scripts.make_demo_data import make
    from stages.embed import Embed, control_text
    from stages.generate import Generate
    from stages.inputs import plan_shards

    data = tmp_path / "data"
    path = make(data, n_pairs=24, seed=3)
    cfg = config.load(_write_demo(tmp_path), [
        f"input.path={path}", f"input.image_root={data}", f"generators.0.model={tiny_models['generator']}",
        f"embedder.model={tiny_models['embedder']}", f"output.dir={tmp_path / 'out'}", "input.rows_per_shard=24",
        "generators.0.k=1", "generators.0.k_target=2", "generators.0.resources.batch_size=24",
        "embedder.cache_dir=null"])
    config.resolve_paths(cfg)
    sent, embedded = [], []

    def instrument(stage):
        if isinstance(stage, Generate) and stage.spec.side is TARGET:
            generate = stage.backend.generate
            stage.backend.generate = lambda requests: sent.extend(requests) or generate(requests)
        if isinstance(stage, Embed):
            embed = stage.backend.embed
            stage.backend.embed = lambda batch: embedded.extend(
                (x.text, None if x.image is None else hash(x.image.tobytes())) for x in batch) or embed(batch)

    rows = [r for r in run_local(cfg, plan_shards(config.to_dict(cfg)["input"]), instrument)
            if not r.get("quarantine_reason")]
    by_target: dict = {}
    for r in rows:
        by_target.setdefault((r["target_text"], r["target_image_path"]), []).append(r)
    shared = [rs for rs in by_target.values() if len(rs) > 1]
    assert shared, "the demo data should have targets shared by several pairs (classification labels)"
    # one request per distinct target, all in one batch here
    assert len(sent) == len(by_target) < len(rows)
    for rs in shared:  # the same rationales (text and seed) for every pair of a shared target
        first = [(c["text"], c["seed"]) for c in rs[0]["target_candidates"]]
        assert len(first) == 2
        assert all([(c["text"], c["seed"]) for c in r["target_candidates"]] == first for r in rs)
    reasoned = [t for t in embedded if "\nReasoning: " in t[0] and t[0].startswith("Candidate: ")]
    controls = [control_text(c, r["target_text"]) for r in rows[:1] for c in cfg.scoring.controls]
    distinct = {(r["target_text"], r["target_image_path"], c["text"]) for r in rows for c in r["target_candidates"]
                if c["text"] and c["finish_reason"] != "empty"}
    distinct |= {(r["target_text"], r["target_image_path"], control_text(c, r["target_text"]))
                 for r in rows for c in cfg.scoring.controls}
    assert controls and len(reasoned) == len(distinct)  # each distinct t ⊕ r_t,j and t ⊕ c_i embedded once
    # every embedder input at most once (memory cache of the one Embed actor): inputs per pair over the minimum 1.00
    assert len(embedded) == len(set(embedded))
    for r in rows:  # labels on both sides for every pair
        assert r["target_decision"] in (REASON, DIRECT, UNDECIDED) and r["decision"] in (REASON, DIRECT, UNDECIDED)
        assert len(r["candidates"][0]["s_joint"] or [None, None]) == 2


def _write_demo(tmp_path) -> Path:
    path = tmp_path / "demo.yaml"
    path.write_text((REPO / "configs" / "demo.yaml").read_text())
    return path


def test_rounds_apply_per_side_and_keep_the_labels(tmp_path, tiny_models):
    """Rounds (k0 1, step 1, margin 0) on both sides: the same need_reasoning per side as a full-K run, the
    same target candidates where a side ran to its last round, and fewer target samples overall or equal."""
    from pipeline.plan import run_local, steps
    from scripts.make_demo_data import make
    from stages.generate import Generate
    from stages.inputs import plan_shards

    data = tmp_path / "data"
    path = make(data, n_pairs=16, seed=5)
    common = [f"input.path={path}", f"input.image_root={data}", f"generators.0.model={tiny_models['generator']}",
              f"embedder.model={tiny_models['embedder']}", f"output.dir={tmp_path / 'out'}",
              "input.rows_per_shard=16", "generators.0.k=2", "generators.0.k_target=3",
              "generators.0.sampling.max_new_tokens=8"]

    def job(*extra):
        cfg = config.load(_write_demo(tmp_path), [*common, *extra])
        config.resolve_paths(cfg)
        return cfg, {r["pair_id"]: r for r in run_local(cfg, plan_shards(config.to_dict(cfg)["input"]))}

    cfg, rounds = job("rounds.k0=1", "rounds.step=1")
    target_steps = [s.k_stop for s in steps(cfg) if s.stage is Generate and s.side is TARGET]
    assert target_steps == [1, 2, 3]
    _, full = job()
    for pid, f in full.items():
        r = rounds[pid]
        assert r["need_reasoning"] == f["need_reasoning"] and r["target_need_reasoning"] == f["target_need_reasoning"]
        ft, rt = f["target_candidates"], r["target_candidates"]
        assert [(c["seed"], c["text"]) for c in rt] == [(c["seed"], c["text"]) for c in ft[:len(rt)]]
        if len(rt) < len(ft):  # stopped early: only once a target rationale helped
            assert r["target_decision"] == "reason"
        for c, cf in zip(rt, ft):
            assert c["delta"] == pytest.approx(cf["delta"], abs=1e-6) if cf["delta"] is not None else c["delta"] is None
        if r["joint_delta"] is not None and len(rt) == len(ft) and len(r["candidates"]) == len(f["candidates"]):
            assert (r["joint_query"], r["joint_target"]) == (f["joint_query"], f["joint_target"])
