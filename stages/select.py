"""Label each pair from its scored candidates (stages/score.py). A pair has one of three outcomes:

  reason     some candidate helps: need_reasoning = true
  direct     reasoning was tested (at least one valid candidate) and none helps: need_reasoning = false
  undecided  no valid candidate (all cut off, empty, echoed, ...): reasoning was never tested, so
             need_reasoning = null; every score is kept

A valid candidate *helps* when delta > epsilon and, with content-free controls (scoring.controls), also
delta_control > epsilon: it beats the plain query and every control by more than epsilon.

  chosen         = the helping candidate with the largest delta, else the valid one with the largest delta
                   (ties: the lowest index); null when undecided
  best_delta     = delta of the chosen candidate
  rejected       = valid candidates other than the chosen one with delta <= 0; a preference pair is
                   (chosen, rejected) of a pair whose decision is reason

A pair whose every candidate failed with an error (a server down, a model that raised) is not labelled at all
but quarantined as `generation_failed`: nothing produced text, the cause lies outside the data, and a rerun
once the generator is back redoes it. A pair with any output (even only cut-off text) is labelled, undecided
if nothing of it is valid.

The target side (generators[].k_target > 0) is labelled by the same rule over `target_candidates` (its own
control, target_s_control): target_decision, target_chosen, target_best_delta, target_need_reasoning,
target_rejected. A target-side rationale that failed everywhere does not quarantine the pair (its query side
still carries a label): the target side is then undecided. The joint choice is the valid (k, j), both
candidates valid, with the largest delta_joint (ties: lowest k, then lowest j); it *beats* a side when
joint_delta > that side's choice + epsilon, a side's choice being its best_delta when its decision is reason
and 0 (no rationale: the plain input) otherwise. Null when no valid (k, j) exists.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import polars as pl
import pyarrow as pa

from stages.contract import Contract

REASON, DIRECT, UNDECIDED = "reason", "direct", "undecided"
DECISIONS = (REASON, DIRECT, UNDECIDED)


def helps(delta, delta_control, threshold: float, controls: bool) -> np.ndarray:
    """Which candidates help at this threshold: delta > threshold, and with controls delta_control > threshold
    (a candidate without delta_control was not compared with the controls and does not help)."""
    delta = np.asarray(delta, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        out = np.isfinite(delta) & (delta > threshold)
        if controls:
            dc = np.asarray(delta_control, dtype=np.float64)
            out &= np.isfinite(dc) & (dc > threshold)
    return out


def candidate_helps(cand: dict, threshold: float, controls: bool) -> bool:
    """helps() for one stored candidate (e.g. stages/generate.py: is a pair satisfied after a round)."""
    return bool(cand.get("valid")) and bool(helps([_nan(cand.get("delta"))], [_nan(cand.get("delta_control"))],
                                                  threshold, controls)[0])


def select(delta, valid, epsilon: float, delta_control=None,
           ) -> tuple[str, Optional[int], Optional[float], Optional[bool], list[int]]:
    """(decision, chosen, best_delta, need_reasoning, rejected) for one pair. delta_control: None without
    controls, else one value per candidate (NaN where missing)."""
    delta = np.asarray(delta, dtype=np.float64)
    usable = np.asarray(valid, dtype=bool) & np.isfinite(delta)
    if not usable.any():
        return UNDECIDED, None, None, None, []
    helping = usable & helps(delta, delta_control, epsilon, delta_control is not None)
    pool = helping if helping.any() else usable
    chosen = int(np.argmax(np.where(pool, delta, -np.inf)))  # argmax returns the first maximum: lowest index
    rejected = [int(k) for k in np.flatnonzero(usable & (delta <= 0.0)) if k != chosen]
    need = bool(helping.any())
    return (REASON if need else DIRECT), chosen, float(delta[chosen]), need, rejected


def select_joint(delta_joint, valid_query, valid_target, query_value: float, target_value: float, epsilon: float,
                 ) -> tuple[Optional[int], Optional[int], Optional[float], Optional[bool], Optional[bool]]:
    """(joint_query, joint_target, joint_delta, beats_query, beats_target). delta_joint: (K, J); the values are
    what each side alone chose (best_delta of a reason side, else 0)."""
    dj = np.asarray(delta_joint, dtype=np.float64)
    usable = (np.asarray(valid_query, dtype=bool)[:, None] & np.asarray(valid_target, dtype=bool)[None, :]
              & np.isfinite(dj))
    if not usable.any():
        return None, None, None, None, None
    k, j = np.unravel_index(int(np.argmax(np.where(usable, dj, -np.inf))), dj.shape)  # first max: lowest k, j
    best = float(dj[k, j])
    return int(k), int(j), best, best > query_value + epsilon, best > target_value + epsilon


def side_value(decision: Optional[str], best_delta: Optional[float]) -> float:
    """What one side's choice scores, in delta units: its chosen rationale's delta when it reasons, else 0
    (the input without a rationale)."""
    return float(best_delta) if decision == REASON else 0.0


def _nan(x) -> float:
    return np.nan if x is None else x


def select_rows(rows: list[dict], epsilon: float) -> list[dict]:
    for row in rows:
        if row.get("quarantine_reason"):
            continue
        cands = row.get("candidates") or []
        if cands and all(c.get("finish_reason") == "error" for c in cands):
            row["quarantine_reason"] = "generation_failed"
            row["quarantine_detail"] = f"all {len(cands)} candidates failed; first error: {cands[0].get('error')}"[:1000]
            continue
        label_side(row, cands, "", epsilon)
        targets = row.get("target_candidates") or []
        if targets:
            label_side(row, targets, "target_", epsilon)
            if cands:
                _select_joint(row, cands, targets, epsilon)
    return rows


def label_side(row: dict, cands: list, prefix: str, epsilon: float) -> None:
    """One side's label columns (prefix "" for the query side, "target_" for the target side), with that
    side's own controls (s_control / target_s_control)."""
    controls = bool(row.get(f"{prefix}s_control"))
    decision, chosen, best, need, rejected = select(
        [_nan(c.get("delta")) for c in cands], [bool(c.get("valid")) for c in cands], epsilon,
        [_nan(c.get("delta_control")) for c in cands] if controls else None)
    row[f"{prefix}decision"] = decision
    row[f"{prefix}chosen"] = chosen
    row[f"{prefix}chosen_generator"] = None if chosen is None else cands[chosen]["generator"]
    row[f"{prefix}best_delta"] = best
    row[f"{prefix}need_reasoning"] = need
    row[f"{prefix}rejected"] = rejected


def _select_joint(row: dict, cands: list, targets: list, epsilon: float) -> None:
    delta_joint = [[_nan(x) for x in (c.get("delta_joint") or [None] * len(targets))] for c in cands]
    (row["joint_query"], row["joint_target"], row["joint_delta"], row["joint_beats_query"],
     row["joint_beats_target"]) = select_joint(
        delta_joint, [bool(c.get("valid")) for c in cands], [bool(c.get("valid")) for c in targets],
        side_value(row["decision"], row["best_delta"]), side_value(row["target_decision"], row["target_best_delta"]),
        epsilon)


def turned_direct_by_control(epsilon: float, side: str = "query") -> pl.Expr:
    """Over output rows: pairs the control turned from reason to direct on this side (query | target): some
    valid candidate has delta > epsilon, so the rule without controls says reason, but none beats the controls."""
    prefix = "" if side == "query" else "target_"
    cand = pl.element().struct
    above = pl.col(f"{prefix}candidates").list.eval(cand.field("valid").fill_null(False) & (cand.field("delta") > epsilon))
    return (pl.col(f"{prefix}decision") == DIRECT) & above.list.any().fill_null(False)


class Select:
    """Ray Data stage over a batch: select_rows on the columns its contract names (pure numpy, no model)."""

    @staticmethod
    def contract(epsilon: float = 0.0, target_side: bool = True) -> Contract:
        reads = ["quarantine_reason", "s_control", "candidates.delta", "candidates.delta_control",
                 "candidates.valid", "candidates.generator", "candidates.finish_reason", "candidates.error"]
        # generation_failed: a pair whose every candidate errored is quarantined here
        writes = ["decision", "chosen", "chosen_generator", "best_delta", "need_reasoning", "rejected",
                  "quarantine_reason", "quarantine_detail"]
        # target_side: some generator has k_target > 0 (the plan passes False otherwise: then nothing writes the
        # target columns, and check_chain would refuse a stage that reads them)
        if target_side:
            reads += ["target_s_control", "target_candidates.delta", "target_candidates.delta_control",
                      "target_candidates.valid", "target_candidates.generator", "candidates.delta_joint"]
            writes += ["target_decision", "target_chosen", "target_chosen_generator", "target_best_delta",
                       "target_need_reasoning", "target_rejected", "joint_query", "joint_target", "joint_delta",
                       "joint_beats_query", "joint_beats_target"]
        return Contract("select", tuple(reads), tuple(writes))

    def __init__(self, epsilon: float, target_side: bool = True):
        self.epsilon = epsilon
        self._contract = Select.contract(epsilon, target_side)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self._contract.apply(batch, lambda rows: select_rows(rows, self.epsilon))
