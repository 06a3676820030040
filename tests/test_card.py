"""The dataset card: valid Hugging Face front matter, the manifest's numbers, and OUT loads as a dataset.
Set PAIRSEL_TEST_OUTPUT=OUT to check a real output folder too (its README.md is rewritten from its manifest)."""
import datasets
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline import card
from pipeline.read_output import data_files, read_manifest
from tests.synthetic_output import output_for


@pytest.fixture(scope="module", params=["synthetic", "demo_job"])
def out(request, tmp_path_factory):
    return output_for(request, tmp_path_factory)


@pytest.fixture(scope="module")
def written(out):
    manifest = read_manifest(out)
    return card.write_card(str(out), manifest), manifest


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    head, _, _ = text[4:].partition("\n---\n")
    return yaml.safe_load(head)


def test_front_matter_parses(out, written):
    path, _ = written
    assert path == out / "README.md"
    meta = _front_matter(path.read_text())
    assert meta["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": "data/*.parquet"}]}]
    assert meta["license"] in ("other", "unknown")
    assert meta["task_categories"] and "multimodal" in meta["tags"]


def test_body_has_the_manifest_numbers(written):
    path, manifest = written
    text = path.read_text()
    assert f"pairs written: **{manifest['counts']['pairs_written']}**" in text
    for name, s in manifest["subsets"].items():
        assert (f"| {name} | {s['pairs']} | {s['need_reasoning']} ({s['need_reasoning_rate']:.1%}) |"
                f" {s['direct']} ({s['direct_rate']:.1%}) | {s['undecided']} ({s['undecided_rate']:.1%}) |"
                f" {s['control_turned_direct']} |") in text
    counts = manifest["counts"]
    assert (f"outcomes: reason {counts['need_reasoning']} ({counts['need_reasoning_rate']:.1%}), direct "
            f"{counts['direct']} ({counts['direct_rate']:.1%}), undecided {counts['undecided']}") in text
    for name, g in manifest["generators"].items():
        assert f"| {name} | {g['backend']} | `{g['model']}` |" in text
    assert manifest["embedder"]["model"] in text
    assert manifest["config_hash"] in text and f"schema version {manifest['schema_version']}" in text
    assert 'load_dataset("parquet", data_files=' in text and "pl.scan_parquet" in text


def test_out_loads_as_a_dataset(out, written, tmp_path):
    expected = sum(pq.read_metadata(f).num_rows for f in data_files(out))
    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert len(ds) == expected == written[1]["counts"]["pairs_written"]
    assert "candidates" in ds.column_names and "reason" not in ds.column_names  # quarantine left out
    same = datasets.load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train",
                                 cache_dir=str(tmp_path / "hf-cache"))
    assert sorted(same["pair_id"]) == sorted(ds["pair_id"])


def test_card_of_a_partial_manifest(tmp_path):
    path = card.write_card(str(tmp_path), {"status": "running", "counts": {}})
    text = path.read_text()
    assert "status: **running**" in text
    _front_matter(text)
