"""What a user sees of a real run: Ctrl-C (a real SIGINT to a real job), and the console of a run without a
terminal whose input.image_root was forgotten. The two real jobs of the user-facing tests; every other user error
is over before Ray starts (tests/test_user_errors.py, tests/test_output_safety.py)."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages import layout
from tests import job_runs
from tests.job_runs import REPO, checksums, committed, start_pipeline, wait_for

pytestmark = pytest.mark.slow


def small_job(tiny_models, path, out, *extra):
    return [f"input.path={path}", f"generators.0.model={tiny_models['generator']}",
            f"embedder.model={tiny_models['embedder']}", f"output.dir={out}", "generators.0.k=1",
            "generators.0.sampling.max_new_tokens=4", *extra]


def sha256_of(out: Path, files) -> dict[str, str]:
    """These files' sha256, while the job runs (a walk of the whole output would race its staging folders)."""
    return {rel: hashlib.sha256((out / rel).read_bytes()).hexdigest() for rel in files}


def test_ctrl_c_stops_promptly_keeps_committed_shards_and_says_how_to_resume(tiny_models, demo_data, tmp_path):
    out = tmp_path / "out"
    scored_dir = out / layout.SCORED
    shards = demo_data["valid_rows"] // 2
    proc = start_pipeline(small_job(tiny_models, demo_data["path"], out, f"input.image_root={demo_data['root']}",
                                    "input.rows_per_shard=2"))
    try:
        wait_for(lambda: (out / "_commits" / "job.json").is_file(), 120, "the job record")
        # a user drops files into the output while the job runs
        (out / "notes.txt").write_text("my notes on this run\n")
        (out / "data").mkdir(exist_ok=True)
        (out / "data" / "mine.parquet").write_bytes(b"a user's file")
        users = {"notes.txt", "data/mine.parquet"}
        before_users = sha256_of(out, users)
        # the shipped decoy rule commits scored shards into _scored/ and labels them once all are scored
        wait_for(lambda: committed(scored_dir), 600, "a scored shard", every=0.1)
        done_before = {f"{layout.SCORED}/{rel}": digest for rel, digest in sha256_of(
            scored_dir, [r[k] for r in committed(scored_dir).values() for k in ("path", "quarantine_path") if r[k]]
        ).items()}
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
        t0 = time.monotonic()
        stdout, stderr = proc.communicate(timeout=120)
        stopped_in = time.monotonic() - t0
        # every process of the run ended with it (Ray's raylet, GCS, workers, agents)
        # (a wait, not a timing: on a loaded 2-core machine Ray's last processes took over 20 s to go)
        wait_for(lambda: not job_runs.session_pids(proc.pid), 60, "the run's processes to end")
    finally:
        job_runs.end_session(proc.pid)
        if proc.poll() is None:
            proc.wait()
    assert proc.returncode == 130, stderr[-3000:]
    assert stopped_in < 60, f"took {stopped_in:.0f}s to stop"
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    records = committed(scored_dir)
    n = len(records)
    assert 1 <= n < shards and not committed(out)
    assert stderr.strip().splitlines()[-1] == (f"pairsel: interrupted; 0 of {shards} shards are committed in {out} "
                                              f"and kept, {n} more scored and kept until every shard is scored. "
                                              "Rerun the same command to resume.")
    assert stdout == ""  # no summary of a job that did not finish
    after = checksums(out)
    assert {k: after[k] for k in users} == before_users  # the user's files, untouched
    assert {k: after.get(k) for k in done_before} == done_before  # committed shards stay as they were
    for r in records.values():  # and every commit record is true
        if r["path"]:
            assert after[f"{layout.SCORED}/{r['path']}"] == r["sha256"]


def has_image(record: dict) -> bool:
    negatives = record.get("neg_image_path") or []
    negatives = negatives if isinstance(negatives, list) else [negatives]
    return bool(record.get("qry_image_path") or record.get("pos_image_path") or any(negatives))


def test_console_without_a_terminal_and_a_forgotten_image_root(tiny_models, demo_data, tmp_path):
    """No terminal, input.image_root not set (the images are not next to the input): pairsel's own lines only
    (one progress line, a loud warning that names the folder searched and the likely cause), the summary last;
    Ray's and the libraries' chatter only in OUT/_logs/run.log."""
    rows = Path(demo_data["path"]).read_text().splitlines()[:10]
    with_images = sum(1 for r in map(json.loads, rows) if has_image(r))
    assert with_images > len(rows) / 2
    inputs = tmp_path / "input"
    inputs.mkdir()
    (inputs / "pairs.jsonl").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pipeline", "run", "configs/demo.yaml",
           *small_job(tiny_models, inputs / "pairs.jsonl", out, "input.rows_per_shard=5", "input.image_root=null")]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # one stream: the order a user reads
    try:
        said, _ = proc.communicate(timeout=600)
    finally:
        job_runs.end_session(proc.pid)
    assert proc.returncode == 0, said[-4000:]
    lines = said.strip().splitlines()
    assert all(line.startswith(("pairsel: ", "  ")) for line in lines), said  # nothing but pairsel's own lines
    for chatter in ("Token authentication", "core_worker", "Loading weights", "Running Dataset", "INFO", "it/s]"):
        assert chatter not in said
    assert lines[0] == "pairsel: 2 shards planned, 0 already committed, 2 to do"
    assert lines[1].startswith("pairsel: Full logs are in ") and lines[1].endswith(f"{out}/_logs/run.log")
    assert [line for line in lines if "shards committed" in line][-1].startswith("pairsel: 2/2 shards committed, ")
    warning = [line for line in lines if line.startswith("pairsel: WARNING:")]
    assert len(warning) == 1, said
    assert f"{with_images} of 10 rows ({with_images / 10:.0%}) were quarantined as image_missing" in warning[0]
    assert f"no file {inputs}/images/" in warning[0]  # the path searched
    assert "input.image_root is not set" in warning[0] and "set input.image_root" in warning[0]
    summary = lines[[i for i, line in enumerate(lines) if " pairs written to " in line][-1]:]  # last: what it wrote
    assert summary[0].startswith(f"pairsel: {10 - with_images} pairs written to {out}/data/ (2 shards)")
    assert summary[-1] == f"  manifest: {out}/manifest.json"
    log = (out / "_logs" / "run.log").read_text()
    assert "Started a local Ray instance" in log and "Starting execution of Dataset" in log  # Ray's lines: here
    q = job_runs.table(out, "quarantine").to_pylist()
    assert all(r["detail"].startswith(("query image", "target image", "negative image")) and
               f"no file {inputs}/images/" in r["detail"] for r in q)
