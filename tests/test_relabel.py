"""`pairsel relabel`: a finished job labelled again under other scoring keys, without a model, writes the output a
run with those keys writes, byte for byte; it leaves the job as it was, resumes after a kill, and refuses what it
cannot do in one line, exit 2.

Real jobs through the CLI (real Ray): the constructed pairs with MiniLM (tests/constructed_pairs.py), so that the
keys move real labels.
"""
import json
import os
import shutil
import signal

import pyarrow.parquet as pq
import pytest

from tests.constructed_pairs import job_config, write
from tests.job_runs import checksums, pairsel

PAIRS_PER_SET = 40  # 4 subsets (hard and easy, with and without the evidence) of one shard each
BAD_LINES = ["{not json", json.dumps({"qry": "", "pos_text": "an orphan target"})]  # quarantined by the read
NEW_KEYS = {"decoys": ["scoring.mode=cosine", "scoring.decision.fdr=0.3"], "bar": ["scoring.epsilon=0.02"]}


def shards(root) -> dict:
    """The shard files and commit records, what must be the same bytes."""
    return {k: v for k, v in checksums(root).items() if k.startswith(("data/", "quarantine/", "_commits/"))}


def decisions(root) -> dict:
    return {r["pair_id"]: r["decision"] for f in sorted((root / "data").glob("*.parquet"))
            for r in pq.read_table(f, columns=["pair_id", "decision"]).to_pylist()}


def ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module", params=["decoys", "bar"])
def jobs(request, constructed_sets, tmp_path_factory):
    """OLD, a finished job under the rule; FRESH, a run of the same config with NEW_KEYS (the embedding cache
    shared: nothing is embedded twice)."""
    rule = request.param
    root = tmp_path_factory.mktemp(f"relabel-{rule}")
    sets = {name: pairs[:PAIRS_PER_SET] for name, pairs in constructed_sets["sets"].items()}
    world = {**write(root / "data", sets), "model": constructed_sets["model"]}
    with_bad = root / "data" / "pairs" / "hard_content_free.jsonl"
    lines = with_bad.read_text().splitlines()
    with_bad.write_text("\n".join(lines[:3] + BAD_LINES + lines[3:]) + "\n")
    job = str(job_config(world, root, "pair_aware", baseline=rule == "bar",
                         rows_per_shard=PAIRS_PER_SET + len(BAD_LINES)))
    old, fresh = root / "old", root / "fresh"
    ok(pairsel(["run", job, f"output.dir={old}"]))
    ok(pairsel(["run", job, f"output.dir={fresh}", *NEW_KEYS[rule]]))
    return {"rule": rule, "root": root, "old": old, "fresh": fresh, "keys": NEW_KEYS[rule], "config": job}


def test_relabel_writes_what_a_run_with_the_keys_writes(jobs):
    old, fresh, new = jobs["old"], jobs["fresh"], jobs["root"] / "new"
    before = checksums(old)
    proc = ok(pairsel(["relabel", str(old), str(new), *jobs["keys"]]))
    assert f"pairs written to {new}/data/" in proc.stdout
    # data, quarantine (the bad lines), commit records, the job record
    assert shards(new) == shards(fresh) and len(shards(new)) == 4 + 1 + 4 + 1
    assert checksums(old) == before  # only read
    assert decisions(new) == decisions(fresh) != decisions(old)  # the keys moved labels
    made, ran = (json.loads((d / "manifest.json").read_text()) for d in (new, fresh))
    for m, d in ((made, new), (ran, fresh)):
        for key in ("started_at", "finished_at", "wall_seconds"):
            del m[key]
        assert m["config"]["output"]["dir"] == str(d)
        m["config"]["output"]["dir"] = None
    assert made == ran
    assert ok(pairsel(["verify", str(new)])).stdout.startswith(f"pairsel verify: {new} is whole")
    assert sorted(p.name for p in new.iterdir()) == ["README.md", "_commits", "data", "manifest.json", "quarantine"]


def test_relabel_reads_neither_the_input_nor_the_rationales(jobs):
    """An output copied to a machine without the job's input and models relabels there (the config's checks that
    the files it names exist are a run's, not a relabel's)."""
    data, elsewhere, new = jobs["root"] / "data", jobs["root"] / "data-elsewhere", jobs["root"] / "moved"
    data.rename(elsewhere)  # the input pairs and the precomputed rationales file
    try:
        ok(pairsel(["relabel", str(jobs["old"]), str(new), *jobs["keys"]]))
    finally:
        elsewhere.rename(data)
    assert shards(new) == shards(jobs["fresh"])


def test_a_killed_relabel_resumes_to_the_same_output(jobs):
    old, new = jobs["old"], jobs["root"] / "killed"
    args = ["relabel", str(old), str(new), *jobs["keys"]]
    killed = pairsel(args, env={**os.environ, "PAIRSEL_FAULT": "commit:2:self"})
    assert killed.returncode == -signal.SIGKILL
    assert not (new / "manifest.json").exists()
    ok(pairsel(args))
    assert shards(new) == shards(jobs["fresh"])
    assert ok(pairsel(args)).stdout == ok(pairsel(args)).stdout  # a finished relabel, run again, changes nothing


def test_a_run_at_relabel_keys_over_a_finished_job_says_how_to_relabel(jobs):
    """Refused as any change of label config is, with the relabel command that writes it; a change that needs the
    models gets no such line."""
    old, config = jobs["old"], jobs["config"]
    proc = pairsel(["run", config, f"output.dir={old}", *jobs["keys"]])
    assert proc.returncode == 2
    assert f"pairsel relabel {old} NEW_DIR {' '.join(sorted(jobs['keys']))}. Changed:" in proc.stderr
    proc = pairsel(["run", config, f"output.dir={old}", *jobs["keys"], "scoring.seed=1"])
    assert proc.returncode == 2 and "different label config" in proc.stderr and "relabel" not in proc.stderr


def one_line_exit_2(proc, *words):
    assert proc.returncode == 2, proc.stderr[-2000:]
    line, = proc.stderr.strip().splitlines()
    for word in words:
        assert word in line
    return line


def test_relabel_refuses_what_it_cannot_do(jobs, tmp_path):
    old, new = jobs["old"], tmp_path / "new"
    before = checksums(old)
    # a key that decided what was generated, drawn or embedded
    one_line_exit_2(pairsel(["relabel", str(old), str(new), "scoring.seed=1"]), "scoring.seed", "relabel changes only")
    one_line_exit_2(pairsel(["relabel", str(old), str(old), *jobs["keys"]]), "new_dir", "is old_dir")
    one_line_exit_2(pairsel(["relabel", str(old), str(old / "relabelled")]), "new_dir", "overlaps old_dir")
    one_line_exit_2(pairsel(["relabel", str(old), str(old.parent)]), "new_dir", "overlaps old_dir")
    one_line_exit_2(pairsel(["relabel", str(tmp_path), str(new)]), "old_dir", "manifest")  # not a finished job
    # a copy of the job that lost its commit records is not the job its manifest lists
    bare = tmp_path / "bare"
    shutil.copytree(old, bare, ignore=shutil.ignore_patterns("_commits"))
    proc = pairsel(["relabel", str(bare), str(new)])
    assert proc.returncode == 1 and f"pairsel: {bare} is damaged: manifest.json: lists shard 0" in proc.stderr
    assert not new.exists()
    # a job resumed with --force at another rate keeps its shards' labels, which its config does not make
    forced = tmp_path / "forced"
    shutil.copytree(old, forced)
    ok(pairsel(["run", jobs["config"], f"output.dir={forced}", "scoring.decision.fdr=0.3", "--force"]))
    one_line_exit_2(pairsel(["relabel", str(forced), str(new)]), "old_dir", "a resume with --force")
    (tmp_path / "notes.txt").write_text("a user's file")
    one_line_exit_2(pairsel(["relabel", str(old), str(tmp_path)]), "output.dir", "not a pairsel output")
    ok(pairsel(["relabel", str(old), str(new)]))  # no keys: the job's own labels again
    assert shards(new) == shards(old)
    # another relabel into the same folder is a change of label config, refused as a run's resume is (its lines
    # after the first say what changed)
    proc = pairsel(["relabel", str(old), str(new), *jobs["keys"]])
    assert proc.returncode == 2 and "output.dir: holds a run made with a different label config" in proc.stderr
    assert checksums(old) == before
