"""`ray job submit --working-dir . -- python -m pipeline run ...` against a real `ray start --head` on 127.0.0.1,
with Ray's token authentication on (the default since Ray 2.60), as a user would run it."""
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from schemas import OUTPUT_SCHEMA
from tests import job_runs

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).with_name("ray"))
pytestmark = [pytest.mark.cluster, pytest.mark.slow]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ray-head")
    # Ray's socket paths live under --temp-dir and must stay short (AF_UNIX paths are <= 107 bytes).
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    env.pop("RAY_ADDRESS", None)
    # as in an activated venv: the job's `python` is the one Ray runs on
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    gcs, dash = job_runs.free_port(), job_runs.free_port()
    sessions = [job_runs.ray_start(["--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2",
                                    f"--temp-dir={temp_dir}", "--disable-usage-stats"], env)]
    address = f"http://127.0.0.1:{dash}"
    try:
        # the dashboard's job API takes 10-20 s on an idle 2-core machine, and over 60 s on a loaded one (seen in a
        # fresh-clone `make test`): this waits for readiness, it does not time Ray's start-up
        deadline = time.time() + 240
        while subprocess.run([RAY, "job", "list", "--address", address], env=env,
                             capture_output=True).returncode != 0:
            assert time.time() < deadline, "the dashboard's job API never came up"
            time.sleep(2)
        yield {"address": address, "env": env}
    finally:
        job_runs.end_ray_nodes(sessions, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_job_submitted_to_a_local_head_runs(head, tiny_models, demo_data, tmp_path):
    out = tmp_path / "out"
    for _ in range(3):
        proc = _submit(head, demo_data, tiny_models, out)
        # The job API answers before the head's job agent is ready; Ray then says so and submits nothing.
        if "No available agent" not in proc.stdout + proc.stderr:
            break
        time.sleep(10)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["counts"]["pairs_written"] == demo_data["valid_rows"]
    table = pq.read_table(out / "data")
    assert table.num_rows == demo_data["valid_rows"]
    assert table.schema.remove_metadata().equals(OUTPUT_SCHEMA.remove_metadata())


def _submit(head, demo_data, tiny_models, out):
    return subprocess.run(
        [RAY, "job", "submit", "--address", head["address"], "--working-dir", ".", "--",
         "python", "-m", "pipeline", "run", "configs/demo.yaml",
         f"input.path={demo_data['path']}", f"input.image_root={demo_data['root']}",
         f"generators.0.model={tiny_models['generator']}", f"embedder.model={tiny_models['embedder']}",
         f"output.dir={out}"],
        cwd=REPO, env=head["env"], capture_output=True, text=True, timeout=600,
    )


def test_submit_without_the_token_is_refused(head, tmp_path):
    env = {k: v for k, v in head["env"].items() if k != "RAY_AUTH_TOKEN_PATH"}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token to fall back on
    proc = subprocess.run([RAY, "job", "list", "--address", head["address"]], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
