"""pairsel export: every format loads with datasets, polars and a torch DataLoader, and holds exactly the
rows expected from the source shards. Set PAIRSEL_TEST_OUTPUT=OUT to check a real output folder too."""
import argparse

import datasets
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch.utils.data

from pipeline import export
from pipeline.report import data_files
from tests.synthetic_output import make_output, output_for


@pytest.fixture(scope="module", params=["synthetic", "demo_job"])
def out(request, tmp_path_factory):
    return output_for(request, tmp_path_factory)


@pytest.fixture(scope="module")
def rows(out):
    return pq.read_table(data_files(out)).to_pylist()


class Rows(torch.utils.data.Dataset):
    """What a trainer would wrap around the export: one dict per row."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i]


def load_everywhere(result: dict, tmp_path) -> list[dict]:
    """Load the export with datasets, polars and a DataLoader; check they agree; return the rows."""
    files = result["files"]
    jsonl = files[0].endswith(".jsonl")
    ds = datasets.load_dataset("json" if jsonl else "parquet", data_files=files, split="train",
                               cache_dir=str(tmp_path / "hf-cache"))
    df = pl.read_ndjson(files) if jsonl else pl.read_parquet(files)
    assert len(ds) == df.height == result["rows"]
    loader = torch.utils.data.DataLoader(Rows(ds), batch_size=4, shuffle=False, collate_fn=list)
    seen = [row for batch in loader for row in batch]
    assert len(seen) == result["rows"]
    assert [r["pair_id"] for r in seen] == df["pair_id"].to_list()
    return seen


def expected_preference(rows, subsets=None, min_delta=None, need_reasoning=None) -> dict:
    """{(pair_id, chosen, rejected): (chosen text, rejected text)} straight from the candidates."""
    out = {}
    for r in rows:
        if subsets and r["subset"] not in subsets:
            continue
        if min_delta is not None and (r["best_delta"] is None or r["best_delta"] < min_delta):
            continue
        if need_reasoning is not None and r["need_reasoning"] != need_reasoning:
            continue
        if r["chosen"] is None:
            continue
        best = r["candidates"][r["chosen"]]
        for k in r["rejected"]:
            if k != r["chosen"] and r["candidates"][k]["delta"] < best["delta"]:
                out[(r["pair_id"], r["chosen"], k)] = (best["text"], r["candidates"][k]["text"])
    return out


def _content_text(messages) -> str:
    return " ".join(part["text"] for part in messages[0]["content"] if part["type"] == "text")


@pytest.mark.parametrize("jsonl", [False, True])
def test_preference_conversational(out, rows, tmp_path, jsonl):
    result = export.run(str(out), "preference", str(tmp_path / "pref"), jsonl=jsonl)
    got = load_everywhere(result, tmp_path)
    expected = expected_preference(rows)
    assert {(r["pair_id"], r["chosen_index"], r["rejected_index"]) for r in got} == set(expected)
    assert len(got) == len(expected) > 0
    by_id = {r["pair_id"]: r for r in rows}
    for r in got:
        src = by_id[r["pair_id"]]
        chosen_text, rejected_text = expected[(r["pair_id"], r["chosen_index"], r["rejected_index"])]
        assert r["prompt"][0]["role"] == "user" and r["chosen"][0]["role"] == "assistant"
        assert _content_text(r["chosen"]) == chosen_text and _content_text(r["rejected"]) == rejected_text
        assert r["delta_chosen"] > r["delta_rejected"]
        kinds = [part["type"] for part in r["prompt"][0]["content"]]
        if src["query_image_path"]:
            assert kinds.count("image") == 1 and r["images"] == [src["query_image_path"]]
        else:
            assert "image" not in kinds and r["images"] == []
        query_words = src["query_text"].replace(export.IMAGE_MARKER, " ").split()
        assert _content_text(r["prompt"]).split() == query_words
    assert result["pairs"] == len({k[0] for k in expected})


def test_preference_standard_with_filters(out, rows, tmp_path):
    # the subset with the most preference rows among pairs that need reasoning
    per_subset = {}
    for pair_id, *_ in expected_preference(rows, need_reasoning=True):
        subset = next(r["subset"] for r in rows if r["pair_id"] == pair_id)
        per_subset[subset] = per_subset.get(subset, 0) + 1
    subsets = [max(per_subset, key=per_subset.get)]
    result = export.run(str(out), "preference", str(tmp_path / "pref"), subsets=subsets, need_reasoning=True,
                        preference_style="standard")
    got = load_everywhere(result, tmp_path)
    expected = expected_preference(rows, subsets=subsets, need_reasoning=True)
    assert len(got) == len(expected) > 0
    assert {(r["pair_id"], r["chosen_index"], r["rejected_index"]) for r in got} == set(expected)
    for r in got:
        assert (r["chosen"], r["rejected"]) == expected[(r["pair_id"], r["chosen_index"], r["rejected_index"])]
        assert r["subset"] in subsets and r["need_reasoning"] is True
        assert isinstance(r["prompt"], str)
        assert (export.IMAGE_MARKER in r["prompt"]) == bool(r["images"])


def _expected_contrastive(src: dict, mode: str) -> dict:
    explicit = [n for n in src["negatives"] if n["origin"] == "explicit"]
    rationale = src["candidates"][src["chosen"]]["text"] if src["need_reasoning"] else None
    qry = src["query_text"] or ""
    if mode == "append" and rationale is not None:
        qry = qry + export.RATIONALE_SEPARATOR + rationale
    row = {"qry": qry, "qry_image_path": src["query_image_path"] or "", "pos_text": src["target_text"] or "",
           "pos_image_path": src["target_image_path"] or "",
           "neg_text": (explicit[0]["text"] or "") if explicit else "",
           "neg_image_path": (explicit[0]["image_path"] or "") if explicit else "",
           "pair_id": src["pair_id"], "subset": src["subset"], "need_reasoning": src["need_reasoning"]}
    if mode == "column":
        row["rationale"] = rationale
    return row


@pytest.mark.parametrize("mode,jsonl", [("append", False), ("column", False), ("append", True)])
def test_contrastive_is_mmeb_train(out, rows, tmp_path, mode, jsonl):
    result = export.run(str(out), "contrastive", str(tmp_path / "con"), rationale_mode=mode, jsonl=jsonl)
    got = load_everywhere(result, tmp_path)
    by_id = {r["pair_id"]: r for r in rows}
    assert sorted(r["pair_id"] for r in got) == sorted(by_id)
    for r in got:
        assert r == _expected_contrastive(by_id[r["pair_id"]], mode)
        # VLM2Vec reads these as strings and treats "" as "no image"
        for col in ("qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text", "neg_image_path"):
            assert isinstance(r[col], str)


def test_contrastive_min_delta(out, rows, tmp_path):
    deltas = sorted(r["best_delta"] for r in rows if r["best_delta"] is not None)
    threshold = deltas[len(deltas) // 2]
    result = export.run(str(out), "contrastive", str(tmp_path / "con"), min_delta=threshold)
    got = load_everywhere(result, tmp_path)
    expected = {r["pair_id"] for r in rows if r["best_delta"] is not None and r["best_delta"] >= threshold}
    assert {r["pair_id"] for r in got} == expected


@pytest.mark.parametrize("need", [True, False])
def test_gate(out, rows, tmp_path, need):
    result = export.run(str(out), "gate", str(tmp_path / "gate"), need_reasoning=need)
    got = load_everywhere(result, tmp_path)
    by_id = {r["pair_id"]: r for r in rows if r["need_reasoning"] == need}
    assert sorted(r["pair_id"] for r in got) == sorted(by_id)
    for r in got:
        src = by_id[r["pair_id"]]
        for col in ("query_text", "query_image_path", "target_text", "target_image_path", "need_reasoning",
                    "best_delta", "s_direct"):
            assert r[col] == src[col]


def test_parts_and_empty_results(tmp_path):
    make_output(tmp_path / "out", n_pairs=48, rows_per_shard=8)
    result = export.run(str(tmp_path / "out"), "gate", str(tmp_path / "gate"), rows_per_part=16)
    assert len(result["files"]) == 3 and result["rows"] == 48
    load_everywhere(result, tmp_path)
    # a filter that keeps nothing still leaves one (empty) file with the schema, for polars and pyarrow
    # (datasets refuses to build a split of 0 rows), and replaces the earlier parts
    result = export.run(str(tmp_path / "out"), "gate", str(tmp_path / "gate"), subsets=["no-such-subset"])
    assert result["rows"] == 0 and len(result["files"]) == 1
    assert sorted(p.name for p in (tmp_path / "gate").glob("part-*")) == ["part-00000.parquet"]
    assert pl.read_parquet(result["files"]).columns[:2] == ["pair_id", "subset"]
    assert "gate" in (tmp_path / "gate" / "README.md").read_text()


def test_cli_arguments_map_onto_run(out, rows, tmp_path):
    parser = argparse.ArgumentParser()
    export.add_arguments(parser)
    subsets = sorted({r["subset"] for r in rows})
    args = vars(parser.parse_args([str(out), "--format", "contrastive", "--out", str(tmp_path / "x"),
                                   "--subset", subsets[0], "--subset", *subsets[1:], "--need-reasoning", "false",
                                   "--rationale-mode", "column", "--jsonl"]))
    assert args["subsets"] == subsets and args["need_reasoning"] is False and args["fmt"] == "contrastive"
    result = export.run(**args)
    assert result["files"][0].endswith(".jsonl")
    assert result["rows"] == sum(1 for r in rows if not r["need_reasoning"])
    with pytest.raises(SystemExit):
        parser.parse_args([str(out), "--format", "gate", "--out", "x", "--need-reasoning", "maybe"])


def test_format_docs_cover_every_format():
    docs = export.format_docs()
    for fmt in export.FORMATS:
        assert f"{fmt}:" in docs
    assert docs.count("load_dataset(") >= 2 and "DPOTrainer" in docs and repr(export.RATIONALE_SEPARATOR) in docs
