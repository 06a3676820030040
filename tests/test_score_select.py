"""Scoring and selection against values worked out by hand."""
import math

import numpy as np
import pytest

from stages.score import log_p_positive, score_pair, score_rows
from stages.select import select, select_rows


def test_cosine_delta_is_difference_of_similarities():
    out = score_pair(0.5, [], [0.7, 0.4, 0.5], np.zeros((3, 0)), "cosine", 0.05)
    assert out["delta"] == pytest.approx([0.2, -0.1, 0.0])
    assert np.isnan(out["neg_delta"]).all()  # no negatives, nothing moved


def test_pair_aware_delta_by_hand():
    tau = 0.5
    s_d, s_d_neg = 0.5, [0.4, 0.1]
    s_k, s_neg = [0.6], [[0.2, 0.3]]
    out = score_pair(s_d, s_d_neg, s_k, s_neg, "pair_aware", tau)
    lse_d = math.log(math.exp(0.5 / tau) + math.exp(0.4 / tau) + math.exp(0.1 / tau))
    lse_k = math.log(math.exp(0.6 / tau) + math.exp(0.2 / tau) + math.exp(0.3 / tau))
    expected = (0.6 / tau - lse_k) - (0.5 / tau - lse_d)
    assert out["lse_direct"] == pytest.approx(lse_d)
    assert out["lse"][0] == pytest.approx(lse_k)
    assert out["delta"][0] == pytest.approx(expected)
    # hardest negative for q is j=0 (0.4); the rationale moved it to 0.2
    assert out["neg_delta"][0] == pytest.approx(0.2 - 0.4)


def test_pair_aware_without_negatives_is_zero():
    out = score_pair(0.3, [], [0.9], np.zeros((1, 0)), "pair_aware", 0.05)
    assert out["delta"][0] == pytest.approx(0.0)


def test_logsumexp_is_stable_at_small_temperature():
    lp, lse = log_p_positive(np.array([1.0]), np.array([[0.99]]), 1e-4)
    assert np.isfinite(lp).all() and np.isfinite(lse).all()
    assert lp[0] == pytest.approx(-math.log1p(math.exp(-100)), abs=1e-9)


def test_select_picks_argmax_and_labels():
    chosen, best, need, rejected = select([0.1, 0.3, -0.2, 0.0], [True] * 4, epsilon=0.0)
    assert (chosen, best, need, rejected) == (1, pytest.approx(0.3), True, [2, 3])


def test_select_ties_go_to_lowest_index():
    assert select([0.2, 0.5, 0.5], [True] * 3, 0.0)[0] == 1


def test_select_k_equals_one():
    assert select([0.05], [True], 0.0) == (0, pytest.approx(0.05), True, [])
    assert select([0.05], [True], 0.1)[2] is False  # below epsilon


def test_select_every_delta_negative():
    chosen, best, need, rejected = select([-0.3, -0.1, -0.2], [True] * 3, 0.0)
    assert chosen == 1 and best == pytest.approx(-0.1) and need is False
    assert rejected == [0, 2]  # the chosen one is not its own rejected


def test_select_delta_exactly_epsilon_is_not_enough():
    assert select([0.0], [True], 0.0)[2] is False


def test_select_guards_against_nan_and_invalid():
    chosen, best, need, rejected = select([np.nan, 0.4, 0.9], [True, True, False], 0.0)
    assert chosen == 1 and best == pytest.approx(0.4) and need is True and rejected == []
    assert select([np.nan, np.nan], [True, True], 0.0) == (None, None, False, [])


def _cand(s_k, s_neg, finish="stop", gen="g"):
    return {"s_k": s_k, "s_neg": s_neg, "finish_reason": finish, "generator": gen}


def test_rows_all_failed_keep_scores_and_no_reasoning():
    row = {"s_direct": 0.5, "s_direct_neg": [0.1],
           "candidates": [_cand(0.9, [0.0], "length"), _cand(None, None, "error")]}
    (row,) = select_rows(score_rows([row], "cosine", 0.05), 0.0)
    assert row["candidates"][0]["delta"] == pytest.approx(0.4)  # kept for auditing
    assert [c["valid"] for c in row["candidates"]] == [False, False]
    assert row["chosen"] is None and row["need_reasoning"] is False and row["best_delta"] is None


def test_a_pair_whose_every_candidate_errored_is_quarantined_not_labelled():
    failed = dict(_cand(None, None, "error"), error="cannot reach http://127.0.0.1:1/v1 after 3 attempts")
    row = {"s_direct": 0.5, "s_direct_neg": [0.1], "candidates": [failed, dict(failed)]}
    (row,) = select_rows(score_rows([row], "cosine", 0.05), 0.0)
    assert row["quarantine_reason"] == "generation_failed" and "cannot reach" in row["quarantine_detail"]
    assert row.get("need_reasoning") is None
    # one candidate that produced text, however poor, is a test: the pair is labelled
    row = {"s_direct": 0.5, "s_direct_neg": [0.1], "candidates": [failed, _cand(None, None, "empty")]}
    (row,) = select_rows(score_rows([row], "cosine", 0.05), 0.0)
    assert row.get("quarantine_reason") is None and row["need_reasoning"] is False


def test_rows_recomputable_from_stored_columns():
    row = {"s_direct": 0.2, "s_direct_neg": [0.3, 0.1],
           "candidates": [_cand(0.4, [0.2, 0.0], gen="a"), _cand(0.1, [0.5, 0.0], gen="b")]}
    (row,) = select_rows(score_rows([row], "pair_aware", 0.1), 0.0)
    for c in row["candidates"]:
        recomputed = (c["s_k"] / 0.1 - c["lse"]) - (row["s_direct"] / 0.1 - row["lse_direct"])
        assert c["delta"] == pytest.approx(recomputed)
    assert row["chosen"] == 0 and row["chosen_generator"] == "a" and row["rejected"] == [1]
    assert row["candidates"][1]["neg_delta"] == pytest.approx(0.5 - 0.3)


def test_quarantined_rows_untouched():
    row = {"quarantine_reason": "image_missing", "s_direct": None, "candidates": None}
    assert select_rows(score_rows([dict(row)], "cosine", 0.05), 0.0) == [row]
