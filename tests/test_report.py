"""pairsel report: the numbers behind the figures equal values computed independently with pyarrow, and
the html embeds every figure. Set PAIRSEL_TEST_OUTPUT=OUT to check a real output folder too."""
import base64
import io
import json
import re
from collections import Counter

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import read_output, report, report_figures, report_numbers
from stages.files import file_sha256
from tests.synthetic_output import make_output, output_for


@pytest.fixture(scope="module", params=["synthetic", "demo_job"])
def out(request, tmp_path_factory):
    return output_for(request, tmp_path_factory)


@pytest.fixture(scope="module")
def numbers(out):
    return report.run(str(out))


def _rows(out):
    return pq.read_table(read_output.data_files(out)).to_pylist()


def test_pairs_and_need_reasoning_per_subset(out, numbers):
    table = pq.read_table(read_output.data_files(out), columns=["subset", "need_reasoning"])
    rows = table.to_pylist()
    expected_pairs = Counter(r["subset"] for r in rows)
    expected_rate = {s: sum(r["need_reasoning"] is True for r in rows if r["subset"] == s) / n
                     for s, n in expected_pairs.items()}
    assert numbers["pairs_per_subset"] == dict(expected_pairs)
    assert numbers["pairs"] == table.num_rows
    assert numbers["need_reasoning_rate"] == pytest.approx(expected_rate)
    assert numbers["need_reasoning_overall"] == pytest.approx((pc.sum(table["need_reasoning"]).as_py() or 0) / table.num_rows)


def test_three_outcomes_per_subset(out, numbers):
    """reason / direct / undecided counted apart, and the pairs the control turned from reason to direct,
    worked out here from the candidates and provenance alone."""
    rows = _rows(out)
    for subset, n in numbers["pairs_per_subset"].items():
        mine = [r for r in rows if r["subset"] == subset]
        o = numbers["outcomes_per_subset"][subset]
        eps = mine[0]["provenance"]["epsilon"]
        valid = [[c for c in r["candidates"] if c["valid"]] for r in mine]
        assert o["undecided"] == sum(not v for v in valid) == sum(r["need_reasoning"] is None for r in mine)
        assert o["need_reasoning"] == sum(r["decision"] == "reason" for r in mine)
        assert o["direct"] == sum(bool(v) and r["need_reasoning"] is False for r, v in zip(mine, valid))
        assert o["need_reasoning"] + o["direct"] + o["undecided"] == o["pairs"] == n
        assert o["control_turned_direct"] == sum(
            r["decision"] == "direct" and any(eps < c["delta"] <= r["base_threshold"] for c in v) and
            r["best_delta"] <= r["base_threshold"] for r, v in zip(mine, valid))
        assert o["null_turned_direct"] == sum(r["decision"] == "direct" and r["best_delta"] is not None
                                              and r["best_delta"] > r["base_threshold"] for r in mine)
        for key in ("need_reasoning", "direct", "undecided"):
            assert o[f"{key}_rate"] == pytest.approx(o[key] / n)
    manifest = read_output.read_manifest(out)
    if manifest:  # the manifest counts what the report counts
        for subset, o in numbers["outcomes_per_subset"].items():
            for key in ("need_reasoning", "direct", "undecided", "control_turned_direct", "null_turned_direct"):
                assert manifest["subsets"][subset][key] == o[key], (subset, key)


def test_best_delta_histogram_counts_every_pair_with_a_best_delta(out, numbers):
    h = numbers["best_delta_histogram"]
    rows = _rows(out)
    for subset in numbers["pairs_per_subset"]:
        best = [r["best_delta"] for r in rows if r["subset"] == subset and r["best_delta"] is not None]
        assert sum(h["counts"][subset]) == len(best)
        if best:
            assert h["edges"][0] <= min(best) and max(best) <= h["edges"][-1] + 1e-12
    if h["edges"]:
        assert h["edges"][0] <= h["marker"] <= h["edges"][-1]  # epsilon is on the axis


def test_percentages_are_written_one_way(out, numbers):
    page = (out / "report.html").read_text()
    for subset, o in numbers["outcomes_per_subset"].items():
        assert f"<td>{o['undecided']} ({report_numbers.percent(o['undecided_rate'])})</td>" in page
    assert report_numbers.percent(0.5) == "50.0%" and report_numbers.percent(None) == "n/a"
    body = page.split("</style>", 1)[1]
    for text in (body, report.summary_text(numbers)):
        shares = re.findall(r"[\d.,]+%", text)
        assert shares and all(re.fullmatch(r"\d+\.\d%", x) for x in shares), shares


def test_distributions_per_subset(out, numbers):
    by_subset = {}
    for r in _rows(out):
        by_subset.setdefault(r["subset"], []).append(r)
    for subset, rows in by_subset.items():
        for key in ("best_delta", "s_direct"):
            values = np.array([r[key] for r in rows if r[key] is not None])
            stats = numbers[key][subset]
            assert stats["n"] == len(values)
            assert stats["null"] == len(rows) - len(values)
            if len(values):
                q1, med, q3 = np.quantile(values, [0.25, 0.5, 0.75])
                assert (stats["q1"], stats["median"], stats["q3"]) == pytest.approx((q1, med, q3))
                assert (stats["min"], stats["max"]) == pytest.approx((values.min(), values.max()))
            else:
                assert stats["median"] is None


def test_generators_tokens_and_chosen_share(out, numbers):
    rows = _rows(out)
    tokens, candidates = Counter(), Counter()
    for r in rows:
        for c in r["candidates"]:
            tokens[c["generator"]] += c["tokens"] or 0
            candidates[c["generator"]] += 1
    assert numbers["tokens_per_generator"] == dict(tokens)
    assert {g: v["candidates"] for g, v in numbers["candidates_per_generator"].items()} == dict(candidates)
    chosen = Counter(r["chosen_generator"] for r in rows if r["need_reasoning"])
    assert numbers["chosen_count"] == dict(chosen)
    assert numbers["chosen_share"] == pytest.approx({g: n / sum(chosen.values()) for g, n in chosen.items()})
    assert sum(numbers["chosen_share"].values()) == pytest.approx(1.0)


def test_quarantine_and_provenance(out, numbers):
    files = read_output.quarantine_files(out)
    reasons = Counter(pq.read_table(files, columns=["reason"])["reason"].to_pylist()) if files else Counter()
    assert numbers["quarantine_by_reason"] == dict(reasons)
    manifest = read_output.read_manifest(out)
    prov = numbers["provenance"]
    hashes = sorted(set(pc.struct_field(pq.read_table(read_output.data_files(out))["provenance"], "config_hash").to_pylist()))
    assert prov["config_hashes_in_data"] == hashes
    if manifest:
        assert prov["config_hash"] == manifest["config_hash"]
        assert set(prov["generators"]) == set(manifest["generators"])


def test_delta_vs_length_uses_every_scored_candidate_below_the_cap(out, numbers):
    scored = [c for r in _rows(out) for c in r["candidates"] if c["delta"] is not None]
    d = numbers["delta_vs_length"]
    assert d["n_scored"] == len(scored)
    if len(scored) <= report_numbers.DEFAULT_MAX_POINTS:
        assert d["n_sampled"] == len(scored)
        assert sorted(d["delta"]) == pytest.approx(sorted(c["delta"] for c in scored))
        # valid and invalid candidates are told apart in the figure
        assert sorted(zip(d["delta"], d["valid"])) == sorted((c["delta"], c["valid"]) for c in scored)
        assert d["n_sampled_valid"] == sum(c["valid"] for c in scored)


def test_delta_vs_length_sample_is_capped_and_seeded(out):
    a = report_numbers.compute(str(out), max_points=40)["delta_vs_length"]
    b = report_numbers.compute(str(out), max_points=40)["delta_vs_length"]
    assert 0 < a["n_sampled"] <= 40
    assert a["delta"] == b["delta"]  # same seed, same sample
    scored = {c["delta"] for r in _rows(out) for c in r["candidates"] if c["delta"] is not None}
    assert set(a["delta"]) <= scored


def test_html_embeds_every_figure(out, numbers):
    page = (out / "report.html").read_text()
    assert numbers["html"] == str(out / "report.html")
    uris = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(uris) == len(report_figures.FIGURES) == len(numbers["figures"])
    for uri in uris:
        image = Image.open(io.BytesIO(base64.b64decode(uri)))
        assert image.format == "PNG" and image.width >= 600 and image.height >= 200
    assert not re.search(r'(src|href)="(?!data:)', page)  # stands alone: nothing to fetch
    for subset in numbers["pairs_per_subset"]:
        assert f"<td>{subset}</td>" in page


def test_summary_is_printed(out, capsys):
    n = report.run(str(out))
    printed = capsys.readouterr().out
    assert f"{n['pairs']:,} pairs" in printed and "report.html" in printed


def test_subset_without_valid_candidates_has_no_best_delta(tmp_path):
    make_output(tmp_path, n_pairs=12, no_valid_subset="captions")
    n = report.run(str(tmp_path))
    assert n["best_delta"]["captions"]["n"] == 0
    assert n["best_delta"]["captions"]["null"] == n["pairs_per_subset"]["captions"] == 4
    assert n["need_reasoning_rate"]["captions"] == 0.0
    # undecided, not direct: reasoning was never tested there
    assert n["outcomes_per_subset"]["captions"]["undecided"] == 4 and n["outcomes_per_subset"]["captions"]["direct"] == 0
    assert sum(n["best_delta_histogram"]["counts"]["captions"]) == 0


def test_one_subset_no_quarantine_no_manifest(tmp_path, capsys):
    make_output(tmp_path, n_pairs=10, subsets=("vqa",), n_quarantined=0, no_valid_subset=None)
    (tmp_path / "manifest.json").unlink()
    assert not (tmp_path / "quarantine").exists()
    n = report.run(str(tmp_path))
    assert n["pairs_per_subset"] == {"vqa": 10}
    assert n["quarantine_by_reason"] == {}
    assert n["provenance"]["manifest"] is False
    assert "no manifest.json" in capsys.readouterr().out
    assert (tmp_path / "report.html").read_text().count("data:image/png;base64,") == len(report_figures.FIGURES)


def test_nothing_chosen_anywhere(tmp_path):
    make_output(tmp_path, n_pairs=6, subsets=("captions",), no_valid_subset="captions")
    n = report.run(str(tmp_path))
    assert n["chosen_share"] == {} and n["delta_vs_length"]["n_sampled"] == n["delta_vs_length"]["n_scored"]


def test_missing_output_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no output shards"):
        report.run(str(tmp_path))


def test_add_arguments_match_run(tmp_path):
    import argparse

    make_output(tmp_path, n_pairs=6)
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    n = report.run(**vars(parser.parse_args([str(tmp_path), "--max-points", "5"])))
    assert n["delta_vs_length"]["n_sampled"] <= 5


def test_shards_of_another_schema_version_are_refused_plainly(tmp_path):
    from pipeline import export
    from schemas import SCHEMA_VERSION

    make_output(tmp_path, n_pairs=6)
    shard = read_output.data_files(tmp_path)[0]
    table = pq.read_table(shard)
    pq.write_table(table.replace_schema_metadata({b"pairsel.schema_version": b"1"}), shard)
    manifest = json.loads((tmp_path / "manifest.json").read_text())  # as an older pairsel wrote it: whole
    for entry in manifest["shards"]:
        if tmp_path / entry["path"] == shard:
            entry["sha256"] = file_sha256(shard)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    for call in (lambda: report.run(str(tmp_path)), lambda: export.run(str(tmp_path), "gate", str(tmp_path / "g"))):
        with pytest.raises(SystemExit, match=f"schema version 1; this pairsel reads version {SCHEMA_VERSION}"):
            call()
