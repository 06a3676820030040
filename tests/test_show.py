"""pairsel show: the right pair, its markers and its decision line; unknown ids fail with status 1.
Set PAIRSEL_TEST_OUTPUT=OUT to check a real output folder too."""
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from rich.console import Console

from pipeline import show
from pipeline.read_output import data_files
from tests.synthetic_output import make_output, output_for

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", params=["synthetic", "demo_job"])
def out(request, tmp_path_factory):
    return output_for(request, tmp_path_factory)


@pytest.fixture(scope="module")
def rows(out):
    return pq.read_table(data_files(out)).to_pylist()


def _render(out, pair_id) -> str:
    console = Console(record=True, width=100)
    show.run(str(out), pair_id, console=console)
    return console.export_text()


def _table_line(text: str, marker: str) -> str:
    """The rationale-table line carrying `marker` (table rows start with the box character)."""
    lines = [line for line in text.splitlines() if marker in line and line.startswith("│")]
    assert lines, f"no table row marked {marker!r}"
    return lines[0]


def test_shows_the_pair_with_its_chosen_marker(out, rows):
    row = next(r for r in rows if r["need_reasoning"])
    text = _render(out, row["pair_id"])
    assert row["pair_id"] in text and f"subset {row['subset']}" in text
    first_query_line = row["query_text"].splitlines()[-1]
    assert first_query_line[:60] in text
    chosen_line = _table_line(text, show.MARK_CHOSEN)
    cells = [c.strip() for c in chosen_line.strip("│").split("│")]
    assert cells[0] == str(row["chosen"])
    assert cells[1] == row["candidates"][row["chosen"]]["generator"]
    assert f"decision: chosen #{row['chosen']} (delta +" in text and "-> reason, need_reasoning" in text
    assert text.count(show.MARK_CHOSEN) == 2  # in the table and above its text
    # every other pair is absent
    other = next(r for r in rows if r["pair_id"] != row["pair_id"])
    assert other["pair_id"] not in text


def test_rejected_and_invalid_markers(out, rows):
    row = next((r for r in rows if r["rejected"] and any(not c["valid"] for c in r["candidates"])), None)
    if row is None:
        pytest.skip("no pair with both rejected and invalid candidates")
    text = _render(out, row["pair_id"])
    assert text.count(show.MARK_REJECTED) == 2 * len(row["rejected"])
    assert text.count(show.MARK_INVALID) == 2 * sum(not c["valid"] for c in row["candidates"])


def test_decision_when_no_rationale_beats_epsilon(tmp_path):
    make_output(tmp_path, n_pairs=6, epsilon=1.0)  # no delta gets near 1.0
    row = next(r for r in pq.read_table(data_files(tmp_path)).to_pylist() if r["chosen"] is not None)
    text = _render(tmp_path, row["pair_id"])
    assert "no rationale beat epsilon: best delta" in text and "<= 1 " in text
    assert show.MARK_CHOSEN in text  # the best one is still marked


def test_decision_without_valid_candidates(tmp_path):
    make_output(tmp_path, n_pairs=6, no_valid_subset="captions")
    text = _render(tmp_path, "captions-00002")
    assert "no valid rationale among 4 candidates" in text
    decision = " ".join(text.split("decision:")[-1].split())
    assert "-> undecided: reasoning was not tested" in decision and "direct" not in decision
    assert show.MARK_CHOSEN not in text


def test_pair_the_control_turned_direct(tmp_path):
    make_output(tmp_path, n_pairs=48)
    rows = pq.read_table(data_files(tmp_path)).to_pylist()
    row = next(r for r in rows if r["decision"] == "direct" and r["best_delta"] > 0)  # beat q, not the control
    text = _render(tmp_path, row["pair_id"])
    assert "no rationale beat the content-free control" in text and "-> direct, no reasoning" in text
    assert "content-free controls" in text and f"{row['s_control'][0]:+.4f}" in text
    chosen_line = _table_line(text, show.MARK_CHOSEN)  # the best one is still marked, with its delta_control
    assert f"{row['candidates'][row['chosen']]['delta_control']:+.4f}" in chosen_line


def test_pair_aware_shows_lse(tmp_path):
    make_output(tmp_path, n_pairs=6, scoring_mode="pair_aware")
    row = pq.read_table(data_files(tmp_path)).to_pylist()[0]
    text = _render(tmp_path, row["pair_id"])
    assert "scoring pair_aware" in text and "lse_direct" in text
    assert f"{row['lse_direct']:+.4f}" in text


def test_unknown_pair_is_an_error(out):
    with pytest.raises(show.PairNotFound, match="not found") as err:
        show.run(str(out), "no-such-pair-id")
    assert isinstance(err.value, SystemExit) and err.value.code  # a non-zero exit


def test_quarantined_pair_says_why(tmp_path):
    make_output(tmp_path, n_pairs=6, n_quarantined=1)
    with pytest.raises(show.PairNotFound, match="quarantined \\(image_missing"):
        show.run(str(tmp_path), "vqa-q000")


def test_unknown_pair_exits_non_zero_in_a_process(tmp_path):
    make_output(tmp_path, n_pairs=6)
    code = f"from pipeline import show; show.run({str(tmp_path)!r}, 'nope')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "pair 'nope' not found" in proc.stderr and "Traceback" not in proc.stderr
