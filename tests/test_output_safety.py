"""A user's files are sacred: `pipeline run` writes only into a new or empty folder or its own output, and deletes
only what it wrote, --overwrite or not. Through the CLI as a user runs it; each case is over before Ray starts
(a refusal), or has nothing to run (an empty input), so that it takes seconds."""
import json
import time
from pathlib import Path

import pytest

from tests.job_runs import checksums
from tests.job_runs import run_pipeline as run_cli

# A fresh clone has neither models/ nor data/demo/: every run names the tiny models and a real input, so that it
# gets as far as the output folder (the config check comes first).
REAL_INPUT_AND_MODELS: list[str] = []


@pytest.fixture(autouse=True)
def real_input_and_models(tiny_models, demo_data):
    REAL_INPUT_AND_MODELS[:] = [f"input.path={demo_data['path']}", f"input.image_root={demo_data['root']}",
                                f"generators.0.model={tiny_models['generator']}",
                                f"embedder.model={tiny_models['embedder']}"]


def run_pipeline(args: list[str], **kwargs):
    return run_cli([*REAL_INPUT_AND_MODELS, *args], **kwargs)


def user_folder(root: Path) -> Path:
    """A folder of a user's own: a thesis, notes, a README, a Parquet dataset of theirs."""
    folder = root / "notes"
    (folder / "data").mkdir(parents=True)
    (folder / "thesis.tex").write_text("\\documentclass{article} my thesis\n")
    (folder / "notes.txt").write_text("do not lose me\n")
    (folder / "README.md").write_text("# My dataset\n")
    (folder / "data" / "train-00000.parquet").write_bytes(b"PAR1 a user's parquet PAR1")
    return folder


@pytest.mark.parametrize("flags", [["--overwrite"], [], ["--overwrite", "--force"]])
def test_a_folder_that_is_not_a_pairsel_output_is_refused_whatever_the_flags(tmp_path, flags):
    folder = user_folder(tmp_path)
    before = checksums(folder)
    t0 = time.monotonic()
    proc = run_pipeline([f"output.dir={folder}", *flags], timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith(f"pairsel: config error: output.dir: {folder} is not empty")
    assert "not a pairsel output" in lines[0] and "Traceback" not in proc.stderr
    assert checksums(folder) == before  # not one byte of the user's changed, nothing added
    assert time.monotonic() - t0 < 60  # before Ray: no session started
    assert "Full logs" not in proc.stderr + proc.stdout


def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    thesis = tmp_path / "thesis.tex"
    thesis.write_text("my thesis\n")
    proc = run_pipeline([f"output.dir={thesis}", "--overwrite"], timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"pairsel: config error: output.dir: {thesis} is a file, not a folder"
    assert thesis.read_text() == "my thesis\n"


def pairsel_output_with_user_files(out: Path, empty_input: Path) -> dict:
    """An output that pairsel made (its job record and manifest, via a real run over an empty input), then what a
    dead run of pairsel leaves (shard files, staged parts, an index, counters, a cache, inline images), and a
    user's own files."""
    proc = run_pipeline([f"input.path={empty_input}", f"output.dir={out}"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "_commits" / "job.json").is_file() and (out / "README.md").read_text().startswith("---\n")
    pairsels = {
        "data/shard-000000.parquet": b"x", "quarantine/shard-000003.parquet": b"x",
        "data/.shard-000001.parquet.0123456789abcdef0123456789abcdef.tmp": b"x",
        "_staging/shard-000000/part-1.parquet": b"x", "_index/pair_ids/shard-000000.parquet": b"x",
        "_stats/generate-1-abc.json": b"{}", "_cache/embeddings/id/ab/cd/abcd.emb": b"PSE1", "report.html": b"<html>",
        "_images/ab/abcdef0123456789.png": b"\x89PNG",  # the read's store of inline images
    }
    users = {
        "notes.txt": b"do not lose me", "data/train-00000.parquet": b"a user's parquet",
        "data/shard-final.parquet": b"a user's file with a shard-like name", "quarantine/why.md": b"my notes",
        "plots/fig1.png": b"\x89PNG", "_commits/my-notes.txt": b"mine too",
    }
    for rel, data in {**pairsels, **users}.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    return {"pairsels": pairsels, "users": users}


@pytest.mark.parametrize("flags", [["--overwrite"], []])
def test_on_its_own_output_pairsel_deletes_only_its_own_files(tmp_path, flags):
    """--overwrite removes everything pairsel wrote and nothing else; a resume removes the leftovers of a dead
    run (uncommitted shard files, staged parts) and nothing else."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "out"
    files = pairsel_output_with_user_files(out, empty)
    before = checksums(out)
    proc = run_pipeline([f"input.path={empty}", f"output.dir={out}", *flags], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = checksums(out)
    for rel in files["users"]:
        assert after.get(rel) == before[rel], f"a user's file was touched: {rel}"
    gone = {"data/shard-000000.parquet", "quarantine/shard-000003.parquet", "_staging/shard-000000/part-1.parquet",
            "data/.shard-000001.parquet.0123456789abcdef0123456789abcdef.tmp"}
    if flags:  # afresh: every file of the earlier run is gone
        gone |= {"_index/pair_ids/shard-000000.parquet", "_stats/generate-1-abc.json",
                 "_cache/embeddings/id/ab/cd/abcd.emb", "report.html", "_images/ab/abcdef0123456789.png"}
    assert not gone & set(after), f"pairsel's leftovers kept: {sorted(gone & set(after))}"
    assert (out / "_commits" / "job.json").is_file()  # and it is still a pairsel output
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


def test_a_readme_of_the_users_in_its_output_is_not_overwritten_by_the_card(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "out"
    assert run_pipeline([f"input.path={empty}", f"output.dir={out}"], timeout=120).returncode == 0
    (out / "README.md").write_text("# My own notes on this output\n")
    for flags in ([], ["--overwrite"]):
        proc = run_pipeline([f"input.path={empty}", f"output.dir={out}", *flags], timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (out / "README.md").read_text() == "# My own notes on this output\n"
        assert "README.md is not pairsel's dataset card" in proc.stderr


def test_a_resume_into_an_output_of_another_schema_version_is_refused_even_forced(tmp_path):
    """One output holds one schema version: a version-1 output (its job record has no schema_version) is not
    resumed by a pairsel that writes another version, --force or not; --overwrite starts it afresh."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "out"
    assert run_pipeline([f"input.path={empty}", f"output.dir={out}"], timeout=120).returncode == 0
    job = out / "_commits" / "job.json"
    record = json.loads(job.read_text())
    del record["schema_version"]  # as pairsel 0.1 wrote it, for schema version 1
    job.write_text(json.dumps(record))
    before = checksums(out)
    proc = run_pipeline([f"input.path={empty}", f"output.dir={out}", "--force"], timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().startswith("pairsel: config error: output.dir: holds shards of schema version 1")
    assert checksums(out) == before
    assert run_pipeline([f"input.path={empty}", f"output.dir={out}", "--overwrite"], timeout=120).returncode == 0
