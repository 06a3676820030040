"""Score each rationale against its pair: the formulas, and nothing else.

Inputs (per pair, from stages/embed.py): s_direct = cos(E(q), E(t+)), s_direct_neg[j] = cos(E(q), E(t-_j)),
and for each candidate k: s_k = cos(E(q ⊕ r_k), E(t+)), s_neg[k][j] = cos(E(q ⊕ r_k), E(t-_j)).
Outputs: lse_direct, and per candidate lse, delta, neg_delta, valid.

  cosine:      delta_k = s_k - s_direct
  pair_aware:  log p(t+ | x) = s_pos(x)/τ - lse(x),  lse(x) = logsumexp([s_pos(x), s_neg_1(x), ...] / τ)
               delta_k = log p(t+ | q ⊕ r_k) - log p(t+ | q)
  neg_delta_k = s_neg_k[j*] - s_direct_neg[j*], j* = argmax_j s_direct_neg[j]: how far the rationale moved
               the negative that was hardest for the plain query (null without negatives).

Every input is stored in the output, so each delta can be recomputed from the shards alone.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from schemas import WORK_SCHEMA, conform

INPUTS = ("s_direct", "s_direct_neg", "candidates.s_k", "candidates.s_neg", "candidates.finish_reason")
OUTPUTS = ("lse_direct", "scoring_mode", "temperature", "candidates.lse", "candidates.delta",
           "candidates.neg_delta", "candidates.valid")

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
) -> dict:
    """All of one pair's scores. s_direct_neg: (J,), s_k: (K,), s_neg: (K, J). NaN in, NaN out
    (selection treats NaN as not valid)."""
    s_direct_neg = np.asarray(s_direct_neg, dtype=np.float64).reshape(-1)
    s_k = np.asarray(s_k, dtype=np.float64).reshape(-1)
    s_neg = np.asarray(s_neg, dtype=np.float64).reshape(len(s_k), len(s_direct_neg))

    lp_direct, lse_direct = log_p_positive(np.array([s_direct], dtype=np.float64), s_direct_neg[None, :], temperature)
    lp_k, lse_k = log_p_positive(s_k, s_neg, temperature)
    if mode == "cosine":
        delta = s_k - s_direct
    elif mode == "pair_aware":
        delta = lp_k - lp_direct[0]
    else:
        raise ValueError(f"unknown scoring mode {mode!r}")

    if len(s_direct_neg):
        hardest = int(np.argmax(s_direct_neg))
        neg_delta = s_neg[:, hardest] - s_direct_neg[hardest]
    else:
        neg_delta = np.full(len(s_k), np.nan)
    return {"lse_direct": float(lse_direct[0]), "lse": lse_k, "delta": delta, "neg_delta": neg_delta}


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
        scores = score_pair(row["s_direct"], s_direct_neg, s_k, s_neg, mode, temperature)
        row["lse_direct"] = scores["lse_direct"]
        row["scoring_mode"] = mode
        row["temperature"] = float(temperature)
        for k, c in enumerate(cands):
            c["lse"] = _none_if_nan(scores["lse"][k])
            c["delta"] = _none_if_nan(scores["delta"][k])
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
