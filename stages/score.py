"""Score each rationale against its pair: the formulas, and nothing else.

Inputs (per pair, from stages/embed.py): s_direct = cos(E(q), E(t+)), s_direct_neg[j] = cos(E(q), E(t-_j)),
and for each candidate k: s_k = cos(E(q ⊕ r_k), E(t+)), s_neg[k][j] = cos(E(q ⊕ r_k), E(t-_j)).
With content-free controls (scoring.controls, stages/embed.py): s_control[i] = cos(E(q ⊕ c_i), E(t+)),
s_control_neg[i][j] = cos(E(q ⊕ c_i), E(t-_j)).
Outputs: lse_direct, lse_control, control_delta, and per candidate lse, delta, delta_control, neg_delta, valid.

  cosine:      delta_k = s_k - s_direct
  pair_aware:  log p(t+ | x) = s_pos(x)/τ - lse(x),  lse(x) = logsumexp([s_pos(x), s_neg_1(x), ...] / τ)
               delta_k = log p(t+ | q ⊕ r_k) - log p(t+ | q)
  headroom    = the most any delta of the pair can be: -log p(t+ | q) (pair_aware: log p <= 0), 1 - s_direct
               (cosine: cos <= 1). The decoy rule measures a pair's lead in shares of it (stages/select.py).
  neg_delta_k = s_neg_k[j*] - s_direct_neg[j*], j* = argmax_j s_direct_neg[j]: how far the rationale moved
               the negative that was hardest for the plain query (null without negatives).
  control_delta_i = the delta of control c_i, computed as a candidate's (same mode, same units)
  delta_control_k = delta_k - max_i control_delta_i = score(q ⊕ r_k) - max_i score(q ⊕ c_i)
               (null without controls): what rationale k adds over the best content-free text.

The target side (generators[].k_target > 0), in the same units and modes, by the same score_pair:
  target_s_k[j] = cos(E(q), E(t ⊕ r_t,j)),  target_s_control[i] = cos(E(q), E(t ⊕ c_i))
  delta_t,j = score(q, t ⊕ r_t,j) - score(q, t)
  pair_aware: the softmax is over the plain query's similarity to {t ⊕ r_t,j} ∪ negatives, the negatives as
               embedded for the query side (plain, target template: s_direct_neg). Why not reasoned negatives:
               a negative would need rationales of its own (k_target generations per negative per pair) and
               which one to use would be a choice again; what plain negatives favour (any text appended to the
               positive moves it) is what the target-side control measures: t ⊕ c_i against the same negatives,
               so a target rationale helps only if it beats the controls too. neg_delta is null on the target
               side (the plain query's view of the negatives does not move).
  joint:      delta_joint[k][j] = score(q ⊕ r_q,k, t ⊕ r_t,j) - score(q, t), from s_joint[k][j] =
               cos(E(q ⊕ r_q,k), E(t ⊕ r_t,j)) and, pair-aware, the negatives as embedded for the query side
               against q ⊕ r_q,k (candidates.s_neg[k]).

Decoys (stages/decoys.py, scored by select with stages/calibrate.py): rationales the same generator wrote for other
pairs of the shard, appended to this pair's query (target side: to its target) in the same reasoned template.
Each decoy is scored exactly as a candidate: s_decoy[d] = cos(E(q ⊕ decoy_d), E(t+)), its negatives likewise,
and decoy_delta_d in the same mode and units. They are this pair's null: what rationale-like text that carries
nothing about this pair does to its score.

Every input is stored in the output, so each delta can be recomputed from the shards alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from stages.contract import Contract
from stages.side import QUERY, Side, sides_of
from stages.spec import StageSpec

SCORING_MODES = ("cosine", "pair_aware")  # scoring.mode (pipeline/config.py takes its choices from here)

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


def reasoned_deltas(s_direct: float, s_direct_neg: np.ndarray, s_pos: np.ndarray, s_negs: np.ndarray, mode: str,
                    temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """delta and lse of reasoned inputs (candidates, controls, decoys: anything appended to the plain input) with
    these similarities. s_direct_neg: (J,), s_pos: (n,), s_negs: (n, J)."""
    if mode not in SCORING_MODES:
        raise ValueError(f"unknown scoring mode {mode!r}")
    lp, lse = log_p_positive(s_pos, s_negs, temperature)
    if mode == "cosine":
        return s_pos - s_direct, lse
    lp_direct = log_p_positive(np.array([s_direct], dtype=np.float64), s_direct_neg[None, :], temperature)[0]
    return lp - lp_direct[0], lse


def headroom(mode: str, s_direct: float, lse_direct: float, temperature: float) -> float:
    """The most any delta of the pair can be, on either side: log p(t+ | x) <= 0 in pair_aware mode (so -log p(t+ | q)
    = lse_direct - s_direct/τ), cos <= 1 in cosine mode (1 - s_direct). It depends on the plain pair alone."""
    if mode not in SCORING_MODES:
        raise ValueError(f"unknown scoring mode {mode!r}")
    return float(1.0 - s_direct if mode == "cosine" else lse_direct - s_direct / temperature)


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
    if mode not in SCORING_MODES:
        raise ValueError(f"unknown scoring mode {mode!r}")
    s_direct_neg = np.asarray(s_direct_neg, dtype=np.float64).reshape(-1)
    s_k = np.asarray(s_k, dtype=np.float64).reshape(-1)
    s_neg = np.asarray(s_neg, dtype=np.float64).reshape(len(s_k), len(s_direct_neg))
    s_control = np.asarray(s_control, dtype=np.float64).reshape(-1)
    s_control_neg = np.asarray(s_control_neg if s_control_neg is not None else [], dtype=np.float64).reshape(
        len(s_control), len(s_direct_neg))

    lse_direct = log_p_positive(np.array([s_direct], dtype=np.float64), s_direct_neg[None, :], temperature)[1]
    delta, lse_k = reasoned_deltas(s_direct, s_direct_neg, s_k, s_neg, mode, temperature)
    control_delta, lse_control = reasoned_deltas(s_direct, s_direct_neg, s_control, s_control_neg, mode, temperature)
    # max over controls (a NaN control, one that could not be scored, makes every delta_control NaN: untested)
    delta_control = delta - np.max(control_delta) if len(s_control) else np.full(len(s_k), np.nan)

    if len(s_direct_neg):
        hardest = int(np.argmax(s_direct_neg))
        neg_delta = s_neg[:, hardest] - s_direct_neg[hardest]
    else:
        neg_delta = np.full(len(s_k), np.nan)
    return {"lse_direct": float(lse_direct[0]), "lse": lse_k, "delta": delta, "neg_delta": neg_delta,
            "lse_control": lse_control, "control_delta": control_delta, "delta_control": delta_control}


def joint_deltas(s_direct: float, s_direct_neg: np.ndarray, s_joint: np.ndarray, s_neg: np.ndarray, mode: str,
                 temperature: float) -> np.ndarray:
    """delta_joint (K, J): score(q ⊕ r_q,k, t ⊕ r_t,j) - score(q, t). s_joint: (K, J) = cos(E(q ⊕ r_q,k),
    E(t ⊕ r_t,j)); s_neg: (K, N) = cos(E(q ⊕ r_q,k), E(t-_n)), the query candidates' own s_neg."""
    s_direct_neg = np.asarray(s_direct_neg, dtype=np.float64).reshape(-1)
    s_joint = np.asarray(s_joint, dtype=np.float64)
    s_neg = np.asarray(s_neg, dtype=np.float64).reshape(len(s_joint), len(s_direct_neg))
    return np.stack([score_pair(s_direct, s_direct_neg, s_joint[k], np.tile(s_neg[k], (s_joint.shape[1], 1)), mode,
                                temperature)["delta"] for k in range(len(s_joint))]).reshape(s_joint.shape)


def _none_if_nan(x: float):
    return None if x is None or not np.isfinite(x) else float(x)


def _similarities(items: list, n_neg: int) -> tuple[np.ndarray, np.ndarray]:
    """(s_pos (n,), s_neg (n, J)) of stored candidate-like records; NaN where a record was not embedded or has no
    s_neg of J values."""
    nan = float("nan")
    s_pos = np.array([nan if x.get("s_k") is None else x["s_k"] for x in items], dtype=np.float64)
    s_neg = np.array([x["s_neg"] if x.get("s_neg") is not None and len(x["s_neg"]) == n_neg else [nan] * n_neg
                      for x in items], dtype=np.float64).reshape(len(items), n_neg)
    return s_pos, s_neg


def _side_similarities(items: list, side: Side, s_direct_neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A side's (s_pos, s_neg): the target side's reasoned inputs meet the negatives as the plain query sees them
    (stages/side.py), so its s_neg is s_direct_neg for every item."""
    s_pos, s_neg = _similarities(items, len(s_direct_neg))
    return s_pos, (s_neg if side.own_negatives else np.tile(s_direct_neg, (len(items), 1)))


def score_decoys(row: dict, side: Side, mode: str, temperature: float) -> None:
    """delta and lse of each of the side's decoys, scored as the side's candidates are, in place."""
    decoys = row.get(side.decoys) or []
    if not decoys:
        return
    s_direct_neg = np.array(row.get("s_direct_neg") or [], dtype=np.float64)
    delta, lse = reasoned_deltas(row["s_direct"], s_direct_neg, *_side_similarities(decoys, side, s_direct_neg), mode,
                                 temperature)
    for d, decoy in enumerate(decoys):
        decoy["delta"], decoy["lse"] = _none_if_nan(delta[d]), _none_if_nan(lse[d])


def _score_side(row: dict, side: Side, s_direct_neg: np.ndarray, mode: str, temperature: float,
                valid_finish) -> np.ndarray:
    """One side's candidates and controls scored (in place); returns the candidates' s_neg (the joint needs the
    query side's)."""
    nan = float("nan")
    cands = row.get(side.candidates) or []
    s_k, s_neg = _side_similarities(cands, side, s_direct_neg)
    s_control = np.array([nan if x is None else x for x in row.get(side.column("s_control")) or []], dtype=np.float64)
    control_neg = (row.get(side.column("s_control_neg")) if side.own_negatives else None) or [None] * len(s_control)
    s_control_neg = np.array([n if n is not None and len(n) == len(s_direct_neg) else
                              (list(s_direct_neg) if not side.own_negatives else [nan] * len(s_direct_neg))
                              for n in control_neg], dtype=np.float64).reshape(len(s_control), len(s_direct_neg))
    scores = score_pair(row["s_direct"], s_direct_neg, s_k, s_neg, mode, temperature, s_control, s_control_neg)
    if len(s_control):
        row[side.column("lse_control")] = [_none_if_nan(x) for x in scores["lse_control"]]
        row[side.column("control_delta")] = [_none_if_nan(x) for x in scores["control_delta"]]
    for k, c in enumerate(cands):
        c["lse"] = _none_if_nan(scores["lse"][k])
        c["delta"] = _none_if_nan(scores["delta"][k])
        c["delta_control"] = _none_if_nan(scores["delta_control"][k])
        # how far the rationale moved the negative hardest for the plain query: only where it meets the negatives
        c["neg_delta"] = _none_if_nan(scores["neg_delta"][k]) if side.own_negatives else None
        c["valid"] = c.get("finish_reason") in valid_finish and c["delta"] is not None
    score_decoys(row, side, mode, temperature)
    return s_neg


def score_rows(rows: list[dict], mode: str, temperature: float, valid_finish=VALID_FINISH) -> list[dict]:
    for row in rows:
        if row.get("quarantine_reason") or row.get("s_direct") is None:
            continue
        s_direct_neg = np.array(row.get("s_direct_neg") or [], dtype=np.float64)
        row["lse_direct"] = float(log_p_positive(np.array([row["s_direct"]], dtype=np.float64), s_direct_neg[None, :],
                                                 temperature)[1][0])
        row["scoring_mode"] = mode
        row["temperature"] = float(temperature)
        s_neg = {side.name: _score_side(row, side, s_direct_neg, mode, temperature, valid_finish)
                 for side in sides_of(row)}
        cands, targets = row.get("candidates") or [], row.get("target_candidates") or []
        if cands and targets:  # the joint: each query candidate with each target candidate
            nan = float("nan")
            s_joint = np.array([[nan if x is None else x for x in (c.get("s_joint") or [None] * len(targets))]
                                for c in cands], dtype=np.float64).reshape(len(cands), len(targets))
            delta_joint = joint_deltas(row["s_direct"], s_direct_neg, s_joint, s_neg[QUERY.name], mode, temperature)
            for k, c in enumerate(cands):
                c["delta_joint"] = ([_none_if_nan(x) for x in delta_joint[k]] if c.get("s_joint") is not None
                                    else None)
    return rows


@dataclass(frozen=True)
class ScoreSpec(StageSpec):
    """score over a batch (pure numpy, no model): the sides `sides`, with their decoys under the decoy rule."""

    mode: str = "cosine"
    temperature: float = 1.0
    valid_finish_reasons: tuple[str, ...] = VALID_FINISH
    sides: tuple[Side, ...] = (QUERY,)
    decoys: bool = False

    def contract(self) -> Contract:
        reads = ["quarantine_reason", "s_direct", "s_direct_neg", "s_control_neg"]
        writes = ["lse_direct", "scoring_mode", "temperature"]
        for side in self.sides:
            field = side.candidates
            reads += [side.column("s_control")] + [f"{field}.{name}" for name in ("s_k", "s_neg", "finish_reason")]
            writes += [side.column(name) for name in ("lse_control", "control_delta")]
            writes += [f"{field}.{name}" for name in ("lse", "delta", "delta_control", "neg_delta", "valid")]
            if self.decoys:
                reads += [f"{side.decoys}.{name}" for name in ("s_k", "s_neg")]
                writes += [f"{side.decoys}.{name}" for name in ("delta", "lse")]
        if len(self.sides) > 1:
            reads += ["candidates.s_joint"]
            writes += ["candidates.delta_joint"]
        return Contract("score", tuple(reads), tuple(writes))


class Score:
    """Ray Data stage over a batch: score_rows on the columns its contract names (pure numpy, no model)."""

    def __init__(self, spec: ScoreSpec):
        self.spec = spec
        self._contract = spec.contract()

    def __call__(self, batch: pa.Table) -> pa.Table:
        spec = self.spec
        return self._contract.apply(batch, lambda rows: score_rows(rows, spec.mode, spec.temperature,
                                                                   spec.valid_finish_reasons))


ScoreSpec.stage = Score
