"""Exactly once, tested for real: the driver killed with SIGKILL at each point of a run, a model actor killed
mid-run, a worker node of a two-node Ray cluster lost mid-run. After each, the job (or its rerun) finishes, and
its output equals that of a run that never died: the same pair_ids, each once, with the same labels and scores,
bit for bit (every shard file has the reference's sha256).

Kills come from stages/faults.py (PAIRSEL_FAULT=point:N), which the code passes at fixed points, so each test
dies at the same place every time. `make faults` runs these.
"""
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests import job_runs
from tests.job_runs import assert_same_output, committed, job_args, run_pipeline

pytestmark = [pytest.mark.faults, pytest.mark.slow]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_models):
    return job_runs.corpus(tmp_path_factory, tiny_models)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus):
    return job_runs.reference(tmp_path_factory, corpus)


def fault_env(tmp_path, spec: str) -> dict:
    return {**os.environ, "PAIRSEL_FAULT": spec, "PAIRSEL_FAULT_ONCE": str(tmp_path / "fault-fired")}


# With 24 pairs in 4 shards of 6, generate batches of 8 and embed batches of 16, each point is mid-run.
DRIVER_KILLS = {
    "reading": "read:7",  # once the second shard has been read
    "generating": "generate:9",  # on the 9th pair's rationales: the second generate batch is half done
    "embedding": "embed:1",  # as the first embedding batch comes back
    "writing": "write:1",  # as the first part file of labelled rows is staged
    # the decoy rule commits each scored shard into _scored/ (commits 1-4), then, once all are scored, each
    # labelled shard into data/ (commits 5-8)
    "between scoring and its commit": "commit:2",  # the second scored shard's file is in place, its record is not
    "between labelling and its commit": "commit:6",  # the same for the second labelled shard
}
# where the kill leaves a shard file without its commit record
UNRECORDED = {"between scoring and its commit": Path("_scored"), "between labelling and its commit": Path(".")}


@pytest.mark.parametrize("when", list(DRIVER_KILLS))
def test_driver_killed_then_rerun_equals_reference(when, corpus, reference, tmp_path):
    out = tmp_path / "out"
    killed = run_pipeline(job_args(corpus, out), env=fault_env(tmp_path, DRIVER_KILLS[when]))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (tmp_path / "fault-fired").exists()
    assert not (out / "manifest.json").exists()
    before = committed(out)
    if when in UNRECORDED:  # the kill fell in the window: a shard file without its record
        folder = out / UNRECORDED[when]
        assert {int(p.stem.split("-")[1]) for p in (folder / "data").glob("shard-*.parquet")} - set(committed(folder))
    kept = {i: (out / r["path"]).stat().st_mtime_ns for i, r in before.items() if r["path"]}

    rerun = run_pipeline(job_args(corpus, out))
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"{len(before)} already committed" in rerun.stderr
    assert_same_output(out, reference)
    # committed shards were kept as they were, not redone
    assert {i: (out / before[i]["path"]).stat().st_mtime_ns for i in kept} == kept
    assert not (out / "_staging").exists()


@pytest.mark.parametrize("stage", ["generate", "embed"])
def test_model_actor_killed_mid_run_job_completes_by_itself(stage, corpus, reference, tmp_path):
    out = tmp_path / "out"
    proc = run_pipeline(job_args(corpus, out), env=fault_env(tmp_path, f"{stage}:3:self"))
    assert (tmp_path / "fault-fired").exists(), f"the {stage} actor was never killed"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_same_output(out, reference)


# ------------------------------------------------------------------ a worker node lost
def _serving_model_actors(sid: int) -> list[str]:
    """The Ray Data model actors in session `sid` that have loaded their model (Ray names a process after
    what it runs: `ray::MapWorker(MapBatches(Embed)).__init__` while loading, then without the suffix, or with
    `.submit` while it serves a batch)."""
    names = []
    for pid in job_runs.session_pids(sid):
        try:
            names.append(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode())
        except (FileNotFoundError, ProcessLookupError):
            pass
    return [n for n in names if n.startswith("ray::MapWorker") and not n.endswith(".__init__")]


@pytest.fixture
def two_nodes(tmp_path):
    """A head (1 CPU) and a second node (2 CPUs) on this machine, token-authenticated as Ray 2.60 wants."""
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    env.pop("RAY_ADDRESS", None)
    port = job_runs.free_port()
    common = ["--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    sessions = []
    try:
        sessions.append(job_runs.ray_start(["--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                                    *common], env))
        sessions.append(job_runs.ray_start([f"--address=127.0.0.1:{port}", "--num-cpus=2", *common], env))
        yield {"address": f"127.0.0.1:{port}", "env": env, "head": sessions[0], "worker": sessions[1]}
    finally:
        job_runs.end_ray_nodes(sessions, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_worker_node_lost_mid_run_then_the_job_completes(two_nodes, corpus, reference, tmp_path):
    out = tmp_path / "out"
    # quarter CPUs: after the loss, the head's one CPU still holds both model actors and a read and a write task
    args = job_args(corpus, out, "generators.0.resources.num_cpus=0.25", "embedder.resources.num_cpus=0.25",
                    "--address", two_nodes["address"])
    cmd = [sys.executable, "-m", "pipeline", "run", "configs/demo.yaml", *args]
    log = tmp_path / "driver.log"  # a file, not a pipe: nobody reads a pipe while we wait, and a full one blocks
    with open(log, "w") as sink:
        driver = subprocess.Popen(cmd, cwd=job_runs.REPO, env=two_nodes["env"], start_new_session=True,
                                  stdout=sink, stderr=subprocess.STDOUT)
    try:
        # mid-run: a model actor on the second node has loaded its model and serves the job's batches
        def serving():
            assert driver.poll() is None, "the job ended before a model actor served on the second node"
            return _serving_model_actors(two_nodes["worker"])

        lost = job_runs.wait_for(serving, 300, "a model actor serving on the second node", every=0.05)
        job_runs.end_session(two_nodes["worker"])  # the node dies: raylet, workers, agents, all with SIGKILL
        driver.wait(timeout=600)
    finally:
        job_runs.end_session(driver.pid)
    said = log.read_text()
    outcome = {"lost": lost, "returncode": driver.returncode, "log": said[-3000:]}
    if driver.returncode != 0:  # allowed, if it says so clearly; the rerun must then finish the job
        assert "rerun the same command" in said, outcome
        rerun = run_pipeline(args, env=two_nodes["env"])
        assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert_same_output(out, reference)
    print(json.dumps({k: outcome[k] for k in ("lost", "returncode")}))  # which of the two it was, for the log
