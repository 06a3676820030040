"""Labels measured with a real embedder (all-MiniLM-L6-v2) on constructed pairs whose right answer is known
(tests/constructed_pairs.py): hard pairs (the plain query ranks a hard negative first, the evidence rationale
fixes it) and easy ones (the plain query is already right), each with and without an evidence-bearing candidate.
The rationales go in through the precomputed generator, and the job's own stages label them with the shipped
rule (configs/demo.yaml's scoring: pair-aware, the content-free controls, the decoy rule at fdr 0.1), through
pipeline/plan.py:run_local.

What is measured: candidates without content (misleading, off-topic, format-only, restatement) make at most 5% of
pairs reason, on hard and easy pairs, in both modes; in pair-aware mode at least 95% of the hard pairs with an
evidence candidate are reason (72/75 with the shipped seed, 70 to 74 of 75 over eight decoy draws: README), and
the evidence is what at least 95% of them choose; calibrated as one group, pairs with and without evidence (hard
ones, or all four sets) keep the rate and much of the evidence, hard and easy; the fixed rule
(scoring.decision.rule bar) on the same scores labels a share of the content-free pairs reason; every label
recomputes from the stored columns; with every text worded another way, filler stays under 5% in both modes.
"""
import copy

import pytest

from pipeline.plan import label_job
from stages.calibrate import calibrate, row_scores
from stages.score import score_rows as score_deltas
from stages.select import REASON, help_threshold, null_score, score_rows, select_rows
from tests.constructed_pairs import WORDINGS, build, minilm_embed, run_job, write

HARD, EASY = "hard", "easy"


def written(root, sets: dict, model: str, wording=WORDINGS["plain"]) -> dict:
    """The sets written as the job's input under root (tests/constructed_pairs.py:write), with what job() needs."""
    assert len(sets[HARD]) >= 60 and len(sets[EASY]) >= 60
    return {**write(root / "data", sets, wording), "root": root, "model": model, "sets": sets}


@pytest.fixture(scope="module")
def world(constructed_sets, tmp_path_factory):
    return written(tmp_path_factory.mktemp("labels-world"), constructed_sets["sets"], constructed_sets["model"])


def job(world, mode: str, *overrides: str, baseline: bool = False):
    cfg, rows = run_job(world, world["root"], mode, overrides, baseline)
    assert not [r for r in rows if r.get("quarantine_reason")]
    return cfg, rows


@pytest.fixture(scope="module")
def pair_aware(world):
    return job(world, "pair_aware")


@pytest.fixture(scope="module")
def cosine(world, pair_aware):  # after pair_aware: every input comes back from the embedding cache
    return job(world, "cosine")


def subset(rows, name: str) -> list[dict]:
    return [r for r in rows if r["subset"] == name]


def reason_rate(rows, name: str) -> float:
    return sum(r["decision"] == REASON for r in subset(rows, name)) / len(subset(rows, name))


def kind(world, row, k) -> str:
    return world["kinds"][row["pair_id"]][k]


@pytest.mark.parametrize("mode", ["pair_aware", "cosine"])
def test_content_free_candidates_rarely_make_a_pair_reason(mode, request):
    rows = request.getfixturevalue(mode)[1]
    for name in (HARD, EASY):
        assert reason_rate(rows, f"{name}_content_free") <= 0.05, (mode, name)


def test_the_fixed_rule_passes_filler_for_reasoning_on_the_same_scores(pair_aware):
    bar = select_rows(copy.deepcopy(pair_aware[1]), 0.0)  # the controls' bar alone, on the stored scores
    assert reason_rate(bar, "hard_content_free") > 0.1


def test_evidence_is_found_on_hard_pairs_in_pair_aware_mode(world, pair_aware):
    rows = subset(pair_aware[1], "hard_evidence")
    reason = [r for r in rows if r["decision"] == REASON]
    assert len(reason) >= 0.95 * len(rows)  # 72/75 when this was written; the README has the table
    assert sum(kind(world, r, r["chosen"]) == "evidence" for r in reason) >= 0.95 * len(reason)
    misleading = [c["delta"] for r in rows for k, c in enumerate(r["candidates"]) if kind(world, r, k) == "misleading"]
    assert sorted(misleading)[int(0.9 * len(misleading))] < 0  # pointing at the hard negative hurts


def one_group(pair_aware, subsets) -> list[dict]:
    """The pair-aware job's pairs of these subsets, relabelled as one calibration group (scoring.decision.group
    job)."""
    cfg, rows = pair_aware
    rows = [copy.deepcopy(r) for r in rows if r["subset"] in subsets]
    cfg = copy.deepcopy(cfg)
    cfg.scoring.decision.group = "job"
    label_job(cfg, rows)
    return rows


def test_one_group_of_mixed_pairs_keeps_the_rate(world, pair_aware):
    """The hard pairs with and without evidence calibrated as one group: the share of reason labels on
    content-free pairs stays under the rate, and a reason label names the evidence. Decoys written for other
    targets move these pairs' scores far more than their own content-free candidates do, so the content-free pairs
    lose their competitions by wide margins and the rule errs on the safe side; measured in shares of each pair's
    headroom, those losses stay below much of the evidence (40 of 75 with the shipped seed, 31 to 41 over eight
    draws, where leads in delta's units labelled 0 to 34: README, a mixed group)."""
    rows = one_group(pair_aware, ("hard_evidence", "hard_content_free"))
    reason = [r for r in rows if r["decision"] == REASON]
    false = [r for r in reason if r["subset"] == "hard_content_free"]
    assert len(false) <= 0.05 * len(reason)
    assert len(reason) >= 0.4 * len(subset(rows, "hard_evidence"))
    assert all(kind(world, r, r["chosen"]) == "evidence" for r in reason)
    pure = [r for r in subset(pair_aware[1], "hard_evidence") if r["decision"] == REASON]
    assert {r["pair_id"] for r in reason} <= {r["pair_id"] for r in pure}


def test_one_margin_serves_hard_and_easy_pairs(world, pair_aware):
    """All four sets as one group: the easy pairs' evidence gains hundredths of a unit of log p, the hard pairs'
    content-free candidates lose to their decoys by up to a unit, and in shares of each pair's headroom the easy
    evidence is still found (93 of 156 and 59 of 75 hard with the shipped seed; in delta's units none and 15)."""
    rows = one_group(pair_aware, ("hard_evidence", "hard_content_free", "easy_evidence", "easy_content_free"))
    reason = [r for r in rows if r["decision"] == REASON]
    assert sum(r["subset"].endswith("content_free") for r in reason) <= 0.05 * len(reason)
    for name, share in ((HARD, 0.5), (EASY, 0.4)):
        found = [r for r in reason if r["subset"] == f"{name}_evidence"]
        assert len(found) >= share * len(subset(rows, f"{name}_evidence")), name
        assert all(kind(world, r, r["chosen"]) == "evidence" for r in found)


def test_cosine_keeps_the_fixed_rules_evidence_at_a_higher_stated_rate(world, cosine):
    """Cosine mode sees only the positive's similarity: on hard pairs the evidence moves it little, so at the
    shipped 10% the rule labels a few fewer of them reason than the fixed rule it replaces; at a stated 20% it
    keeps most of what that rule found, and filler stays under the stated rate."""
    cfg, rows = cosine
    bar = job(world, "cosine", baseline=True)[1]  # the fixed rule it replaces (bench/baseline.yaml)
    cfg = copy.deepcopy(cfg)
    cfg.scoring.decision.fdr = 0.2
    relabelled = copy.deepcopy(rows)
    label_job(cfg, relabelled)
    assert (sum(r["decision"] == REASON for r in subset(relabelled, "hard_evidence"))
            >= 0.85 * sum(r["decision"] == REASON for r in subset(bar, "hard_evidence")))
    for name in (HARD, EASY):
        assert reason_rate(relabelled, f"{name}_content_free") <= 0.2


@pytest.fixture(scope="module")
def varied(constructed_sets, tmp_path_factory):
    """The same facts with every text worded another way (tests/constructed_pairs.py: WORDINGS["varied"]), and
    their labels in both modes."""
    wording, model = WORDINGS["varied"], constructed_sets["model"]
    world = written(tmp_path_factory.mktemp("labels-varied"), build(minilm_embed(model), wording), model, wording)
    return world, {mode: job(world, mode)[1] for mode in ("pair_aware", "cosine")}


def test_another_wording_keeps_filler_out_and_most_evidence(varied):
    """Other queries, evidence, restatements and longer filler: content-free candidates stay under 5% in both
    modes, and in pair-aware mode most hard pairs with evidence are reason, naming it. With the shipped seed
    96 of 101 (95%), over eight draws 94.1 (88 to 97): short of 95% on average, where other pairs' rationales beat
    the evidence (README: another wording)."""
    world, rows = varied
    for mode in ("pair_aware", "cosine"):
        for name in (HARD, EASY):
            assert reason_rate(rows[mode], f"{name}_content_free") <= 0.05, (mode, name)
    hard = subset(rows["pair_aware"], "hard_evidence")
    reason = [r for r in hard if r["decision"] == REASON]
    assert len(reason) >= 0.9 * len(hard)
    assert sum(kind(world, r, r["chosen"]) == "evidence" for r in reason) >= 0.95 * len(reason)


def headroom(row) -> float:
    """The most the pair's delta can be, from its stored columns (README: the decoy rule)."""
    if row["scoring_mode"] == "cosine":
        return 1 - row["s_direct"]
    return row["lse_direct"] - row["s_direct"] / row["temperature"]


@pytest.mark.parametrize("mode", ["pair_aware", "cosine"])
def test_every_label_recomputes_from_the_stored_columns(mode, request):
    cfg, rows = request.getfixturevalue(mode)
    for r in rows:
        assert (r["decision"] == REASON) == (r["best_delta"] > r["help_threshold"])
        decoys = [d["delta"] for d in r["decoys"]]
        assert len(decoys) == 5 and headroom(r) > 0
        assert r["null_score"] == pytest.approx(null_score(r["best_delta"], [max(decoys)], r["base_threshold"], 1.0)
                                                / headroom(r), rel=1e-9, abs=1e-12)
        assert r["help_threshold"] == help_threshold(r["base_threshold"], decoys, r["null_margin"])
    margins = {c["group"]: c["margin"] for c in calibrate(row_scores(rows, "subset"), cfg.scoring.decision.fdr, 0.5)}
    for r in rows:
        margin = margins[r["subset"]]
        assert r["null_margin"] == (float("inf") if margin is None else pytest.approx(margin * headroom(r), rel=1e-9))
    fresh = copy.deepcopy(rows)
    for r in fresh:
        for d in r["decoys"]:
            d["delta"] = None
        for c in r["candidates"]:
            c["delta"] = None
    score_deltas(fresh, cfg.scoring.mode, cfg.scoring.temperature)
    score_rows(fresh, cfg.scoring.epsilon, {"query": 5})
    label_job(cfg, fresh)
    assert fresh == rows
