"""Bad input through the whole job, and pairsel's security defaults.

The bad-input corpus (tests/bad_corpus.py) sits next to the clean demo pairs: a job over both must quarantine
each bad record with its reason code, count them by reason in the manifest, tell the user, and write every other
row exactly as a job over the clean pairs alone does (bit for bit: the clean shards are the same shards).
"""
import io
import json
import os
import pickle
import re
import secrets
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from tests import job_runs
from tests.job_runs import REPO, job_args, run_pipeline, table

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_models):
    return job_runs.corpus(tmp_path_factory, tiny_models)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus):
    return job_runs.reference(tmp_path_factory, corpus)


SECRETS = {"OPENAI_API_KEY": "sk-" + secrets.token_hex(16), "HF_TOKEN": "hf_" + secrets.token_hex(16)}


@pytest.fixture(scope="module")
def jsonl_run(corpus, tmp_path_factory):
    """The clean pairs and the bad records, one folder of input; secrets in the environment, as a user has."""
    out = tmp_path_factory.mktemp("bad-jsonl") / "out"
    proc = run_pipeline(job_args(corpus, out, path=corpus["clean"].parent), env={**os.environ, **SECRETS})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"out": out, "proc": proc, "manifest": json.loads((out / "manifest.json").read_text())}


@pytest.fixture(scope="module")
def tar_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("bad-tar") / "out"
    proc = run_pipeline(job_args(corpus, out, "input.format=webdataset", path=corpus["tar"]))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"out": out, "proc": proc}


def test_each_bad_record_is_quarantined_with_its_reason(jsonl_run, corpus):
    q = table(jsonl_run["out"], "quarantine")
    rows = [r for r in q.to_pylist() if r["source"] == str(corpus["jsonl"])]
    assert [r["reason"] for r in rows] == corpus["jsonl_reasons"]
    assert all(r["detail"] and r["raw"] for r in rows)
    assert max(len(r["raw"]) for r in rows) < 10_100  # the 1 MB query is kept, truncated
    assert q.num_rows == len(rows)  # nothing of the clean file was quarantined


def test_manifest_counts_them_by_reason_and_the_user_is_told(jsonl_run, corpus):
    counts = jsonl_run["manifest"]["counts"]
    want = Counter(corpus["jsonl_reasons"])
    assert counts["quarantined_by_reason"] == dict(sorted(want.items()))
    assert counts["pairs_quarantined"] == len(corpus["jsonl_reasons"])
    assert counts["pairs_written"] == job_runs.CORPUS_PAIRS
    said = jsonl_run["proc"].stdout
    assert f"quarantined {len(corpus['jsonl_reasons'])} rows" in said
    assert f"{jsonl_run['out']}/quarantine/" in said
    assert "image_outside_root 3" in said


def test_every_other_row_is_as_in_a_clean_run(jsonl_run, reference):
    data = table(jsonl_run["out"], "data")
    assert data.num_rows == job_runs.CORPUS_PAIRS
    ref_manifest = json.loads((reference / "manifest.json").read_text())
    clean_shards = {s["shard_id"]: s["sha256"] for s in ref_manifest["shards"]}
    got = {s["shard_id"]: s["sha256"] for s in jsonl_run["manifest"]["shards"] if s["shard_id"] in clean_shards}
    assert got == clean_shards  # the same files, byte for byte
    assert data.equals(table(reference, "data"))


def test_a_tar_member_named_with_dotdot_is_quarantined_alone(tar_run, corpus, reference):
    q = table(tar_run["out"], "quarantine").to_pylist()
    assert [r["reason"] for r in q] == corpus["tar_reasons"]
    assert "../escape.json" in q[0]["raw"]
    # the clean samples come out as the clean JSONL lines do; only the file they came from differs
    assert_same_output_but_source(tar_run["out"], reference)


def assert_same_output_but_source(out, reference):
    got, want = table(out, "data"), table(reference, "data")
    assert got.num_rows == want.num_rows == job_runs.CORPUS_PAIRS
    assert got.drop_columns(["source"]).equals(want.drop_columns(["source"]))


# ------------------------------------------------------------------ security defaults
def test_secrets_from_the_environment_reach_no_output_and_no_log(jsonl_run):
    logs = re.search(r"Full logs are in (\S+?/session_[^/\s]+)", jsonl_run["proc"].stderr)
    assert logs, "no Ray session directory in the job's log"
    places = [p for p in jsonl_run["out"].rglob("*") if p.is_file()]
    places += [p for p in Path(logs.group(1)).rglob("*") if p.is_file()]
    assert len(places) > 10
    texts = [jsonl_run["proc"].stdout.encode(), jsonl_run["proc"].stderr.encode()]
    for secret in SECRETS.values():
        assert not any(secret.encode() in t for t in texts)
        leaked = [str(p) for p in places if secret.encode() in p.read_bytes()]
        assert not leaked, f"a secret from the environment is in {leaked}"


def test_local_ray_listens_on_loopback_only(tmp_path):
    code = ("from pipeline.run import init_ray; import ray; init_ray(None); "
            "ray.get(ray.remote(lambda: 1).remote()); print('READY', flush=True); import time; time.sleep(300)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, start_new_session=True, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout.readline().strip() == "READY"
        addresses = job_runs.listening_addresses(job_runs.session_pids(proc.pid))
    finally:
        job_runs.end_session(proc.pid)
        proc.wait()
    assert len(addresses) >= 3, addresses  # GCS, raylet, workers at least
    outside = [a for a in addresses if a.rsplit(":", 1)[0] not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert not outside, f"Ray listens beyond the loopback interface: {outside}"


def test_trust_remote_code_is_off_unless_the_config_turns_it_on(tiny_models, tmp_path):
    from omegaconf import OmegaConf

    default = OmegaConf.load(REPO / "configs" / "default.yaml")
    assert default.embedder.trust_remote_code is False
    assert all(g.trust_remote_code is False for g in default.generators)
    # a model folder whose config names code to run: loading it must not run it
    model, marker = tmp_path / "model-with-code", tmp_path / "code-ran"
    shutil.copytree(tiny_models["embedder"], model)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="pairsel-custom", auto_map={"AutoConfig": "custom.CustomConfig",
                                                         "AutoModel": "custom.CustomModel"})
    (model / "config.json").write_text(json.dumps(config))
    (model / "custom.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    # in a child process, so that the code the second load runs stays out of this one
    load = ("import pathlib, sys; from stages.backends.hf import TransformersEmbedder\n"
            "for flag in (False, True):\n"
            "    try: TransformersEmbedder(sys.argv[1], trust_remote_code=flag)\n"
            "    except Exception: pass\n"
            "    print(pathlib.Path(sys.argv[2]).exists())\n")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    ran = subprocess.run([sys.executable, "-c", load, str(model), str(marker)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    # off: the code did not run; on: it did (so the first check can fail)
    assert ran.stdout.split() == ["False", "True"], ran.stdout + ran.stderr[-2000:]


class _Payload:
    """Unpickling this makes a directory: the proof that something was unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_nothing_from_the_input_is_unpickled(tmp_path):
    from stages.inputs import plan_shards
    from stages.read import ReadSpec, read_shard

    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Payload(str(marker)))
    with tarfile.open(tmp_path / "pairs.tar", "w") as tf:
        for name, data in [("s0.json", json.dumps({"qry": "q", "pos_text": "t"}).encode()), ("s0.pyd", payload),
                           ("s0.pickle", payload), ("s1.pyd", payload), ("s1.qry.txt", b"q2"),
                           ("s1.pos.txt", b"t2")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    cfg = {"path": str(tmp_path / "pairs.tar"), "format": "webdataset", "image_root": None, "subset": None,
           "rows_per_shard": 10, "max_query_chars": 100, "max_image_pixels": 1_000_000}
    rows = [r for spec in plan_shards(cfg) for r in read_shard(spec, ReadSpec.from_input(cfg, 0, 0))]
    assert [(r["query_text"], r["quarantine_reason"]) for r in rows] == [("q", None), ("q2", None)]
    assert not marker.exists()
    pickle.loads(payload)
    assert marker.exists()  # the payload works: the check above can fail
