"""Running `python -m pipeline run` as a user would, and comparing what jobs wrote.

Each run gets its own process session, so that whatever it leaves behind can be found and ended afterwards:
a driver killed with SIGKILL takes its Ray's GCS, raylet and workers with it, but Ray's dashboard and
runtime-env agents live on.

The corpus (24 demo pairs in 4 shards, plus the bad inputs of tests/bad_corpus.py) and a clean reference run
over it are built once per test session and shared by tests/test_faults.py and tests/test_bad_inputs.py.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tests.bad_corpus import build as build_bad_corpus

REPO = Path(__file__).resolve().parent.parent
CORPUS_PAIRS = 24
ROWS_PER_SHARD = 6


def run_pipeline(args: list[str], env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return pairsel(["run", "configs/demo.yaml", *args], env, timeout)


def pairsel(args: list[str], env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m pipeline ARGS` in a session of its own, ended with everything left in it."""
    cmd = [sys.executable, "-m", "pipeline", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        end_session(proc.pid)
        if proc.poll() is None:
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def session_pids(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
            except ProcessLookupError:
                pass
    return pids


def end_session(sid: int, grace: float = 0.5) -> None:
    """SIGKILL every process left in session `sid` (one that this test started)."""
    for _ in range(3):
        pids = session_pids(sid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(grace)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (now: a caller may bind it, or find it refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_start(args: list[str], env: dict) -> int:
    """`ray start ...` in a session of its own; returns the session id, which the node's daemons keep."""
    ray = str(Path(sys.executable).with_name("ray"))
    proc = subprocess.Popen([ray, "start", *args], env=env, start_new_session=True, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-3000:]
    return proc.pid


def end_ray_nodes(sessions: list[int], temp_dir: str) -> None:
    """End the nodes that ray_start started (not `ray stop`, which ends every Ray of this user on the machine),
    and the drivers of jobs submitted to them: Ray starts those in sessions of their own, in a working dir
    under the nodes' --temp-dir."""
    for sid in sessions:
        end_session(sid)
    root = os.path.realpath(temp_dir) + os.sep
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.path.realpath(f"/proc/{entry}/cwd").startswith(root):
                    os.kill(int(entry), signal.SIGKILL)
            except (FileNotFoundError, PermissionError, ProcessLookupError):
                pass


def listening_addresses(pids: list[int]) -> list[str]:
    """The local addresses that these processes listen on with TCP, read from /proc."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            hex_ip, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_ip)
            # /proc prints the address as native-endian 32-bit words
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.append(f"{socket.inet_ntop(family, raw)}:{int(hex_port, 16)}")
    return found


# ------------------------------------------------------------------ the shared corpus and its clean run
def corpus(tmp_path_factory, tiny_models) -> dict:
    from scripts.make_demo_data import make

    root = tmp_path_factory.getbasetemp() / "corpus" / "demo"
    clean = make(root, n_pairs=CORPUS_PAIRS, seed=0)
    bad = build_bad_corpus(root, clean)
    return {"root": root, "clean": clean, **bad, "models": tiny_models}


def job_args(corpus: dict, out: Path, *extra: str, path: Path | None = None) -> list[str]:
    return [f"input.path={path or corpus['clean']}", f"input.image_root={corpus['root']}",
            f"generators.0.model={corpus['models']['generator']}", f"embedder.model={corpus['models']['embedder']}",
            f"output.dir={out}", f"input.rows_per_shard={ROWS_PER_SHARD}", "generators.0.k=2",
            "generators.0.sampling.max_new_tokens=16", *extra]


def reference(tmp_path_factory, corpus: dict) -> Path:
    """The output dir of one clean, uninterrupted run over the clean pairs (made once per session)."""
    out = tmp_path_factory.getbasetemp() / "reference" / "out"
    if not (out / "manifest.json").is_file():
        proc = run_pipeline(job_args(corpus, out, "--overwrite"))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


# ------------------------------------------------------------------ what a job wrote
def committed(out: Path) -> dict[int, dict]:
    return {r["shard_id"]: r for r in (json.loads(p.read_text()) for p in (out / "_commits").glob("shard-*.json"))}


def table(out: Path, sub: str) -> pa.Table:
    files = sorted((out / sub).glob("shard-*.parquet"))
    if not files:
        return pa.table({})
    t = pa.concat_tables([pq.read_table(f) for f in files])
    return t.sort_by([("shard_id", "ascending"), ("row_index", "ascending")])


def assert_same_output(out: Path, reference: Path, ignore: tuple[str, ...] = ()) -> None:
    """`out` holds exactly what `reference` holds: the same pair_ids, each once, with identical labels,
    scores and everything else (bit for bit), and the same quarantine rows."""
    got, want = table(out, "data"), table(reference, "data")
    ids = got["pair_id"].to_pylist()
    assert len(ids) == len(set(ids)), "a pair_id was written twice"
    assert set(ids) == set(want["pair_id"].to_pylist()), "pair_ids missing or extra"
    keep = [c for c in want.column_names if c not in ignore]
    for column in keep:  # one column at a time, to name the first that differs
        assert got[column].equals(want[column]), f"column {column} differs from the reference run"
    got_q, want_q = table(out, "quarantine"), table(reference, "quarantine")
    if want_q.num_rows or got_q.num_rows:
        keep_q = [c for c in want_q.column_names if c not in ignore]
        assert got_q.select(keep_q).equals(want_q.select(keep_q)), "quarantine differs from the reference run"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    if not ignore:  # then every shard file is the same, byte for byte
        ref_manifest = json.loads((reference / "manifest.json").read_text())
        assert [(s["shard_id"], s["rows"], s["sha256"]) for s in manifest["shards"]] == \
               [(s["shard_id"], s["rows"], s["sha256"]) for s in ref_manifest["shards"]]


def wait_for(condition, timeout: float, what: str, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


# ------------------------------------------------------------------ a user's files around a run
def checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by path relative to it (a user's files before and after a run)."""
    import hashlib

    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def start_pipeline(args: list[str], env: dict | None = None) -> subprocess.Popen:
    """`python -m pipeline run configs/demo.yaml ARGS` in a session of its own, without waiting: for a test
    that signals it (end it with end_session(proc.pid))."""
    cmd = [sys.executable, "-m", "pipeline", "run", "configs/demo.yaml", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
