"""The decoy rule's parts against values worked out by hand, and its error rate on simulated pairs: the draw
(stages/decoys.py), the competition (stages/select.py) and the calibration (stages/calibrate.py)."""
import copy

import numpy as np
import pytest

from stages.calibrate import calibrate, knockoff_margin, margin_lookup, row_scores
from stages.decoys import DecoysSpec, check_whole_shards, decoy_counts, decoy_groups, draw_decoys
from stages.select import DIRECT, REASON, UNDECIDED, label_rows, null_score, score_rows

# a plain pair whose headroom (stages/score.py) is 1 in cosine mode: its null scores are in delta's units
PLAIN = {"scoring_mode": "cosine", "s_direct": 0.0, "lse_direct": 0.0, "temperature": 1.0}


def test_knockoff_margin_by_hand():
    # wins 5, 4, 3, 2, 1 (x5 each) and one loss at 2.5: at s=0 the estimate is (1+1)/25; fdr 0.1 takes it
    scores = [5.0, 4.0, 3.0, 2.0, 1.0] * 5 + [-2.5]
    out = knockoff_margin(scores, 0.1, 0.5)
    # the margin lies halfway to the next score (0.5 here), so that no score ties it
    assert out["margin"] == 0.5 and out["reason"] == 25 and out["fdr_estimate"] == pytest.approx(2 / 25)
    # fdr 0.05: above 2.5 the loss is gone, 15 wins are left: (1+0)/15 > 0.05; nothing qualifies
    assert knockoff_margin(scores, 0.05, 0.5)["margin"] is None
    # 25 wins and the loss: at s = 2.5, 15 wins (5, 4, 3) with no loss above: (1+0)/15 <= 0.07
    assert knockoff_margin(scores, 0.07, 0.5)["margin"] == 2.75
    # a chance above 1/2 scales the estimate: c/(1-c) = 2 doubles it
    assert knockoff_margin(scores, 0.1, 2 / 3)["margin"] is None


def test_a_group_without_enough_wins_labels_no_pair_reason():
    # 19 clean wins and no loss: (1+0)/19 > 0.05, the knockoff+ needs 1/fdr of them
    assert knockoff_margin([1.0] * 19, 0.05, 0.5)["margin"] is None
    assert knockoff_margin([1.0] * 20, 0.05, 0.5)["margin"] == 0.5


def _pair(rng, signal: float, k: int, d: int, base: float = 0.0) -> dict:
    """A scored pair whose candidates and decoys are draws of one null; candidate 0 is shifted by `signal`."""
    deltas = rng.normal(0, 1, k)
    deltas[0] += signal
    return {**PLAIN, "subset": "s",
            "candidates": [{"delta": float(x), "valid": True, "generator": "g"} for x in deltas],
            "decoys": [{"delta": float(x)} for x in rng.normal(0, 1, d)], "control_delta": [base]}


@pytest.mark.parametrize("k, d", [(4, 4), (5, 10), (3, 9)])
def test_the_false_discovery_rate_holds_on_exchangeable_nulls(k, d):
    """Half the pairs carry a signal in one candidate, half none; over many jobs the share of reason labels on
    null pairs among all reason labels stays under fdr (knockoff+), whatever the heavy tail of the null."""
    rng = np.random.default_rng(0)
    fdr, fdps, power = 0.1, [], []
    for _ in range(150):
        rows = [_pair(rng, 4.0 if i % 2 else 0.0, k, d) for i in range(80)]
        for r in rows:  # a heavy-tailed null: the same for candidates and decoys of a pair
            scale = rng.choice([0.2, 1.0, 3.0])
            for x in r["candidates"] + r["decoys"]:
                x["delta"] *= scale
            r["s_direct"] = rng.choice([0.5, 0.0, -1.0])  # headroom 0.5, 1 or 2, whatever the pair's null
        score_rows(rows, 0.0, {"query": d}, d // k)  # d // k decoy groups of k
        calibration = calibrate(row_scores(rows, "subset"), fdr, k / (k + d))
        label_rows(rows, 0.0, margin_lookup(calibration, "subset"), {"query": d})
        reason = [i for i, r in enumerate(rows) if r["decision"] == REASON]
        fdps.append(sum(i % 2 == 0 for i in reason) / max(1, len(reason)))
        power.append(sum(i % 2 == 1 for i in reason) / 40)
    assert np.mean(fdps) <= fdr
    # and it finds signal
    assert np.mean(power) > 0.3


def test_the_labels_agree_with_the_calibration_at_a_tie():
    """The group's margin falls where one pair's score ties it: 0.82 over a decoy at 0.067 scores
    0.82 - 0.067 = 0.7529999999999999, and 0.067 + that = 0.8199999999999998 < 0.82. A margin on the score would
    count that pair direct in the calibration and label it reason by best_delta > help_threshold."""
    b, m = 0.82, 0.067
    assert b > m + (b - m)  # the rounding the test is about

    def row(best, decoy):
        return {**PLAIN, "subset": "s", "control_delta": [0.0], "decoys": [{"delta": decoy}],
                "candidates": [{"delta": best, "valid": True, "generator": "g"}]}

    # the tie pair, its mirror (a decoy win of the same size) and 20 clear wins: at 0 the estimate is 2/21 > 0.05,
    # above the tie's size 1/20: the smallest qualifying score is the tie's
    rows = [row(b, m), row(m, b)] + [row(1.0, 0.0) for _ in range(20)]
    score_rows(rows, 0.0, {"query": 1})
    assert rows[0]["null_score"] == -rows[1]["null_score"] == b - m
    calibration = calibrate(row_scores(rows, "subset"), 0.05, 0.5)
    assert calibration[0]["reason"] == 20 and rows[0]["null_score"] < calibration[0]["margin"] < 1.0
    label_rows(rows, 0.0, margin_lookup(calibration, "subset"), {"query": 1})
    assert sum(r["decision"] == REASON for r in rows) == calibration[0]["reason"]
    assert all((r["best_delta"] > r["help_threshold"]) == (r["decision"] == REASON) for r in rows)


def test_help_threshold_decides_each_pair():
    rows = [{**PLAIN, "subset": "s", "control_delta": [0.1],
             "candidates": [{"delta": 0.5, "valid": True, "generator": "g"}, {"delta": 0.9, "valid": False,
                                                                              "generator": "g"}],
             "decoys": [{"delta": 0.3}, {"delta": 0.2}]}]
    score_rows(rows, 0.0, {"query": 2})
    row = rows[0]
    assert row["base_threshold"] == pytest.approx(0.1) and row["chosen"] == 0
    assert row["null_score"] == pytest.approx(0.5 - 0.3)  # beats both decoys, the best of them by 0.2
    for margin, decision in ((0.19, REASON), (0.2, DIRECT), (None, DIRECT)):
        label_rows([row], 0.0, lambda side, r: margin, {"query": 2})
        assert row["decision"] == decision and row["need_reasoning"] == (decision == REASON)
        assert (row["best_delta"] > row["help_threshold"]) == (decision == REASON)
    label_rows([row], 0.0, lambda side, r: 0.0, {"query": 2})
    assert row["help_threshold"] == pytest.approx(0.3)  # the best decoy, above the bar


def test_null_score_by_hand():
    assert null_score(0.3, [0.3], 0.0, 1.0) <= 0  # a decoy as good as the best candidate: never a win
    assert null_score(0.3, [0.1], 0.5, 1.0) == 0.0  # nothing clears the bar
    assert null_score(0.5, [0.3], 0.1, 1.0) == pytest.approx(0.2)  # a win by the gap to the best decoy
    assert null_score(0.5, [0.3], 0.4, 1.0) == pytest.approx(0.1)  # ... or to the bar, whichever is higher
    assert null_score(0.3, [0.32], 0.0, 1.0) == pytest.approx(-0.02)  # a loss by a hair costs a hair
    assert null_score(0.2, [0.9], 0.5, 1.0) == pytest.approx(-0.4)  # a decoy over a candidate under the bar
    # three decoy groups: a decoy group on top is measured against the runner-up group, candidates or decoys
    assert null_score(0.2, [0.9, 0.8, 0.1], 0.0, 1.0) == pytest.approx(-0.1)
    assert null_score(0.9, [0.5, 0.8, 0.1], 0.0, 1.0) == pytest.approx(0.1)
    # a share of the headroom: a lead of 0.2 where the pair could gain 0.4 at most
    assert null_score(0.5, [0.3], 0.1, 0.4) == pytest.approx(0.5)
    assert null_score(0.5, [0.3], 0.1, 0.0) == 0.0  # nothing to gain (a plain query at the ceiling)


def _scaled_pair(rng, signal: float, room: float, noise: float, k: int = 4) -> dict:
    """A pair whose plain query has headroom `room` (pair-aware: log p(t+ | q) = -room, one negative, τ 1) and whose
    candidates and decoys move its score by N(0, noise); candidate 0 gains `signal` more."""
    row = _pair(rng, 0.0, k, k)
    for x in row["candidates"] + row["decoys"]:
        x["delta"] *= noise
    row["candidates"][0]["delta"] += signal
    # log p = s - lse with lse = log(e^s + e^s_neg): s = 0, s_neg = log(e^room - 1) gives log p = -room
    return {**row, "scoring_mode": "pair_aware", "temperature": 1.0, "s_direct": 0.0,
            "lse_direct": room}


def test_one_margin_serves_hard_and_easy_pairs():
    """A group of hard pairs whose candidates carry nothing (units to gain, and any text moves them by about a
    unit) and easy ones whose evidence closes most of the little they can gain (a few hundredths): measured in
    shares of each pair's headroom, the easy pairs' leads stand out of the hard pairs' chance leads, where in
    delta's units the hard pairs' losses would set the margin above every easy pair."""
    rng = np.random.default_rng(1)
    hard = [_scaled_pair(rng, 0.0, 4.0, 1.0) for _ in range(40)]
    easy = [_scaled_pair(rng, 0.04, 0.05, 0.005) for _ in range(40)]
    rows = hard + easy
    score_rows(rows, 0.0, {"query": 4})
    calibration = calibrate(row_scores(rows, "subset"), 0.1, 0.5)
    label_rows(rows, 0.0, margin_lookup(calibration, "subset"), {"query": 4})
    reason_easy, reason_hard = (sum(r["decision"] == REASON for r in part) for part in (easy, hard))
    assert reason_easy >= 35 and reason_hard / (reason_easy + reason_hard) <= 0.15
    assert all((r["best_delta"] > r["help_threshold"]) == (r["decision"] == REASON) for r in rows)
    # the pair's margin in delta's units is the group's margin times its headroom
    margin = calibration[0]["margin"]
    assert all(r["null_margin"] == pytest.approx(margin * (4.0 if r in hard else 0.05)) for r in rows)
    # the same leads in delta's units (every headroom 1) label no easy pair
    flat = [{**r, "scoring_mode": "cosine", "s_direct": 0.0} for r in copy.deepcopy(rows)]
    score_rows(flat, 0.0, {"query": 4})
    label_rows(flat, 0.0, margin_lookup(calibrate(row_scores(flat, "subset"), 0.1, 0.5), "subset"), {"query": 4})
    assert sum(r["decision"] == REASON for r in flat[40:]) == 0


def test_a_second_good_rationale_does_not_cost_the_win():
    """Generators often write the decisive clue twice among K samples. The competition is between the candidates'
    best and the decoys' best, so the pair wins by its lead over the decoys, not by the gap between its two good
    rationales (the statistic with fewer decoys than slots, bench/labels.py --fewer-decoys, would score 0.02)."""
    row = {**PLAIN, "subset": "s", "control_delta": [0.0], "decoys": [{"delta": 0.3}, {"delta": 0.2}, {"delta": 0.1}],
           "candidates": [{"delta": x, "valid": True, "generator": "g"} for x in (0.88, 0.9, 0.1)]}
    score_rows([row], 0.0, {"query": 3})
    assert row["chosen"] == 1 and row["null_score"] == pytest.approx(0.9 - 0.3)
    label_rows([row], 0.0, lambda side, r: 0.5, {"query": 3})
    assert row["decision"] == REASON


def test_decoy_groups_mirror_the_candidates():
    # two generators with 2 and 1 slots, 2 groups: each group holds 2 of a's decoys' and 1 of b's
    decoys = [{"generator": g, "delta": x} for g, x in
              [("a", 0.1), ("a", 0.2), ("a", 0.3), ("a", 0.4), ("b", 0.5), ("b", 0.6)]]
    assert decoy_groups(decoys, 2) == [[0, 2, 4], [1, 3, 5]]
    assert decoy_groups(decoys, 1) == [[0, 1, 2, 3, 4, 5]]
    row = {**PLAIN, "subset": "s", "control_delta": [0.0], "decoys": decoys,
           "candidates": [{"delta": 0.55, "valid": True, "generator": "a"}]}
    score_rows([row], 0.0, {"query": 6}, 2)
    assert row["null_score"] == pytest.approx(-(0.6 - 0.55))  # group 2 (best 0.6) tops; the candidates run up


def test_short_decoys():
    row = {**PLAIN, "subset": "s", "control_delta": None,
           "candidates": [{"delta": 0.5, "valid": True, "generator": "g"}],
           "decoys": [{"delta": 0.1}]}
    score_rows([row], 0.0, {"query": 2})
    label_rows([row], 0.0, lambda side, r: 0.0, {"query": 2})
    assert row["decision"] == UNDECIDED and row["null_score"] is None  # too few decoys: untested


def _shard(n=6):
    rows = []
    for i in range(n):
        target = f"target {i % 3}"  # pairs i and i+3 share a target
        rows.append({"pair_id": f"p{i}", "subset": "a" if i < n - 1 else "b", "shard_id": 7, "shard_size": n,
                     "row_index": i, "quarantine_reason": None, "target_text": target, "target_image_path": None,
                     "target_image": None, "negatives": [{"text": "target 1", "image_path": None, "image": None}]
                     if i == 0 else [],
                     "candidates": [{"generator": g, "text": f"{g} says {i}.{k}", "finish_reason": "stop"}
                                    for g in ("g1", "g2") for k in range(2)]})
    return rows


def test_decoys_come_from_other_targets_of_the_same_shard_and_subset():
    rows = _shard()
    draw_decoys(rows, {"query": {"g1": 2, "g2": 1}}, seed=0)
    by_id = {r["pair_id"]: r for r in rows}
    for r in rows:
        donors = [by_id[d["donor_pair_id"]] for d in r["decoys"]]
        assert all(d["subset"] == r["subset"] and d["target_text"] != r["target_text"] for d in donors)
        assert all(d["text"] == by_id[d["donor_pair_id"]]["candidates"][d["donor_candidate"]]["text"] for d in r["decoys"])
        assert all(d["generator"] == by_id[d["donor_pair_id"]]["candidates"][d["donor_candidate"]]["generator"]
                   for d in r["decoys"])
    # p0's negative is p1's target: never a donor; p0 and p3 share a target
    assert {d["donor_pair_id"] for d in by_id["p0"]["decoys"]} <= {"p2", "p4"}
    assert [d["generator"] for d in by_id["p2"]["decoys"]] == ["g1", "g1", "g2"]
    assert by_id["p5"]["decoys"] == []  # alone in its subset
    again = _shard()
    draw_decoys(list(reversed(again)), {"query": {"g1": 2, "g2": 1}}, seed=0)
    assert [r["decoys"] for r in again] == [r["decoys"] for r in rows]  # a function of the shard, not of row order
    other = _shard()
    draw_decoys(other, {"query": {"g1": 2, "g2": 1}}, seed=1)
    assert [r["decoys"] for r in other] != [r["decoys"] for r in rows]


def test_the_decoy_stage_refuses_part_of_a_shard():
    rows = _shard()
    check_whole_shards(rows)
    with pytest.raises(RuntimeError, match="shard 7 arrived in part"):
        check_whole_shards(rows[:4])
    assert DecoysSpec(counts={"query": {"g1": 1}}).contract().writes == ("decoys",)


def test_decoy_counts_per_candidate_slot():
    gens = [{"name": "a", "k": 4, "k_target": 0}, {"name": "b", "k": 3, "k_target": 2}]
    assert decoy_counts(gens, 1.0) == {"query": {"a": 4, "b": 3}, "target": {"b": 2}}
    assert decoy_counts(gens, 2) == {"query": {"a": 8, "b": 6}, "target": {"b": 4}}


def test_scores_labels_and_calibration_recompute_from_rows():
    rng = np.random.default_rng(3)
    rows = [_pair(rng, 3.0, 4, 4) for _ in range(60)]
    score_rows(rows, 0.0, {"query": 4})
    calibration = calibrate(row_scores(rows, "subset"), 0.05, 0.5)
    label_rows(rows, 0.0, margin_lookup(calibration, "subset"), {"query": 4})
    fresh = copy.deepcopy(rows)
    for r in fresh:
        for key in ("decision", "need_reasoning", "help_threshold", "null_margin", "null_score"):
            r[key] = None
    score_rows(fresh, 0.0, {"query": 4})
    label_rows(fresh, 0.0, margin_lookup(calibrate(row_scores(fresh, "subset"), 0.05, 0.5), "subset"), {"query": 4})
    assert fresh == rows
