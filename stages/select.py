"""Label each pair from its scored candidates (stages/score.py).

  chosen         = argmax_k delta_k over valid candidates (ties: the lowest index)
  best_delta     = delta of the chosen candidate
  need_reasoning = best_delta > epsilon
  rejected       = valid candidates other than the chosen one with delta <= 0; with `chosen` they form
                   preference pairs

A pair without any valid candidate keeps every score, gets chosen = null and need_reasoning = false. A pair
whose every candidate failed with an error (a server down, a model that raised) was never tested at all: it is
quarantined as `generation_failed` rather than labelled.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow as pa

from schemas import WORK_SCHEMA, conform

INPUTS = ("candidates.delta", "candidates.valid", "candidates.generator", "candidates.finish_reason")
OUTPUTS = ("chosen", "chosen_generator", "best_delta", "need_reasoning", "rejected", "quarantine_reason")


def select(delta, valid, epsilon: float) -> tuple[Optional[int], Optional[float], bool, list[int]]:
    """(chosen, best_delta, need_reasoning, rejected) for one pair."""
    delta = np.asarray(delta, dtype=np.float64)
    usable = np.asarray(valid, dtype=bool) & np.isfinite(delta)
    if not usable.any():
        return None, None, False, []
    masked = np.where(usable, delta, -np.inf)
    chosen = int(np.argmax(masked))  # argmax returns the first maximum: ties go to the lowest index
    best = float(delta[chosen])
    rejected = [int(k) for k in np.flatnonzero(usable & (delta <= 0.0)) if k != chosen]
    return chosen, best, bool(best > epsilon), rejected


def select_rows(rows: list[dict], epsilon: float) -> list[dict]:
    for row in rows:
        if row.get("quarantine_reason"):
            continue
        cands = row.get("candidates") or []
        if cands and all(c.get("finish_reason") == "error" for c in cands):
            row["quarantine_reason"] = "generation_failed"
            row["quarantine_detail"] = f"all {len(cands)} candidates failed; first error: {cands[0].get('error')}"[:1000]
            continue
        delta = [np.nan if c.get("delta") is None else c["delta"] for c in cands]
        chosen, best, need, rejected = select(delta, [bool(c.get("valid")) for c in cands], epsilon)
        row["chosen"] = chosen
        row["chosen_generator"] = None if chosen is None else cands[chosen]["generator"]
        row["best_delta"] = best
        row["need_reasoning"] = need
        row["rejected"] = rejected
    return rows


class Select:
    def __init__(self, epsilon: float):
        self.epsilon = epsilon

    def __call__(self, batch: pa.Table) -> pa.Table:
        return conform(select_rows(batch.to_pylist(), self.epsilon), WORK_SCHEMA)
