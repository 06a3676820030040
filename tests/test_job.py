"""The whole job through Ray with the tiny models, as `make demo` runs it: CLI in, Parquet out."""
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from schemas import OUTPUT_SCHEMA, QUARANTINE_SCHEMA, SCHEMA_VERSION
from stages import layout
from stages.calibrate import calibrate, output_scores
from stages.score import score_pair
from stages.select import help_threshold, null_score

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def run_job(*overrides, check=True):
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "configs/demo.yaml", *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def job_args(tiny_models, demo_data, out, *extra):
    return [f"input.path={demo_data['path']}", f"input.image_root={demo_data['root']}",
            f"generators.0.model={tiny_models['generator']}", f"embedder.model={tiny_models['embedder']}",
            f"output.dir={out}", "input.rows_per_shard=16", *extra]


@pytest.fixture(scope="module")
def bad_input(demo_data, tmp_path_factory):
    """The demo rows plus a few broken ones."""
    root = Path(demo_data["root"])
    bad = tmp_path_factory.mktemp("bad") / "pairs.jsonl"
    lines = Path(demo_data["path"]).read_text().splitlines()
    lines.insert(3, json.dumps({"qry": "<|image_1|>\nwhat is this?", "qry_image_path": "images/nope.png", "pos_text": "x"}))
    lines.insert(7, "{not json")
    lines.insert(11, json.dumps({"qry": "", "pos_text": "orphan target"}))
    lines.insert(13, json.dumps({"qry": "a query", "pos_text": 42}))
    bad.write_text("\n".join(lines) + "\n")
    return {"path": str(bad), "root": str(root), "valid_rows": demo_data["valid_rows"], "bad_rows": 4}


@pytest.fixture(scope="module")
def job(tiny_models, bad_input, tmp_path_factory):
    out = tmp_path_factory.mktemp("job") / "out"
    proc = run_job(*job_args(tiny_models, bad_input, out))
    return {"out": out, "stdout": proc.stdout, "manifest": json.loads((out / "manifest.json").read_text())}


def test_cli_says_where_the_shards_are(job):
    assert f"{job['out']}/data/" in job["stdout"]
    assert "quarantined 4 rows" in job["stdout"]


def test_cli_says_each_groups_calibration_in_its_own_counts(job):
    """A group that labels no pair reason says why: its candidate and decoy wins and its lowest estimated FDR,
    the manifest's numbers."""
    assert job["manifest"]["decision"]["calibration"]
    for cal in job["manifest"]["decision"]["calibration"]:
        said = (f"    {cal['side']} side, {cal['group']}: " +
                (f"no pair reason ({cal['wins']} candidate wins, {cal['losses']} decoy wins; lowest estimated FDR "
                 f"{cal['fdr_estimate']:.0%})" if cal["margin"] is None else
                 f"{cal['reason']} reason, estimated FDR {cal['fdr_estimate']:.1%}"))
        assert said in job["stdout"].splitlines()


def test_the_undecided_pairs_that_lack_decoys_are_counted_and_said(job):
    """An undecided pair with a valid candidate lacked decoys (the rest had no valid candidate): the manifest counts
    them, per subset too, and the summary says where decoys come from."""
    data = pl.read_parquet(job["out"] / "data" / "*.parquet")
    few = data.filter((pl.col("decision") == "undecided") & pl.col("best_delta").is_not_null())
    assert few.height > 0 and (few["decoys"].list.len() < 3).all()  # the demo's generators have k 3
    m = job["manifest"]
    assert m["counts"]["undecided_few_decoys"] == few.height
    assert {s: c["undecided_few_decoys"] for s, c in m["subsets"].items() if c["undecided_few_decoys"]} == \
        dict(few.group_by("subset").len().iter_rows())
    assert f"  {few.height} of the undecided pairs have a valid candidate but too few decoys" in job["stdout"]


def test_every_valid_pair_written_once_and_bad_rows_quarantined(job, bad_input):
    m = job["manifest"]
    assert m["status"] == "complete"
    assert m["counts"]["pairs_written"] == bad_input["valid_rows"]
    assert m["counts"]["pairs_quarantined"] == bad_input["bad_rows"]
    assert m["counts"]["pairs_read"] == bad_input["valid_rows"] + bad_input["bad_rows"]
    data = pl.read_parquet(job["out"] / "data" / "*.parquet")
    assert data["pair_id"].n_unique() == data.height == bad_input["valid_rows"]
    q = pl.read_parquet(job["out"] / "quarantine" / "*.parquet")
    assert sorted(q["reason"].to_list()) == sorted(["image_missing", "malformed_record", "empty_query", "wrong_type"])
    assert m["counts"]["quarantined_by_reason"] == dict(q.group_by("reason").len().iter_rows())


def test_shards_match_the_schema_and_manifest(job):
    m = job["manifest"]
    assert len(m["shards"]) == len(list((job["out"] / "data").glob("*.parquet")))
    for shard in m["shards"]:
        f = pq.ParquetFile(job["out"] / shard["path"])
        assert f.schema_arrow.equals(OUTPUT_SCHEMA, check_metadata=False)
        assert f.schema_arrow.metadata[b"pairsel.schema_version"] == str(SCHEMA_VERSION).encode()
        assert f.metadata.num_rows == shard["rows"]
        assert hashlib.sha256((job["out"] / shard["path"]).read_bytes()).hexdigest() == shard["sha256"]
        if shard["quarantine_path"]:
            assert pq.read_schema(job["out"] / shard["quarantine_path"]).equals(QUARANTINE_SCHEMA, check_metadata=False)


def test_the_output_holds_only_what_the_layout_names(job):
    """Every folder and file a finished job leaves in its output dir is one stages/layout.py names (the only things
    pairsel ever deletes there), and the scored shards of the decoy rule are gone once the job ends."""
    named = {layout.DATA, layout.QUARANTINE, layout.COMMITS, layout.MANIFEST, layout.CARD, *layout.OWN_FOLDERS,
             *layout.OWN_FILES}
    assert {p.name for p in job["out"].iterdir()} <= named
    assert not (job["out"] / layout.SCORED).exists() and not (job["out"] / layout.STAGING).exists()
    assert (job["out"] / layout.JOB_RECORD).is_file() and (job["out"] / layout.RUN_LOG).is_file()


def test_labels_recompute_from_stored_similarities(job):
    """Under the shipped decoy rule: every delta from the stored similarities, every decoy from a donor pair of the
    output, every null_score from the deltas and the pair's headroom, each subset's margin from the null_score
    column, and every decision from best_delta > help_threshold."""
    rows = pq.read_table(job["out"] / "data").to_pylist()
    assert rows
    scoring = job["manifest"]["config"]["scoring"]
    by_id = {r["pair_id"]: r for r in rows}
    headroom = {}
    for row in rows:
        assert row["scoring_mode"] == "pair_aware"
        cands = row["candidates"]
        assert len(cands) == 3  # K from configs/demo.yaml
        k_ok = [c for c in cands if c["s_k"] is not None]
        s = score_pair(row["s_direct"], row["s_direct_neg"], [c["s_k"] for c in k_ok],
                       [c["s_neg"] for c in k_ok], row["scoring_mode"], row["temperature"],
                       row["s_control"] or [], row["s_control_neg"])
        np.testing.assert_allclose([c["delta"] for c in k_ok], s["delta"], rtol=0, atol=1e-12)
        assert row["lse_direct"] == pytest.approx(s["lse_direct"], abs=1e-12)
        # -log p(t+ | q): the most a pair-aware delta can be
        headroom[row["pair_id"]] = room = s["lse_direct"] - row["s_direct"] / row["temperature"]
        # configs/demo.yaml sets content-free controls: they make the bar every candidate and decoy is measured from
        assert len(row["s_control"]) == len(scoring["controls"]) > 0
        assert row["base_threshold"] == pytest.approx(max(0.0, max(s["control_delta"])) + scoring["epsilon"])
        decoys = row["decoys"]
        d = score_pair(row["s_direct"], row["s_direct_neg"], [x["s_k"] for x in decoys], [x["s_neg"] for x in decoys],
                       row["scoring_mode"], row["temperature"])
        np.testing.assert_allclose([x["delta"] for x in decoys], d["delta"], rtol=0, atol=1e-12)
        for x in decoys:  # another pair of the same shard and subset, one of its valid texts, never this target
            donor = by_id[x["donor_pair_id"]]
            assert donor["shard_id"] == row["shard_id"] and donor["subset"] == row["subset"]
            assert donor["target_text"] != row["target_text"] or donor["target_image_path"] != row["target_image_path"]
            assert donor["candidates"][x["donor_candidate"]]["finish_reason"] == "stop"
        valid = [(c["delta"], i) for i, c in enumerate(cands) if c["valid"]]
        if valid:
            best = max(valid, key=lambda t: (t[0], -t[1]))
            assert row["chosen"] == best[1] and row["best_delta"] == best[0]
            assert row["rejected"] == [i for delta, i in valid if delta <= 0 and i != best[1]]
        if not valid or len(decoys) < 3:  # reasoning was never tested: undecided, not "no reasoning needed"
            assert row["decision"] == "undecided" and row["need_reasoning"] is None and row["null_score"] is None
            continue
        assert row["null_score"] == pytest.approx(  # one decoy group
            null_score(row["best_delta"], [max(x["delta"] for x in decoys)], row["base_threshold"], 1.0) / room,
            rel=1e-9, abs=1e-12)
        assert row["help_threshold"] == help_threshold(row["base_threshold"], [x["delta"] for x in decoys],
                                                       row["null_margin"])
        assert row["decision"] == ("reason" if row["best_delta"] > row["help_threshold"] else "direct")
        assert row["need_reasoning"] == (row["decision"] == "reason")
        # in-shard negatives are in play: explicit ones plus 3 drawn from the shard
        assert len(row["s_direct_neg"]) == len(row["negatives"]) >= 1
    calibration = calibrate(output_scores(pl.scan_parquet(str(job["out"] / "data" / "*.parquet")), "subset"),
                            scoring["decision"]["fdr"], 0.5)
    assert calibration == job["manifest"]["decision"]["calibration"]
    margins = {c["group"]: float("inf") if c["margin"] is None else c["margin"] for c in calibration}
    for r in rows:
        if r["null_score"] is not None:
            assert r["null_margin"] == pytest.approx(margins[r["subset"]] * headroom[r["pair_id"]], rel=1e-9)


def test_output_reads_with_polars_pyarrow_and_datasets(job, bad_input):
    import datasets

    files = sorted(str(p) for p in (job["out"] / "data").glob("*.parquet"))
    ds = datasets.load_dataset("parquet", data_files=files, split="train")
    assert ds.num_rows == bad_input["valid_rows"]
    assert {"pair_id", "candidates", "need_reasoning", "s_direct"} <= set(ds.column_names)
    lazy = pl.scan_parquet(files).select((pl.col("decision") == "reason").mean()).collect()
    assert lazy.item() == pytest.approx(job["manifest"]["counts"]["need_reasoning_rate"])


def test_rerun_resumes_without_redoing_anything(job, tiny_models, bad_input):
    before = {p.name: p.read_bytes() for p in (job["out"] / "data").glob("*.parquet")}
    proc = run_job(*job_args(tiny_models, bad_input, job["out"]))
    after = {p.name: p.read_bytes() for p in (job["out"] / "data").glob("*.parquet")}
    assert before == after
    assert "0 to do" in proc.stderr


def test_resume_redoes_a_lost_shard_with_identical_labels(job, tiny_models, bad_input, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(job["out"], out)
    reference = pq.read_table(out / "data" / "shard-000001.parquet")
    record = json.loads((out / "_commits" / "shard-000001.json").read_text())
    (out / "_commits" / "shard-000001.json").unlink()  # as if the job died before committing it
    shutil.rmtree(out / "_cache", ignore_errors=True)  # no cached vectors: the shard is embedded anew
    run_job(*job_args(tiny_models, bad_input, out))
    redone = pq.read_table(out / "data" / "shard-000001.parquet")
    # Seeds derive from pair_id and the embedder is batch-invariant, though the shard's rows now share their
    # batches with other rows: the same labels, the same scores, bit for bit; the same file, byte for byte.
    labels = ["pair_id", "chosen", "chosen_generator", "need_reasoning", "rejected"]
    assert redone.select(labels).equals(reference.select(labels))
    for column in ("candidates", "s_direct", "s_direct_neg", "lse_direct", "best_delta"):
        assert redone[column].equals(reference[column]), column
    assert redone.equals(reference)
    assert json.loads((out / "_commits" / "shard-000001.json").read_text())["sha256"] == record["sha256"]


def test_an_inputs_vector_does_not_depend_on_its_batchmates(tiny_models):
    """The embedder is batch-invariant: a vector is the same bit for bit alone or in any batch."""
    import random

    import torch
    from PIL import Image

    from stages.backends.base import EmbedInput
    from stages.backends.hf import TransformersEmbedder

    torch.set_num_threads(1)
    embedder = TransformersEmbedder(str(tiny_models["embedder"]), batch_size=4)
    rng = random.Random(0)
    words = "a red square on a blue sky over snow with two boats and one tree".split()
    images = [Image.new("RGB", (rng.randint(28, 120), rng.randint(28, 120)), (rng.randrange(256), 90, 30))
              for _ in range(4)]

    def item():
        text = "Query: " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 70)))
        return EmbedInput(text, rng.choice(images) if rng.random() < 0.5 else None)

    probes, others = [item() for _ in range(6)], [item() for _ in range(40)]
    alone = [embedder.embed([x])[0] for x in probes]
    together = embedder.embed(probes)
    for i in range(len(probes)):
        assert np.array_equal(together[i], alone[i])
    for _ in range(6):
        batch = rng.sample(others, rng.randint(1, 30)) + probes
        rng.shuffle(batch)
        vectors = embedder.embed(batch)
        for i, probe in enumerate(probes):
            assert np.array_equal(vectors[next(j for j, x in enumerate(batch) if x is probe)], alone[i])


def test_a_commit_merges_only_its_parts_checks_its_rows_and_can_run_twice(tmp_path):
    from schemas import OUTPUT_SCHEMA, conform
    from stages.write import atomic_write_table, commit_shard

    staging = tmp_path / "_staging" / "shard-000000"
    staging.mkdir(parents=True)

    def part(name, rows):
        path = staging / name
        table = conform([{"pair_id": f"p{i}", "shard_id": 0, "row_index": i} for i in rows], OUTPUT_SCHEMA)
        atomic_write_table(table, path, "zstd")
        return str(path)

    a, b, stray = part("a.parquet", [2, 0]), part("b.parquet", [1]), part("stray.parquet", [1])
    with pytest.raises(RuntimeError, match=r"row_index twice: \[1\]"):  # a dead task's copy named too
        commit_shard(str(tmp_path), 0, [a, b, stray], [], "zstd", size=3)
    with pytest.raises(RuntimeError, match=r"missing: \[1\]"):
        commit_shard(str(tmp_path), 0, [a], [], "zstd", size=3)
    assert not list(tmp_path.glob("data/*")) and not list(tmp_path.glob("_commits/*"))
    record = commit_shard(str(tmp_path), 0, [a, b], [], "zstd", size=3)
    assert record["rows"] == 3 and record["sha256"]
    assert pq.read_table(tmp_path / record["path"])["row_index"].to_pylist() == [0, 1, 2]
    assert not Path(a).exists() and Path(stray).exists()  # its own parts go, a part it never named stays
    assert commit_shard(str(tmp_path), 0, [a, b], [], "zstd", size=3) == record  # a retried commit


def test_changed_label_config_refuses_to_resume(job, tiny_models, bad_input):
    proc = run_job(*job_args(tiny_models, bad_input, job["out"], "scoring.epsilon=0.5"), check=False)
    assert proc.returncode == 2
    assert "scoring.epsilon: 0.0 -> 0.5" in proc.stderr
