"""The whole job through Ray with target-side rationales on (generators[].k_target > 0), as a user runs it:
labels for both sides and the joint choice recompute from the output alone, a rerun redoes nothing, and a
lost shard is redone (without cached vectors) into the same file, byte for byte: exactly once."""
import copy
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from omegaconf import OmegaConf

from pipeline.plan import decoy_counts_of, label_job
from stages.decoys import required
from stages.score import score_rows
from stages.select import score_rows as select_scores
from tests.test_job import job_args, run_job

pytestmark = pytest.mark.slow
TARGET = ["generators.0.k=2", "generators.0.k_target=2"]


@pytest.fixture(scope="module")
def target_job(tiny_models, demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("target-job") / "out"
    proc = run_job(*job_args(tiny_models, demo_data, out, *TARGET))
    return {"out": out, "stdout": proc.stdout, "manifest": json.loads((out / "manifest.json").read_text())}


def test_both_sides_and_the_joint_recompute_from_the_output(target_job, demo_data):
    rows = pq.read_table(target_job["out"] / "data").to_pylist()
    assert len(rows) == demo_data["valid_rows"] == len({r["pair_id"] for r in rows})
    cfg = OmegaConf.create(target_job["manifest"]["config"])
    blank = copy.deepcopy(rows)
    for r in blank:  # forget every score and label; keep the stored similarities only
        for key in ("decision", "chosen", "best_delta", "need_reasoning", "rejected", "target_decision",
                    "target_chosen", "target_best_delta", "target_need_reasoning", "target_rejected", "joint_query",
                    "joint_target", "joint_delta", "joint_beats_query", "joint_beats_target", "lse_direct",
                    "target_control_delta", "control_delta", "help_threshold", "target_help_threshold", "null_score",
                    "target_null_score", "null_margin", "target_null_margin", "base_threshold",
                    "target_base_threshold"):
            r[key] = None
        for c in r["candidates"] + r["target_candidates"] + r["decoys"] + r["target_decoys"]:
            c["delta"] = c["delta_control"] = c["delta_joint"] = c["valid"] = None
    # the job's own stages over the stored similarities: score, select, then the decoy rule's calibration
    again = score_rows(blank, rows[0]["scoring_mode"], rows[0]["temperature"])
    select_scores(again, cfg.scoring.epsilon, required(decoy_counts_of(cfg)))
    label_job(cfg, again)
    decisions = {"reason", "direct", "undecided"}
    for r, a in zip(rows, again):
        assert len(r["target_candidates"]) == 2 and len(r["target_s_control"]) == len(r["s_control"]) > 0
        assert r["target_decision"] in decisions and r["decision"] in decisions
        for key in ("decision", "chosen", "need_reasoning", "rejected", "target_decision", "target_chosen",
                    "target_need_reasoning", "target_rejected", "joint_query", "joint_target", "joint_beats_query",
                    "joint_beats_target", "null_score", "target_null_score", "help_threshold",
                    "target_help_threshold"):
            assert a[key] == r[key], (r["pair_id"], key)
        for key in ("best_delta", "target_best_delta", "joint_delta"):
            assert (a[key] is None) == (r[key] is None) and (r[key] is None or np.isclose(a[key], r[key], atol=1e-12))
        for c, ca in zip(r["candidates"] + r["target_candidates"], a["candidates"] + a["target_candidates"]):
            assert (c["delta"] is None) == (ca["delta"] is None) and c["valid"] == ca["valid"]
            if c["delta"] is not None:
                assert ca["delta"] == pytest.approx(c["delta"], abs=1e-12)
    assert any(r["target_decision"] != "undecided" for r in rows)
    assert any(r["joint_delta"] is not None for r in rows)


def test_rerun_with_target_rationales_redoes_nothing(target_job, tiny_models, demo_data):
    before = {p.name: p.read_bytes() for p in (target_job["out"] / "data").glob("*.parquet")}
    proc = run_job(*job_args(tiny_models, demo_data, target_job["out"], *TARGET))
    assert "0 to do" in proc.stderr
    assert before == {p.name: p.read_bytes() for p in (target_job["out"] / "data").glob("*.parquet")}


def test_a_lost_shard_is_redone_into_the_same_bytes(target_job, tiny_models, demo_data, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(target_job["out"], out)
    reference = (out / "data" / "shard-000001.parquet").read_bytes()
    (out / "_commits" / "shard-000001.json").unlink()  # as if the job died before committing it
    shutil.rmtree(out / "_cache", ignore_errors=True)  # every vector embedded anew
    run_job(*job_args(tiny_models, demo_data, out, *TARGET))
    assert (out / "data" / "shard-000001.parquet").read_bytes() == reference
    ids = [r["pair_id"] for r in pq.read_table(out / "data").to_pylist()]
    assert len(ids) == len(set(ids)) == demo_data["valid_rows"]


def test_manifest_counts_both_sides(target_job):
    rows = pq.read_table(target_job["out"] / "data").to_pylist()
    side = target_job["manifest"]["target_side"]
    assert side["counts"]["pairs"] == len(rows)
    assert side["counts"]["need_reasoning"] == sum(r["target_decision"] == "reason" for r in rows)
    assert side["counts"]["undecided"] == sum(r["target_decision"] == "undecided" for r in rows)
    joint = side["counts"]["joint"]
    assert joint["pairs_with_joint"] == sum(r["joint_delta"] is not None for r in rows)
    assert joint["beats_both"] == sum(bool(r["joint_beats_query"] and r["joint_beats_target"]) for r in rows)
    assert sum(s["pairs"] for s in side["subsets"].values()) == len(rows)
    assert target_job["manifest"]["counts"]["need_reasoning"] == sum(r["decision"] == "reason" for r in rows)
    from pipeline.card import body

    card = body(target_job["manifest"])
    assert "## Target side" in card and "joint beats both" in card
    for name, s in side["subsets"].items():
        assert f"| {name} | {s['pairs']} | {s['need_reasoning']} (" in card


def test_exports_of_the_target_side(target_job, tmp_path):
    import polars as pl

    from pipeline import export, export_formats

    rows = {r["pair_id"]: r for r in pq.read_table(target_job["out"] / "data").to_pylist()}
    both = export.run(str(target_job["out"]), "contrastive", str(tmp_path / "c"), rationale_side="both",
                      rationale_mode="column")
    df = pl.read_parquet(both["files"])
    assert {"rationale", "pos_rationale", "target_decision"} <= set(df.columns) and len(df) == len(rows)
    for r in df.iter_rows(named=True):
        src = rows[r["pair_id"]]
        want = src["target_candidates"][src["target_chosen"]]["text"] if src["target_decision"] == "reason" else None
        assert r["pos_rationale"] == want and r["pos_text"] == (src["target_text"] or "")
    appended = pl.read_parquet(export.run(str(target_job["out"]), "contrastive", str(tmp_path / "a"),
                                          rationale_side="target")["files"])
    for r in appended.iter_rows(named=True):
        src = rows[r["pair_id"]]
        assert r["qry"] == (src["query_text"] or "")  # the query side untouched
        if src["target_decision"] == "reason":
            assert r["pos_text"].endswith(export_formats.RATIONALE_SEPARATOR + src["target_candidates"][src["target_chosen"]]["text"])
    pref = export.run(str(target_job["out"]), "preference", str(tmp_path / "p"), side="target")
    if pref["rows"]:
        for r in pl.read_parquet(pref["files"]).iter_rows(named=True):
            src = rows[r["pair_id"]]
            assert src["target_decision"] == "reason" and r["delta_chosen"] > 0 >= r["delta_rejected"]
            assert r["chosen_index"] == src["target_chosen"] and r["rejected_index"] in src["target_rejected"]
    gate = pl.read_parquet(export.run(str(target_job["out"]), "gate", str(tmp_path / "g"), gate_sides="both")["files"])
    assert set(gate["side"]) == {"query", "target"} and "undecided" not in set(gate["decision"])
    assert len(gate) == sum((r["decision"] != "undecided") + (r["target_decision"] != "undecided") for r in rows.values())
    for r in gate.filter(pl.col("side") == "target").iter_rows(named=True):
        assert r["need_reasoning"] == rows[r["pair_id"]]["target_need_reasoning"]


def test_report_and_show_give_both_sides(target_job, capsys):
    from rich.console import Console

    from pipeline import report, show

    numbers = report.run(str(target_job["out"]))
    side = numbers["target_side"]
    assert side == target_job["manifest"]["target_side"]  # one query for both (pipeline/manifest.py)
    html = (target_job["out"] / "report.html").read_text()
    assert "Target side and the joint choice" in html and "joint beats both" in html
    for subset in side["subsets"]:
        assert f"<td>{subset}</td>" in html
    out = capsys.readouterr().out
    assert "target side: reason" in out and "joint choice (" in out
    rows = pq.read_table(target_job["out"] / "data").to_pylist()
    row = next(r for r in rows if r["joint_delta"] is not None)
    console = Console(record=True, width=160)
    show.run(str(target_job["out"]), row["pair_id"], console=console)
    text = console.export_text()
    assert "target rationales" in text and "target decision: " in text and show.joint_line(row) in text.replace("\n", " ")
    assert f"query #{row['joint_query']} with target #{row['joint_target']}" in text
