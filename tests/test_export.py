"""pairsel export: every format loads with datasets, polars and a torch DataLoader, and holds exactly the
rows expected from the source shards. Set PAIRSEL_TEST_OUTPUT=OUT to check a real output folder too."""
import argparse

import datasets
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch.utils.data

from pipeline import export, export_formats
from pipeline.config import ConfigError
from pipeline.read_output import data_files
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


def helps(row: dict, cand: dict) -> bool:
    """The rule, written out here from the stored scores: valid, delta > epsilon, and with controls also
    delta_control > epsilon."""
    eps = row["provenance"]["epsilon"]
    return (cand["valid"] and cand["delta"] > eps
            and (not row["s_control"] or (cand["delta_control"] is not None and cand["delta_control"] > eps)))


def expected_preference(rows, subsets=None, min_delta=None, need_reasoning=None, min_gap=0.0,
                        text_only=False) -> dict:
    """{(pair_id, chosen, rejected): (chosen text, rejected text)}: a chosen rationale that helps, a rejected
    one that does not (valid, delta <= 0), worked out from the candidates."""
    out = {}
    for r in rows:
        if subsets and r["subset"] not in subsets:
            continue
        if min_delta is not None and (r["best_delta"] is None or r["best_delta"] < min_delta):
            continue
        if need_reasoning is not None and r["need_reasoning"] != need_reasoning:
            continue
        if r["chosen"] is None or (text_only and r["query_image_path"]):
            continue
        best = r["candidates"][r["chosen"]]
        if not helps(r, best):
            continue
        for k, c in enumerate(r["candidates"]):
            if k != r["chosen"] and c["valid"] and c["delta"] <= 0 and best["delta"] - c["delta"] >= min_gap:
                out[(r["pair_id"], r["chosen"], k)] = (best["text"], c["text"])
    return out


def _content_text(messages) -> str:
    content = messages[0]["content"]
    if isinstance(content, str):
        return content
    return " ".join(part["text"] for part in content if part["type"] == "text")


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
        assert r["delta_chosen"] > src["provenance"]["epsilon"] >= 0.0 >= r["delta_rejected"]
        assert isinstance(r["prompt"][0]["content"], list)  # this export has images: every row in parts
        kinds = [part["type"] for part in r["prompt"][0]["content"]]
        if src["query_image_path"]:
            assert kinds.count("image") == 1 and r["images"] == [src["query_image_path"]]
        else:
            assert "image" not in kinds and r["images"] == []
        query_words = src["query_text"].replace(export_formats.IMAGE_MARKER, " ").split()
        assert _content_text(r["prompt"]).split() == query_words
    assert result["pairs"] == len({k[0] for k in expected})


def test_no_preference_row_teaches_a_harmful_chosen(out, rows, tmp_path):
    """Every row's chosen rationale helps its pair (and beats the controls), every rejected one has delta <= 0;
    a minimum gap drops the rows closer than it."""
    result = export.run(str(out), "preference", str(tmp_path / "pref"))
    got = pl.read_parquet(result["files"])
    by_id = {r["pair_id"]: r for r in rows}
    assert got.height > 0
    for r in got.iter_rows(named=True):
        src = by_id[r["pair_id"]]
        assert src["decision"] == "reason" and helps(src, src["candidates"][r["chosen_index"]])
        assert r["delta_rejected"] <= 0.0
    gap = float(got.select((pl.col("delta_chosen") - pl.col("delta_rejected")).median()).item())
    result = export.run(str(out), "preference", str(tmp_path / "gap"), min_gap=gap)
    gapped = load_everywhere(result, tmp_path)
    assert {(r["pair_id"], r["chosen_index"], r["rejected_index"]) for r in gapped} == set(
        expected_preference(rows, min_gap=gap))
    assert 0 < len(gapped) < got.height


@pytest.mark.parametrize("style", ["conversational", "standard"])
def test_text_only_preference_export_has_no_images_column(out, rows, tmp_path, style):
    expected = expected_preference(rows, text_only=True)
    if not expected:
        pytest.skip("no text-only query with a preference pair in this output (the synthetic one has them)")
    result = export.run(str(out), "preference", str(tmp_path / "pref"), text_only=True, preference_style=style)
    got = load_everywhere(result, tmp_path)
    assert len(got) == len(expected) > 0
    assert {(r["pair_id"], r["chosen_index"], r["rejected_index"]) for r in got} == set(expected)
    assert "images" not in pl.read_parquet(result["files"]).columns  # TRL would take the dataset for a vision one
    for r in got:
        chosen_text, rejected_text = expected[(r["pair_id"], r["chosen_index"], r["rejected_index"])]
        query = next(x["query_text"] for x in rows if x["pair_id"] == r["pair_id"])
        if style == "conversational":
            # plain string content: string-only chat templates (ChatML, Qwen2.5) render it
            assert r["prompt"] == [{"role": "user", "content": query}]
            assert r["chosen"] == [{"role": "assistant", "content": chosen_text}]
            assert r["rejected"] == [{"role": "assistant", "content": rejected_text}]
        else:
            # prompt + completion reads apart, as the embedder saw it: "QUERY\nReasoning: RATIONALE"
            assert r["prompt"] == query + export_formats.STANDARD_PROMPT_END and r["prompt"].endswith("\nReasoning: ")
            assert (r["chosen"], r["rejected"]) == (chosen_text, rejected_text)


def test_an_export_without_images_drops_the_column_by_itself(out, rows, tmp_path):
    text_subsets = sorted({r["subset"] for r in rows} - {r["subset"] for r in rows if r["query_image_path"]})
    if not expected_preference(rows, subsets=text_subsets):
        pytest.skip("no text-only subset with a preference pair in this output (the synthetic one has one)")
    result = export.run(str(out), "preference", str(tmp_path / "pref"), subsets=text_subsets)
    assert result["rows"] > 0 and "images" not in pl.read_parquet(result["files"]).columns
    assert isinstance(pl.read_parquet(result["files"])["prompt"][0][0]["content"], str)


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
        assert r["subset"] in subsets
        assert isinstance(r["prompt"], str) and r["prompt"].endswith(export_formats.STANDARD_PROMPT_END)
        assert (export_formats.IMAGE_MARKER in r["prompt"]) == bool(r.get("images"))


def _expected_contrastive(src: dict, mode: str) -> dict:
    explicit = [n for n in src["negatives"] if n["origin"] == "explicit"]
    rationale = src["candidates"][src["chosen"]]["text"] if src["decision"] == "reason" else None
    qry = src["query_text"] or ""
    if mode == "append" and rationale is not None:
        qry = qry + export_formats.RATIONALE_SEPARATOR + rationale
    row = {"qry": qry, "qry_image_path": src["query_image_path"] or "", "pos_text": src["target_text"] or "",
           "pos_image_path": src["target_image_path"] or "",
           "neg_text": (explicit[0]["text"] or "") if explicit else "",
           "neg_image_path": (explicit[0]["image_path"] or "") if explicit else "",
           "pair_id": src["pair_id"], "subset": src["subset"], "decision": src["decision"],
           "need_reasoning": src["need_reasoning"]}
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


@pytest.mark.parametrize("need", [True, False, None])
def test_gate(out, rows, tmp_path, need):
    result = export.run(str(out), "gate", str(tmp_path / "gate"), need_reasoning=need)
    got = load_everywhere(result, tmp_path)
    # undecided pairs (need_reasoning null) are left out by default: their label was never tested
    by_id = {r["pair_id"]: r for r in rows if r["decision"] != "undecided" and need in (None, r["need_reasoning"])}
    assert sorted(r["pair_id"] for r in got) == sorted(by_id)
    for r in got:
        src = by_id[r["pair_id"]]
        for col in ("decision", "need_reasoning", "best_delta", "s_direct"):
            assert r[col] == src[col]
        # missing text or image is "", as in the contrastive export
        for col in ("query_text", "query_image_path", "target_text", "target_image_path"):
            assert r[col] == (src[col] or "")


def test_gate_includes_undecided_only_when_asked(out, rows, tmp_path):
    undecided = {r["pair_id"] for r in rows if r["decision"] == "undecided"}
    result = export.run(str(out), "gate", str(tmp_path / "gate"), include_undecided=True)
    got = load_everywhere(result, tmp_path)
    assert sorted(r["pair_id"] for r in got) == sorted(r["pair_id"] for r in rows)
    for r in got:
        if r["pair_id"] in undecided:
            assert r["decision"] == "undecided" and r["need_reasoning"] is None and r["best_delta"] is None
        else:
            assert r["need_reasoning"] == (r["decision"] == "reason")


def test_parts_and_empty_results(tmp_path):
    make_output(tmp_path / "out", n_pairs=48, rows_per_shard=8)
    result = export.run(str(tmp_path / "out"), "gate", str(tmp_path / "gate"), rows_per_part=16,
                        include_undecided=True)
    assert len(result["files"]) == 3 and result["rows"] == 48
    load_everywhere(result, tmp_path)
    # a filter that keeps nothing still leaves one (empty) file with the schema, for polars and pyarrow
    # (datasets refuses to build a split of 0 rows), and replaces the earlier parts
    result = export.run(str(tmp_path / "out"), "gate", str(tmp_path / "gate"), min_delta=1e9)
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
    assert result["rows"] == sum(1 for r in rows if r["need_reasoning"] is False)
    args = vars(parser.parse_args([str(out), "--format", "preference", "--out", str(tmp_path / "p"), "--text-only",
                                   "--min-gap", "0.01", "--preference-style", "standard"]))
    assert (args["text_only"], args["min_gap"], args["include_undecided"]) == (True, 0.01, False)
    assert export.run(**args)["rows"] == len(expected_preference(rows, text_only=True, min_gap=0.01))
    args = vars(parser.parse_args([str(out), "--format", "gate", "--out", str(tmp_path / "g"), "--include-undecided"]))
    assert export.run(**args)["rows"] == len(rows)
    with pytest.raises(SystemExit):
        parser.parse_args([str(out), "--format", "gate", "--out", "x", "--need-reasoning", "maybe"])


def test_unknown_subset_is_a_user_error(out, rows, tmp_path):
    known = sorted({r["subset"] for r in rows})
    with pytest.raises(ConfigError, match="no subset 'nosuch'") as err:
        export.run(str(out), "gate", str(tmp_path / "gate"), subsets=[known[0], "nosuch"])
    assert ", ".join(known) in str(err.value)
    assert not list((tmp_path / "gate").glob("part-*"))  # nothing written


def test_unknown_subset_exits_2_with_one_line(out, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run([sys.executable, "-m", "pipeline", "export", str(out), "--format", "gate", "--out",
                           str(tmp_path / "x"), "--subset", "nosuch"], cwd=Path(__file__).resolve().parent.parent,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "nosuch" in lines[0] and "subsets are:" in lines[0] and "Traceback" not in proc.stderr


def test_format_docs_cover_every_format():
    docs = export_formats.format_docs()
    for fmt in export_formats.FORMATS:
        assert f"{fmt}:" in docs
    assert docs.count("load_dataset(") >= 2 and "DPOTrainer" in docs and repr(export_formats.RATIONALE_SEPARATOR) in docs
    assert "RewardTrainer" in docs and "undecided" in docs
