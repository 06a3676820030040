"""The demo job on vLLM, end to end through the CLI, on the demo data: `generators.0.backend=vllm
embedder.backend=vllm` and nothing else, as on a CPU-only machine out of the box.

One job is run once and read by several tests; a second job embeds with transformers (same vLLM generator,
so the same candidates) to compare the similarities; a twin run and a run whose driver is killed check that
reruns and resumes write the same shards, byte for byte."""
import json
import os
import signal
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest

from stages import layout
from tests import job_runs

ROWS_PER_SHARD = 8  # 40 demo pairs: 5 shards


def args(tiny_models, demo_data, out, *extra):
    return [f"input.path={demo_data['path']}", f"input.image_root={demo_data['root']}",
            f"generators.0.model={tiny_models['generator']}", f"embedder.model={tiny_models['embedder']}",
            f"output.dir={out}", f"input.rows_per_shard={ROWS_PER_SHARD}", "generators.0.backend=vllm",
            "embedder.backend=vllm", *extra]


def run(argv, timeout=900) -> subprocess.CompletedProcess:
    proc = job_runs.run_pipeline(argv, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def job(tiny_models, demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("vllm-job") / "out"
    proc = run(args(tiny_models, demo_data, out))
    return {"out": out, "proc": proc, "manifest": json.loads((out / "manifest.json").read_text()),
            "rows": {r["pair_id"]: r for r in pq.read_table(out / "data").to_pylist()}}


def test_the_job_runs_on_vllm_and_writes_every_pair(job, demo_data):
    manifest = job["manifest"]
    assert manifest["status"] == "complete"
    assert len(job["rows"]) == demo_data["valid_rows"]
    assert manifest["config"]["generators"][0]["backend"] == "vllm"
    assert manifest["config"]["embedder"]["backend"] == "vllm"
    cands = [c for r in job["rows"].values() for c in r["candidates"]]
    assert len(cands) == 3 * len(job["rows"])  # K = 3 (configs/demo.yaml)
    assert all(c["model"].startswith("vllm:") for c in cands)
    # a random-weight model may end at once (empty) but never fails (error)
    assert {c["finish_reason"] for c in cands} <= {"stop", "length", "empty", "echo"}
    assert sum(c["finish_reason"] in ("stop", "length") for c in cands) > len(cands) // 2
    assert not list((job["out"] / "quarantine").glob("*.parquet")) or \
        pq.read_table(job["out"] / "quarantine").num_rows == 0


def test_labels_recompute_from_stored_similarities(job):
    """`pairsel verify`'s recompute (the job's own score and select stages, and under the decoy rule the job's
    calibration, rerun on the stored similarities alone) gives back every stored score and label."""
    from pipeline.verify import verify

    verdict = verify(job["out"])
    assert [p.line() for p in verdict.problems] == []
    assert "every score and label recomputed" in verdict.checked
    assert job["manifest"]["decision"]["rule"] == "decoys"
    stored = list(job["rows"].values())
    assert any(row["chosen"] is not None for row in stored)
    assert all((row["decision"] == "reason") == (row["best_delta"] is not None and row["help_threshold"] is not None
                                                 and row["best_delta"] > row["help_threshold"]) for row in stored)


def test_similarities_match_the_transformers_embedder(job, tiny_models, demo_data, tmp_path):
    """The same job with embedder.backend=transformers (same vLLM generator, so the same candidates): the
    same s_direct and s_k to 1e-4, since every backend places the image marker with one function."""
    out = tmp_path / "hf-embedder"
    run(args(tiny_models, demo_data, out, "embedder.backend=transformers"))
    other = {r["pair_id"]: r for r in pq.read_table(out / "data").to_pylist()}
    assert other.keys() == job["rows"].keys()
    for pid, row in job["rows"].items():
        twin = other[pid]
        assert [c["text"] for c in twin["candidates"]] == [c["text"] for c in row["candidates"]]
        assert abs(row["s_direct"] - twin["s_direct"]) <= 1e-4, pid
        np.testing.assert_allclose(row["s_direct_neg"], twin["s_direct_neg"], rtol=0, atol=1e-4)
        for a, b in zip(row["candidates"], twin["candidates"]):
            assert (a["s_k"] is None) == (b["s_k"] is None)
            if a["s_k"] is not None:
                assert abs(a["s_k"] - b["s_k"]) <= 1e-4, pid


def test_a_twin_run_writes_the_same_shards(job, tiny_models, demo_data, tmp_path):
    out = tmp_path / "twin"
    run(args(tiny_models, demo_data, out))
    job_runs.assert_same_output(out, job["out"])  # the same shard files, byte for byte (sha256)


def test_resume_after_a_killed_driver_writes_the_same_shards(job, tiny_models, demo_data, tmp_path):
    out = tmp_path / "killed"
    # The decoy rule commits each shard into _scored/ as it is scored, then labels and commits them all at the end.
    # The driver is killed at a fixed point (stages/faults.py), as the second scored shard's file is in place and its
    # record is not, so that the resume redoes the other shards' generation on vLLM: killing on a poll of _scored/
    # raced the engine, which on a fast machine scores all five shards between two polls.
    env = {**os.environ, "PAIRSEL_FAULT": "commit:2", "PAIRSEL_FAULT_ONCE": str(tmp_path / "fault-fired")}
    killed = job_runs.run_pipeline(args(tiny_models, demo_data, out), env=env, timeout=900)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (tmp_path / "fault-fired").exists()
    scored = len(list((out / layout.SCORED / layout.COMMITS).glob("shard-*.json")))
    done = len(list((out / layout.COMMITS).glob("shard-*.json")))
    assert (scored, done) == (1, 0)
    proc = run(args(tiny_models, demo_data, out))
    assert f"{done} already committed" in proc.stderr, proc.stderr[-2000:]
    job_runs.assert_same_output(out, job["out"])
