"""Score each rationale against its pair: the formulas, and nothing else.

Inputs (per pair, from stages/embed.py): s_direct = cos(E(q), E(t+)), s_direct_neg[j] = cos(E(q), E(t-_j)),
and for each candidate k: s_k = cos(E(q ⊕ r_k), E(t+)), s_neg[k][j] = cos(E(q ⊕ r_k), E(t-_j)).
With content-free controls (scoring.controls, stages/embed.py): s_control[i] = cos(E(q ⊕ c_i), E(t+)),
s_control_neg[i][j] = cos(E(q ⊕ c_i), E(t-_j)).
Outputs: lse_direct, lse_control, control_delta, and per candidate lse, delta, delta_control, neg_delta, valid.

  cosine:      delta_k = s_k - s_direct
  pair_aware:  log p(t+ | x) = s_pos(x)/τ - lse(x),  lse(x) = logsumexp([s_pos(x), s_neg_1(x), ...] / τ)
               delta_k = log p(t+ | q ⊕ r_k) - log p(t+ | q)
  neg_delta_k = s_neg_k[j*] - s_direct_neg[j*], j* = argmax_j s_direct_neg[j]: how far the rationale moved
               the negative that was hardest for the plain query (null without negatives).
  control_delta_i = the delta of control c_i, computed as a candidate's (same mode, same units)
  delta_control_k = delta_k - max_i control_delta_i = score(q ⊕ r_k) - max_i score(q ⊕ c_i)
               (null without controls): what rationale k adds over the best content-free text.

Every input is stored in the output, so each delta can be recomputed from the shards alone.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from schemas import WORK_SCHEMA, conform

INPUTS = ("s_direct", "s_direct_neg", "s_control", "s_control_neg", "candidates.s_k", "candidates.s_neg",
          "candidates.finish_reason")
OUTPUTS = ("lse_direct", "lse_control", "control_delta", "scoring_mode", "temperature", "candidates.lse",
           "candidates.delta", "candidates.delta_control", "candidates.neg_delta", "candidates.valid")

# By default only a candidate that finished normally is a rationale; cut-off, empty, echoed or failed ones are
# kept for auditing but never chosen (scoring.valid_finish_reasons).
VALID_FINISH = ("stop",)


def logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def log_p_positive(s_pos: np.ndarray, s_neg: np.ndarray, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """log p(t+ | x) under a softmax of cos/τ over {t+} ∪ negatives, and its logsumexp.
    s_pos: (n,), s_neg: (n, J). With J = 0 the softmax has one outcome and log p = 0."""
    logits = np.concatenate([s_pos[:, None], s_neg], axis=1) / temperature
    lse = logsumexp(logits, axis=1)
    return s_pos / temperature - lse, lse


def score_pair(
    s_direct: float,
    s_direct_neg: np.ndarray,
    s_k: np.ndarray,
    s_neg: np.ndarray,
    mode: str,
    temperature: float,
    s_control=(),
    s_control_neg=None,
) -> dict:
    """All of one pair's scores. s_direct_neg: (J,), s_k: (K,), s_neg: (K, J), s_control: (C,),
    s_control_neg: (C, J). NaN in, NaN out (selection treats NaN as not valid)."""
    if mode not in ("cosine", "pair_aware"):
        raise ValueError(f"unknown scoring mode {mode!r}")
    s_direct_neg = np.asarray(s_direct_neg, dtype=np.float64).reshape(-1)
    s_k = np.asarray(s_k, dtype=np.float64).reshape(-1)
    s_neg = np.asarray(s_neg, dtype=np.float64).reshape(len(s_k), len(s_direct_neg))
    s_control = np.asarray(s_control, dtype=np.float64).reshape(-1)
    s_control_neg = np.asarray(s_control_neg if s_control_neg is not None else [], dtype=np.float64).reshape(
        len(s_control), len(s_direct_neg))

    lp_direct, lse_direct = log_p_positive(np.array([s_direct], dtype=np.float64), s_direct_neg[None, :], temperature)

    def deltas(s_pos: np.ndarray, s_negs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """delta and lse of reasoned queries (candidates or controls) with these similarities."""
        lp, lse = log_p_positive(s_pos, s_negs, temperature)
        return (s_pos - s_direct if mode == "cosine" else lp - lp_direct[0]), lse

    delta, lse_k = deltas(s_k, s_neg)
    control_delta, lse_control = deltas(s_control, s_control_neg)
    # max over controls (a NaN control, one that could not be scored, makes every delta_control NaN: untested)
    delta_control = delta - np.max(control_delta) if len(s_control) else np.full(len(s_k), np.nan)

    if len(s_direct_neg):
        hardest = int(np.argmax(s_direct_neg))
        neg_delta = s_neg[:, hardest] - s_direct_neg[hardest]
    else:
        neg_delta = np.full(len(s_k), np.nan)
    return {"lse_direct": float(lse_direct[0]), "lse": lse_k, "delta": delta, "neg_delta": neg_delta,
            "lse_control": lse_control, "control_delta": control_delta, "delta_control": delta_control}


def _none_if_nan(x: float):
    return None if x is None or not np.isfinite(x) else float(x)


def score_rows(rows: list[dict], mode: str, temperature: float, valid_finish=VALID_FINISH) -> list[dict]:
    for row in rows:
        if row.get("quarantine_reason") or row.get("s_direct") is None:
            continue
        cands = row.get("candidates") or []
        s_direct_neg = np.array(row.get("s_direct_neg") or [], dtype=np.float64)
        nan = float("nan")
        s_k = np.array([nan if c["s_k"] is None else c["s_k"] for c in cands], dtype=np.float64)
        s_neg = np.array(
            [c["s_neg"] if c["s_neg"] is not None and len(c["s_neg"]) == len(s_direct_neg) else [nan] * len(s_direct_neg)
             for c in cands],
            dtype=np.float64,
        ).reshape(len(cands), len(s_direct_neg))
        s_control = np.array([nan if s is None else s for s in row.get("s_control") or []], dtype=np.float64)
        s_control_neg = np.array(
            [n if n is not None and len(n) == len(s_direct_neg) else [nan] * len(s_direct_neg)
             for n in row.get("s_control_neg") or [None] * len(s_control)],
            dtype=np.float64,
        ).reshape(len(s_control), len(s_direct_neg))
        scores = score_pair(row["s_direct"], s_direct_neg, s_k, s_neg, mode, temperature, s_control, s_control_neg)
        row["lse_direct"] = scores["lse_direct"]
        if len(s_control):
            row["lse_control"] = [_none_if_nan(x) for x in scores["lse_control"]]
            row["control_delta"] = [_none_if_nan(x) for x in scores["control_delta"]]
        row["scoring_mode"] = mode
        row["temperature"] = float(temperature)
        for k, c in enumerate(cands):
            c["lse"] = _none_if_nan(scores["lse"][k])
            c["delta"] = _none_if_nan(scores["delta"][k])
            c["delta_control"] = _none_if_nan(scores["delta_control"][k])
            c["neg_delta"] = _none_if_nan(scores["neg_delta"][k])
            c["valid"] = c.get("finish_reason") in valid_finish and c["delta"] is not None
    return rows


class Score:
    """Ray Data stage (a plain function would do; a class keeps the config in one place)."""

    def __init__(self, mode: str, temperature: float, valid_finish_reasons=VALID_FINISH):
        self.mode = mode
        self.temperature = temperature
        self.valid_finish = tuple(valid_finish_reasons)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return conform(score_rows(batch.to_pylist(), self.mode, self.temperature, self.valid_finish), WORK_SCHEMA)
