"""Scoring and selection against values worked out by hand."""
import math

import numpy as np
import pytest

from stages.score import log_p_positive, score_pair, score_rows
from stages.select import DIRECT, REASON, UNDECIDED, select_rows


def select(delta, valid, epsilon, control_delta=None):
    """The fixed rule (bar) over one pair with these candidate deltas and control deltas:
    (decision, chosen, best_delta, need_reasoning, rejected)."""
    row = {"control_delta": control_delta,
           "candidates": [{"delta": None if d is None or np.isnan(d) else float(d), "valid": bool(v), "generator": "g",
                           "finish_reason": "stop"} for d, v in zip(delta, valid)]}
    (row,) = select_rows([row], epsilon)
    return row["decision"], row["chosen"], row["best_delta"], row["need_reasoning"], row["rejected"]


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
    decision, chosen, best, need, rejected = select([0.1, 0.3, -0.2, 0.0], [True] * 4, epsilon=0.0)
    assert (decision, chosen, best, need, rejected) == (REASON, 1, pytest.approx(0.3), True, [2, 3])


def test_select_ties_go_to_lowest_index():
    assert select([0.2, 0.5, 0.5], [True] * 3, 0.0)[1] == 1


def test_select_k_equals_one():
    assert select([0.05], [True], 0.0) == (REASON, 0, pytest.approx(0.05), True, [])
    assert select([0.05], [True], 0.1)[:4] == (DIRECT, 0, pytest.approx(0.05), False)  # below epsilon


def test_select_every_delta_negative():
    decision, chosen, best, need, rejected = select([-0.3, -0.1, -0.2], [True] * 3, 0.0)
    assert decision == DIRECT and chosen == 1 and best == pytest.approx(-0.1) and need is False
    assert rejected == [0, 2]  # the chosen one is not its own rejected


def test_select_delta_exactly_epsilon_is_not_enough():
    assert select([0.0], [True], 0.0)[:4] == (DIRECT, 0, 0.0, False)


def test_select_guards_against_nan_and_invalid():
    decision, chosen, best, need, rejected = select([np.nan, 0.4, 0.9], [True, True, False], 0.0)
    assert decision == REASON and chosen == 1 and best == pytest.approx(0.4) and need is True and rejected == []
    # nothing valid: reasoning was never tested, so the pair is undecided and need_reasoning is null
    assert select([np.nan, np.nan], [True, True], 0.0) == (UNDECIDED, None, None, None, [])
    assert select([0.9, 0.5], [False, False], 0.0) == (UNDECIDED, None, None, None, [])
    assert select([], [], 0.0) == (UNDECIDED, None, None, None, [])


# --- the content-free control -------------------------------------------------------------------------------


def test_control_deltas_by_hand_cosine():
    # s_direct 0.5; candidates 0.7, 0.62, 0.4; controls 0.6 and 0.55: the best control moves the query by +0.1
    out = score_pair(0.5, [], [0.7, 0.62, 0.4], np.zeros((3, 0)), "cosine", 0.05, [0.6, 0.55], np.zeros((2, 0)))
    assert out["control_delta"] == pytest.approx([0.1, 0.05])
    assert out["delta_control"] == pytest.approx([0.1, 0.02, -0.2])  # delta - 0.1 = s_k - 0.6
    decision, chosen, best, need, rejected = select(out["delta"], [True] * 3, 0.0, out["control_delta"])
    assert (decision, chosen, need, rejected) == (REASON, 0, True, [2])
    # epsilon 0.15: the bar is the best control + 0.15 = 0.25 above the plain query; candidate 0 (0.2) is below
    assert select(out["delta"], [True] * 3, 0.15, out["control_delta"])[:2] == (DIRECT, 0)


def test_control_deltas_by_hand_pair_aware():
    tau = 0.5
    s_d, s_d_neg = 0.5, [0.4]
    out = score_pair(s_d, s_d_neg, [0.6], [[0.2]], "pair_aware", tau, [0.7], [[0.1]])
    lp = lambda pos, neg: pos / tau - math.log(math.exp(pos / tau) + math.exp(neg / tau))  # noqa: E731
    lse_c = math.log(math.exp(0.7 / tau) + math.exp(0.1 / tau))
    assert out["lse_control"][0] == pytest.approx(lse_c)
    assert out["control_delta"][0] == pytest.approx(lp(0.7, 0.1) - lp(0.5, 0.4))
    assert out["delta_control"][0] == pytest.approx(lp(0.6, 0.2) - lp(0.7, 0.1))
    # the candidate beats the plain query, but the control text beats it: direct, not reason
    assert out["delta"][0] > 0 > out["delta_control"][0]
    assert select(out["delta"], [True], 0.0, out["control_delta"])[:4] == (DIRECT, 0, pytest.approx(out["delta"][0]),
                                                                           False)


def test_controls_beating_every_candidate_make_the_pair_direct():
    decision, chosen, best, need, rejected = select([0.3, 0.2, -0.1], [True] * 3, 0.0, [0.35, 0.1])
    assert (decision, chosen, best, need, rejected) == (DIRECT, 0, pytest.approx(0.3), False, [2])


def test_the_bar_is_the_pairs_so_the_best_candidate_is_the_one_that_helps():
    # the bar (best control + epsilon) is one value per pair: if any candidate clears it, the best one does
    assert select([0.5, 0.2, 0.4], [True] * 3, 0.0, [0.45]) == (REASON, 0, pytest.approx(0.5), True, [])
    assert select([0.4, 0.4, 0.4], [True] * 3, 0.0, [0.3])[:2] == (REASON, 0)  # ties: the lowest index
    assert select([0.4], [True], 0.0, [0.4])[:2] == (DIRECT, 0)  # as good as the control is not enough
    assert select([0.4], [True], 0.0, [None])[:2] == (DIRECT, 0)  # a control that could not be scored: untested bar


def test_control_k_equals_one():
    assert select([0.2], [True], 0.0, [0.1])[:4] == (REASON, 0, pytest.approx(0.2), True)
    assert select([0.2], [True], 0.0, [0.3])[:4] == (DIRECT, 0, pytest.approx(0.2), False)
    assert select([0.2], [False], 0.0, [0.1])[:4] == (UNDECIDED, None, None, None)


def test_control_rows_store_every_score_and_recompute():
    row = {"s_direct": 0.2, "s_direct_neg": [0.3, 0.1], "s_control": [0.35, 0.25], "s_control_neg": [[0.3, 0.1], [0.2, 0.0]],
           "candidates": [_cand(0.4, [0.2, 0.0], gen="a"), _cand(0.3, [0.3, 0.0], gen="b"),
                          _cand(0.5, [0.0, 0.0], "length", gen="c")]}
    tau = 0.1
    (row,) = select_rows(score_rows([row], "pair_aware", tau), 0.0)

    def score(s_pos, s_neg):
        logits = np.array([s_pos, *s_neg]) / tau
        return s_pos / tau - (logits.max() + math.log(np.exp(logits - logits.max()).sum()))

    best_control = max(score(s, n) for s, n in zip(row["s_control"], row["s_control_neg"]))
    for i, (s, n) in enumerate(zip(row["s_control"], row["s_control_neg"])):
        assert row["control_delta"][i] == pytest.approx(score(s, n) - score(row["s_direct"], row["s_direct_neg"]))
        assert row["lse_control"][i] == pytest.approx(s / tau - score(s, n))
    for c in row["candidates"]:
        assert c["delta_control"] == pytest.approx(score(c["s_k"], c["s_neg"]) - best_control)
    helping = [k for k, c in enumerate(row["candidates"]) if c["valid"] and c["delta_control"] > 0]
    assert row["decision"] == (REASON if helping else DIRECT) and row["need_reasoning"] == bool(helping)
    assert helping == [0]  # the cut-off candidate 2 never helps, however good its scores
    assert row["help_threshold"] == pytest.approx(max(row["control_delta"]))
    assert row["candidates"][1]["delta"] > 0 > row["candidates"][1]["delta_control"]  # beats q, not the control


def test_without_controls_delta_control_is_null_and_the_rule_is_the_papers():
    row = {"s_direct": 0.5, "s_direct_neg": [], "candidates": [_cand(0.6, [])]}
    (row,) = select_rows(score_rows([row], "cosine", 0.05), 0.0)
    assert row["candidates"][0]["delta_control"] is None and row.get("s_control") is None
    assert row["decision"] == REASON and row["need_reasoning"] is True


def _cand(s_k, s_neg, finish="stop", gen="g"):
    return {"s_k": s_k, "s_neg": s_neg, "finish_reason": finish, "generator": gen}


def test_rows_without_a_valid_candidate_are_undecided_and_keep_scores():
    row = {"s_direct": 0.5, "s_direct_neg": [0.1],
           "candidates": [_cand(0.9, [0.0], "length"), _cand(None, None, "error")]}
    (row,) = select_rows(score_rows([row], "cosine", 0.05), 0.0)
    assert row["candidates"][0]["delta"] == pytest.approx(0.4)  # kept for auditing
    assert [c["valid"] for c in row["candidates"]] == [False, False]
    assert row["decision"] == UNDECIDED and row["need_reasoning"] is None
    assert row["chosen"] is None and row["best_delta"] is None and row["rejected"] == []


def test_a_pair_whose_every_candidate_errored_is_quarantined_not_labelled():
    failed = dict(_cand(None, None, "error"), error="cannot reach http://127.0.0.1:1/v1 after 3 attempts")
    row = {"s_direct": 0.5, "s_direct_neg": [0.1], "candidates": [failed, dict(failed)]}
    (row,) = select_rows(score_rows([row], "cosine", 0.05), 0.0)
    assert row["quarantine_reason"] == "generation_failed" and "cannot reach" in row["quarantine_detail"]
    assert row.get("need_reasoning") is None
    # one candidate that produced text, however poor, is a test: the pair is labelled
    # (undecided: nothing valid to test reasoning with)
    row = {"s_direct": 0.5, "s_direct_neg": [0.1], "candidates": [failed, _cand(None, None, "empty")]}
    (row,) = select_rows(score_rows([row], "cosine", 0.05), 0.0)
    assert row.get("quarantine_reason") is None and row["decision"] == UNDECIDED and row["need_reasoning"] is None


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
