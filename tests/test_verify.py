"""Verified outputs, through the CLI as a user runs it: a resume never keeps a shard whose files differ from its
commit record (damaged, truncated, missing) and redoes it byte for byte; `pairsel verify` checks a whole output,
labels included; report, show and export refuse a damaged output in one line; a full disk fails in one line and
the rerun finishes the job.

Every test works on a copy of one real job's output (the `demo_output` fixture: 3 shards, quarantine rows in
shard 0), damaged the way a copy between disks or bit rot damages files."""
import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas import OUTPUT_SCHEMA, WORK_SCHEMA, conform
from stages.files import file_sha256
from stages.write import to_output_row, to_work_table
from tests.job_runs import checksums, run_pipeline

REPO = Path(__file__).resolve().parent.parent


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def job_args(clean: Path, out: Path) -> list[str]:
    """The arguments of the run that wrote `clean`, into `out` (from the config its manifest stores)."""
    c = json.loads((clean / "manifest.json").read_text())["config"]
    return [f"input.path={c['input']['path']}", f"input.image_root={c['input']['image_root']}",
            f"generators.0.model={c['generators'][0]['model']}", f"generators.0.k={c['generators'][0]['k']}",
            f"embedder.model={c['embedder']['model']}",
            f"input.rows_per_shard={c['input']['rows_per_shard']}", f"output.dir={out}",
            f"scoring.decision.rule={c['scoring']['decision']['rule']}"]


def flip(path: Path, n: int = 64) -> None:
    """Flip n bytes in the middle of a file: its size stays, its bytes do not."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + n] = bytes(b ^ 0xFF for b in data[middle:middle + n])
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def shard_files(out: Path) -> dict[str, str]:
    """sha256 of every shard file and commit record: what must equal a clean run's."""
    return {k: v for k, v in checksums(out).items() if k.startswith(("data/", "quarantine/", "_commits/shard-"))}


@pytest.fixture
def out(demo_output, tmp_path) -> Path:
    copy = tmp_path / "out"
    shutil.copytree(demo_output, copy)
    return copy


def damage(out: Path) -> None:
    """Shard 0: its data file's bytes flipped and its quarantine file truncated; shard 1: its data file truncated;
    shard 2: its data file gone."""
    flip(out / "data" / "shard-000000.parquet")
    truncate(out / "quarantine" / "shard-000000.parquet")
    truncate(out / "data" / "shard-000001.parquet")
    (out / "data" / "shard-000002.parquet").unlink()


def record(out: Path, shard_id: int) -> dict:
    return json.loads((out / "_commits" / f"shard-{shard_id:06d}.json").read_text())


# ---------------------------------------------------------------- the resume
@pytest.mark.slow
def test_a_resume_redoes_damaged_truncated_and_missing_shards_as_a_clean_run_wrote_them(demo_output, out):
    damage(out)
    size = record(out, 1)["bytes"]
    proc = run_pipeline(job_args(demo_output, out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    said = proc.stderr.splitlines()
    assert said[:4] == [
        "pairsel: shard 0 is redone: data/shard-000000.parquet: sha256 differs from its commit record (the bytes "
        "changed since the commit)",
        f"pairsel: shard 1 is redone: data/shard-000001.parquet: {size // 2} bytes, its commit record says {size} "
        "(truncated or overwritten)",
        "pairsel: shard 2 is redone: data/shard-000002.parquet: missing",
        "pairsel: 3 shards planned, 0 already committed, 3 to do",
    ]
    assert shard_files(out) == shard_files(demo_output)  # byte for byte, quarantine files and records included
    assert json.loads((out / "manifest.json").read_text())["shards"] == \
           json.loads((demo_output / "manifest.json").read_text())["shards"]
    assert cli("verify", str(out)).returncode == 0


# ---------------------------------------------------------------- pairsel verify
@pytest.mark.slow
def test_verify_finds_a_clean_output_whole_and_writes_nothing(demo_output):
    before = checksums(demo_output)
    for flags in ([], ["--quick"]):
        proc = cli("verify", str(demo_output), *flags)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.splitlines() == [proc.stdout.strip()]
        assert proc.stdout.startswith(f"pairsel verify: {demo_output} is whole: 3 shards, 40 pairs, "
                                      "2 quarantined rows;")
    assert "every score and label recomputed" in cli("verify", str(demo_output)).stdout
    assert checksums(demo_output) == before
    not_ours = cli("verify", str(demo_output / "data"))
    assert not_ours.returncode == 2 and not_ours.stderr.splitlines() == [
        f"pairsel: config error: out_dir: {demo_output / 'data'} is not a pairsel output folder (no "
        "_commits/job.json nor manifest.json)"]


@pytest.mark.slow
def test_verify_lists_every_damaged_missing_and_extra_file(out):
    damage(out)
    shutil.copy(out / "data" / "shard-000001.parquet", out / "data" / "shard-000005.parquet")  # no record names it
    (out / "_commits" / "shard-000003.json").write_text('{"shard_id": 3, "path": "da')  # cut short
    job = json.loads((out / "_commits" / "job.json").read_text())
    job["input_plan"]["shards"] = 5  # as if the input had two more shards: 4 was never committed
    (out / "_commits" / "job.json").write_text(json.dumps(job))
    size, q_size = record(out, 1)["bytes"], record(out, 0)["quarantine_bytes"]
    for flags in ([], ["--quick"]):
        proc = cli("verify", str(out), *flags)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        lines = proc.stdout.splitlines()
        assert lines[:-1] == [
            "data/shard-000000.parquet: sha256 differs from its commit record (the bytes changed since the commit)",
            f"quarantine/shard-000000.parquet: {q_size // 2} bytes, its commit record says {q_size} (truncated or "
            "overwritten)",
            f"data/shard-000001.parquet: {size // 2} bytes, its commit record says {size} (truncated or overwritten)",
            "data/shard-000002.parquet: missing",
            "_commits/shard-000003.json: not a readable commit record (Unterminated string starting at: line 1 "
            "column 25 (char 24))",
            "shard 4: not committed (no commit record)",
            "data/shard-000005.parquet: no commit record names it (a shard that was never committed, or a file "
            "from elsewhere)",
        ]
        assert lines[-1].startswith(f"pairsel verify: {out} is NOT whole: 7 problem(s) in 6 shard(s)")
        assert "Rerunning the job's command redoes the shards" in lines[-1]


@pytest.mark.slow
def test_verify_recomputes_every_label_with_the_jobs_own_stages(out):
    """Shard 1 rewritten as if its labels had been written wrong: its record and the manifest hold the new
    sha256, so only recomputing the labels from the stored similarities can find it."""
    path = out / "data" / "shard-000001.parquet"
    rows = pq.read_table(path).to_pylist()
    flipped = next(i for i, r in enumerate(rows) if r["decision"] == "direct")
    rows[flipped]["decision"] = "reason"
    moved = next(i for i, r in enumerate(rows) if r["decision"] == "undecided")
    rows[moved]["s_direct"] += 0.25  # the similarity no longer gives the stored scores
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(path)), path, compression="zstd")
    rec = {**record(out, 1), "bytes": path.stat().st_size, "sha256": file_sha256(path)}
    (out / "_commits" / "shard-000001.json").write_text(json.dumps(rec))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"] = [rec if s["shard_id"] == 1 else s for s in manifest["shards"]]
    (out / "manifest.json").write_text(json.dumps(manifest))

    assert cli("verify", str(out), "--quick").returncode == 0  # the files are as their records say
    proc = cli("verify", str(out))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()[:-1]
    assert (f"data/shard-000001.parquet: decision does not recompute in 1 of {len(rows)} rows (e.g. pair "
            f"{rows[flipped]['pair_id']}: stored 'reason', recomputed 'direct')") in lines
    assert any(line.startswith(f"data/shard-000001.parquet: lse_direct does not recompute in 1 of {len(rows)} rows "
                               f"(e.g. pair {rows[moved]['pair_id']}: stored ") for line in lines)
    assert all(line.startswith("data/shard-000001.parquet: ") for line in lines)


def test_stored_rows_convert_back_to_the_work_schema(demo_output):
    """The one conversion verify runs the stages on: a real job's output rows as WORK_SCHEMA rows, which
    to_output_row turns back into the very rows stored."""
    stored = pq.read_table(demo_output / "data" / "shard-000000.parquet")
    work = to_work_table(stored)
    assert work.schema.equals(WORK_SCHEMA) and work.num_rows == stored.num_rows
    for column in ("query_image", "target_image", "shard_size", "quarantine_reason", "raw"):
        assert work[column].null_count == work.num_rows
    assert all(n["image"] is None for negatives in work["negatives"].to_pylist() for n in negatives)
    back = conform([to_output_row(row, p) for row, p in zip(work.to_pylist(), stored["provenance"].to_pylist())],
                   OUTPUT_SCHEMA)
    assert back.equals(stored.replace_schema_metadata(OUTPUT_SCHEMA.metadata))


# ---------------------------------------------------------------- the readers
@pytest.mark.slow
def test_the_manifest_refuses_a_commit_record_that_does_not_read(out):
    """One reader of commit records for verify, the resume and the manifest: the manifest does not count a
    job without the shard whose record is cut short, it names the record; a count for a message skips it."""
    from pipeline.manifest import commit_records
    from pipeline.verify import DamagedOutput, read_commit_records

    assert [r["shard_id"] for r in commit_records(out)] == [0, 1, 2]
    (out / "_commits" / "shard-000001.json").write_text('{"shard_id": 1, "path": "da')
    with pytest.raises(DamagedOutput, match=r"_commits/shard-000001.json: not a readable commit record"):
        commit_records(out)
    assert [r["shard_id"] for r in read_commit_records(out)[0]] == [0, 2]


def test_report_show_and_export_refuse_a_damaged_output_in_one_line(out, tmp_path):
    flip(out / "data" / "shard-000001.parquet")
    before = checksums(out)
    for args in (["report", str(out)], ["show", str(out), "any-pair"],
                 ["export", str(out), "--format", "gate", "--out", str(tmp_path / "gate")]):
        proc = cli(*args)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert proc.stderr.splitlines() == [
            f"pairsel: {out} is damaged: data/shard-000001.parquet: sha256 differs from its commit record (the bytes "
            f"changed since the commit); `pairsel verify {out}` lists every problem, and rerunning the job's command "
            "redoes the damaged shards"], args
        assert "Traceback" not in proc.stdout + proc.stderr
    assert checksums(out) == before and not (tmp_path / "gate").exists()


# ---------------------------------------------------------------- a full disk
@contextlib.contextmanager
def small_disk(folder: Path, size: str):
    """A tmpfs of `size` at `folder` (root only), unmounted afterwards; the test is skipped where none mounts."""
    folder.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("cannot mount a tmpfs to fill up here: no mount command")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill up here (it needs root with CAP_SYS_ADMIN): "
                    f"{proc.stderr.strip() or proc.returncode}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.slow
def test_a_full_disk_fails_in_one_line_and_the_rerun_finishes_as_a_clean_run(demo_output, tmp_path):
    # 1 MB holds the job record, the logs and the index, not the embedding cache and the shards: the disk fills
    # while the job writes
    with small_disk(tmp_path / "disk", "1m") as disk:
        out = disk / "out"
        full = run_pipeline(job_args(demo_output, out))
        assert full.returncode == 1, full.stdout[-3000:] + full.stderr[-3000:]
        failed = [line for line in full.stderr.splitlines() if line.startswith("pairsel: the job failed")]
        assert len(failed) == 1 and "Traceback" not in full.stderr, full.stderr[-3000:]
        assert "No space left on device" in failed[0]
        assert failed[0].endswith(f"0 of 3 shards are committed in {out} and kept. Details: {out}/_logs/run.log. "
                                  "Rerun the same command to finish the rest.")
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)  # space freed
        rerun = run_pipeline(job_args(demo_output, out))
        assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
        assert shard_files(out) == shard_files(demo_output)
