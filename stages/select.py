"""Label each pair from its scored candidates (stages/score.py). A pair has one of three outcomes:

  reason     some valid candidate helps: need_reasoning = true
  direct     reasoning was tested and no candidate helps: need_reasoning = false
  undecided  reasoning was never tested: no valid candidate (all cut off, empty, echoed, ...), or, under the
             decoy rule, too few decoys could be drawn for the pair (a shard of one target); need_reasoning =
             null, every score is kept

A valid candidate *helps* when its delta > help_threshold, the pair's own threshold in delta's units:

  base_threshold = epsilon, and with content-free controls (scoring.controls) the best control's delta + epsilon:
                   the bar of the fixed rule (scoring.decision.rule: bar)
  help_threshold = max(base_threshold, the best decoy's delta) + margin · headroom      (rule: decoys)
                 = base_threshold                                                    (rule: bar)

Under the decoy rule the best candidate must beat every decoy of the pair (rationales the same generator wrote for
other pairs, stages/decoys.py: what text that carries nothing about this pair does to its score) and the bar, by
`margin` shares of its headroom (stages/score.py: the most a delta of the pair can be, -log p(t+ | q) or
1 - s_direct), a margin that stages/calibrate.py sets per calibration group (subset or job) so that the estimated
false-discovery rate of the reason labels is at most scoring.decision.fdr. Each pair takes part in that
calibration with its null_score, a knockoff statistic over groups of equal make-up: the pair's candidates, and its
decoys split into scoring.decision.decoys_per_candidate groups that mirror them (per generator, one decoy per
candidate slot each: stages/decoys.py:decoy_groups). Of the groups' best deltas,

  null_score     = +size when the candidates' best is the top (it beats every decoy), -size otherwise (ties go to
                   the decoys); size = (top - max(the runner-up group's best, base_threshold)) / headroom, how far
                   the top group clears both the next group and the bar, as a share of what the pair could gain
                   (0: nothing clears the bar, or nothing can be gained)
  null_margin    = margin · headroom, the pair's margin in delta's units (inf: the group labels no pair reason)

so a pair is reason iff null_score > margin, i.e. best_delta > help_threshold. The size is a difference, not the
top's height above the bar: a decoy that beats the evidence by a hair costs a loss of a hair, which the calibration
can set its margin above, where a loss as tall as the evidence would cost every win below it. It is a share of the
headroom because one margin serves pairs of every kind: a hard pair (the plain query ranks a negative first)
has units of log p to gain and any text moves it far, an easy one has hundredths; in absolute units the
hard pairs' chance leads would set the margin and pass over every real lead of the easy ones. The headroom
depends on the plain pair alone, never on its candidates or decoys, so the sign of the score stays a fair coin
under the null (stages/calibrate.py).

  chosen         = the valid candidate with the largest delta (ties: the lowest index); null when none is valid.
                   The threshold is the pair's, so if any candidate helps, the chosen one does.
  best_delta     = delta of the chosen candidate
  rejected       = valid candidates other than the chosen one with delta <= 0; a preference pair is
                   (chosen, rejected) of a pair whose decision is reason

A pair whose every candidate failed with an error (a server down, a model that raised) is not labelled at all
but quarantined as `generation_failed`: nothing produced text, the cause lies outside the data, and a rerun
once the generator is back redoes it. A pair with any output (even only cut-off text) is labelled, undecided
if nothing of it is valid.

The target side (generators[].k_target > 0) is labelled by the same rule over `target_candidates` with its own
controls and decoys, in the target_ columns. A target-side rationale that failed everywhere does not quarantine
the pair (its query side still carries a label): the target side is then undecided. The joint choice is the
valid (k, j), both candidates valid, with the largest delta_joint (ties: lowest k, then lowest j); it *beats* a
side when joint_delta > that side's choice + epsilon, a side's choice being its best_delta when its decision is
reason and 0 (no rationale: the plain input) otherwise. Null when no valid (k, j) exists.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np
import pyarrow as pa

from schemas import JOINT_COLUMNS
from stages.contract import Contract
from stages.decoys import decoy_groups
from stages.score import headroom
from stages.side import QUERY, Side, sides_of
from stages.spec import StageSpec

REASON, DIRECT, UNDECIDED = "reason", "direct", "undecided"
DECISIONS = (REASON, DIRECT, UNDECIDED)
NULL_RULES = ("decoys", "bar")  # scoring.decision.rule (pipeline/config.py takes its choices from here)


def choose(delta, valid) -> tuple[Optional[int], Optional[float], list[int]]:
    """(chosen, best_delta, rejected) of one side: the valid candidate with the largest delta (first maximum: the
    lowest index), and the other valid candidates with delta <= 0."""
    delta = np.asarray(delta, dtype=np.float64)
    usable = np.asarray(valid, dtype=bool) & np.isfinite(delta)
    if not usable.any():
        return None, None, []
    chosen = int(np.argmax(np.where(usable, delta, -np.inf)))
    rejected = [int(k) for k in np.flatnonzero(usable & (delta <= 0.0)) if k != chosen]
    return chosen, float(delta[chosen]), rejected


def base_threshold(epsilon: float, control_delta=None) -> float:
    """epsilon, and with controls the best control's delta + epsilon (NaN if a control could not be scored:
    then no candidate clears it)."""
    if control_delta is None or len(control_delta) == 0:
        return float(epsilon)
    controls = np.asarray([np.nan if c is None else c for c in control_delta], dtype=np.float64)
    return float(max(epsilon, np.max(controls) + epsilon)) if np.isfinite(controls).all() else float("nan")


def help_threshold(base: float, decoy_deltas=(), margin: float = 0.0) -> float:
    """The value a candidate's delta must exceed: base and every decoy's delta, by margin (NaN if base is)."""
    return float(np.max([base, *decoy_deltas]) + margin)


def null_score(best_delta: float, group_best, base: float, room: float) -> float:
    """The pair's score in the decoy competition (see the module docstring). group_best: the best delta of each
    decoy group (stages/decoys.py:decoy_groups); room: the pair's headroom."""
    if not np.isfinite(base):
        return float("nan")
    ranked = sorted([best_delta, *group_best], reverse=True)
    if not (ranked[0] > base and room > 0):
        return 0.0
    size = (ranked[0] - max(ranked[1], base) if len(ranked) > 1 else ranked[0] - base) / room
    return float(size if best_delta > max(group_best, default=-np.inf) else -size)


# what pair_headroom reads of a row: a stage that calls it names these in its contract
HEADROOM_COLUMNS = ("scoring_mode", "temperature", "s_direct", "lse_direct")


def pair_headroom(row: dict) -> float:
    """The pair's headroom (stages/score.py) from its stored scores (HEADROOM_COLUMNS)."""
    return headroom(row["scoring_mode"], row["s_direct"], row["lse_direct"], row["temperature"])


def pair_margin(margin: float, room: float) -> float:
    """The group's margin (a share of the headroom) in the pair's delta units; inf where nothing can be gained
    (null_score is then 0, which no margin passes)."""
    return float(margin * room) if room > 0 else float("inf")


def side_threshold(row: dict, side: Side, base: float, margin: float, decoys_required: int) -> tuple[float, float]:
    """The side's help_threshold and its margin in the pair's delta units. Under the decoy rule (decoys_required
    > 0) `margin` is a share of the pair's headroom (pair_margin) and the threshold clears base and the side's
    decoys; under the bar rule it is in delta's units already and clears base alone. Labels (label_side) and
    rounds (satisfied) both take their threshold from here."""
    own = pair_margin(margin, pair_headroom(row)) if decoys_required else margin
    return help_threshold(base, decoy_deltas(row, side) if decoys_required else (), own), own


def decide(best_delta: Optional[float], threshold: Optional[float]) -> str:
    if best_delta is None or threshold is None:
        return UNDECIDED
    return REASON if best_delta > threshold else DIRECT


def decoy_deltas(row: dict, side: Side) -> list[float]:
    """The side's scored decoys' deltas (a decoy that could not be scored is left out)."""
    return [d["delta"] for d in row.get(side.decoys) or [] if d.get("delta") is not None]


def decoy_group_best(row: dict, side: Side, groups: int) -> list[float]:
    """The best delta of each of the side's decoy groups (stages/decoys.py:decoy_groups)."""
    decoys = row.get(side.decoys) or []
    scored = [[decoys[i]["delta"] for i in members if decoys[i].get("delta") is not None]
              for members in decoy_groups(decoys, groups)]
    return [max(deltas) for deltas in scored if deltas]


def tested(row: dict, side: Side, decoys_required: int) -> bool:
    """Whether the side can be labelled: a valid candidate, and under the decoy rule (decoys_required > 0) at
    least that many scored decoys."""
    return row.get(side.column("best_delta")) is not None and len(decoy_deltas(row, side)) >= decoys_required


def satisfied(row: dict, side: Side, epsilon: float, margin: float, decoys_required: int = 0) -> bool:
    """Whether a later round of generation may skip this side of the pair (stages/generate.py): a valid candidate
    already beats the side's help_threshold with the rounds' margin in place of the group's, in the same units
    (under the decoy rule a share of the pair's headroom; under the bar rule the pair has no decoys and the
    threshold is base + margin, in delta's units). A pair stops only where a full-K run finds the same: the
    threshold does not move as candidates are added, so the best candidate's win stands."""
    if not tested({**row, side.column("best_delta"): 0.0}, side, decoys_required):
        return False
    best = choose_side(row, side)[1]
    threshold, _ = side_threshold(row, side, base_threshold(epsilon, row.get(side.column("control_delta"))), margin,
                                  decoys_required)
    return best is not None and best > threshold


def _nan(x) -> float:
    return np.nan if x is None else x


def choose_side(row: dict, side: Side) -> tuple[Optional[int], Optional[float], list[int]]:
    """choose() over the side's stored candidates."""
    cands = row.get(side.candidates) or []
    return choose([_nan(c.get("delta")) for c in cands], [bool(c.get("valid")) for c in cands])


def score_side(row: dict, side: Side, epsilon: float, decoys_required: int = 0, groups: int = 1) -> None:
    """What one side's label needs and does not depend on other pairs: chosen, best_delta, rejected,
    base_threshold and, under the decoy rule, null_score."""
    cands = row.get(side.candidates) or []
    chosen, best, rejected = choose_side(row, side)
    base = base_threshold(epsilon, row.get(side.column("control_delta")))
    row[side.column("chosen")] = chosen
    row[side.column("chosen_generator")] = None if chosen is None else cands[chosen]["generator"]
    row[side.column("best_delta")] = best
    row[side.column("rejected")] = rejected
    row[side.column("base_threshold")] = base
    if decoys_required:
        row[side.column("null_score")] = (
            null_score(best, decoy_group_best(row, side, groups), base, pair_headroom(row))
            if tested(row, side, decoys_required) else None)


def label_side(row: dict, side: Side, margin: Optional[float], decoys_required: int = 0) -> None:
    """The side's decision from its stored scores: help_threshold with this margin (the bar rule: margin 0 and no
    decoys; the decoy rule: the group's margin, in shares of the pair's headroom), decision and need_reasoning.
    margin None: the pair's calibration group got no margin at which the false-discovery rate holds (every
    decoy-rule pair there is direct)."""
    base = row[side.column("base_threshold")]
    if not tested(row, side, decoys_required):
        threshold = own = None
    elif margin is None:
        threshold = own = float("inf")
    else:
        threshold, own = side_threshold(row, side, base, margin, decoys_required)
    decision = decide(row.get(side.column("best_delta")), threshold)
    row[side.column("help_threshold")] = threshold
    if decoys_required:
        row[side.column("null_margin")] = own
    row[side.column("decision")] = decision
    row[side.column("need_reasoning")] = None if decision == UNDECIDED else decision == REASON


def score_rows(rows: list[dict], epsilon: float, decoys_required: Optional[dict] = None,
               groups: int = 1) -> list[dict]:
    """Per pair, everything but the decision (quarantining a pair whose every candidate failed).
    decoys_required: per side name, the decoys the pair must have (the decoy rule), or None (the bar rule);
    groups: how many decoy groups they form (scoring.decision.decoys_per_candidate)."""
    for row in rows:
        if row.get("quarantine_reason"):
            continue
        cands = row.get("candidates") or []
        if cands and all(c.get("finish_reason") == "error" for c in cands):
            row["quarantine_reason"] = "generation_failed"
            row["quarantine_detail"] = f"all {len(cands)} candidates failed; first error: {cands[0].get('error')}"[:1000]
            continue
        for side in sides_of(row):
            score_side(row, side, epsilon, (decoys_required or {}).get(side.name, 0), groups)
    return rows


def label_rows(rows: list[dict], epsilon: float, margins=None, decoys_required: Optional[dict] = None) -> list[dict]:
    """Decisions and the joint choice of rows whose sides score_rows filled. margins: None under the bar rule;
    under the decoy rule a function (side, row) -> the margin of the row's calibration group (None: none)."""
    for row in rows:
        if row.get("quarantine_reason"):
            continue
        for side in sides_of(row):
            required = (decoys_required or {}).get(side.name, 0)
            label_side(row, side, 0.0 if margins is None else margins(side, row), required)
        if row.get("target_candidates") and row.get("candidates"):
            _select_joint(row, epsilon)
    return rows


def select_rows(rows: list[dict], epsilon: float) -> list[dict]:
    """The bar rule, whole: score_rows then label_rows (no decoys, no calibration)."""
    return label_rows(score_rows(rows, epsilon), epsilon)


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


def _select_joint(row: dict, epsilon: float) -> None:
    cands, targets = row["candidates"], row["target_candidates"]
    delta_joint = [[_nan(x) for x in (c.get("delta_joint") or [None] * len(targets))] for c in cands]
    (row["joint_query"], row["joint_target"], row["joint_delta"], row["joint_beats_query"],
     row["joint_beats_target"]) = select_joint(
        delta_joint, [bool(c.get("valid")) for c in cands], [bool(c.get("valid")) for c in targets],
        side_value(row["decision"], row["best_delta"]), side_value(row["target_decision"], row["target_best_delta"]),
        epsilon)


def turned_direct(by: str, epsilon: float, side: Side = QUERY):
    """Over output rows: the pairs that a part of the rule turned from reason to direct on this side. by
    "control": the best candidate clears epsilon but not the controls' bar; "null": it clears the bar but not the
    decoys (with the group's margin)."""
    import polars as pl  # the stages themselves run without polars (pipeline/plan.py:run_local on a bare machine)

    best, base = pl.col(side.column("best_delta")), pl.col(side.column("base_threshold"))
    direct = pl.col(side.column("decision")) == DIRECT
    stopped = (best > epsilon) & (best <= base) if by == "control" else best > base
    return (direct & stopped).fill_null(False)


def lacked_decoys(side: Side = QUERY):
    """Over output rows: the pairs undecided on this side although a candidate is valid, which `tested` leaves
    undecided only when too few decoys could be drawn for them."""
    import polars as pl

    return ((pl.col(side.column("decision")) == UNDECIDED) & pl.col(side.column("best_delta")).is_not_null()
            ).fill_null(False)


@dataclass(frozen=True)
class SelectSpec(StageSpec):
    """select over a batch: score_rows on the side(s) `sides` (and under the bar rule, decoys_required None,
    label_rows). decoys_required: per side name, the decoys a tested pair has (the decoy rule), in decoy_groups
    groups."""

    epsilon: float = 0.0
    sides: tuple[Side, ...] = (QUERY,)
    decoys_required: Optional[Mapping[str, int]] = None
    decoy_groups: int = 1

    def contract(self) -> Contract:
        per_side = ["chosen", "chosen_generator", "best_delta", "rejected", "base_threshold"]
        per_side += ["null_score"] if self.decoys_required else ["decision", "need_reasoning", "help_threshold"]
        # generation_failed: a pair whose every candidate errored is quarantined here
        reads = ["quarantine_reason", "candidates.finish_reason", "candidates.error"]
        writes = ["quarantine_reason", "quarantine_detail"]
        for side in self.sides:
            reads += [side.column("control_delta")] + [f"{side.candidates}.{name}" for name in
                                                       ("delta", "valid", "generator")]
            reads += [f"{side.decoys}.delta"] if self.decoys_required else []
            writes += [side.column(name) for name in per_side]
        if self.decoys_required:  # the headroom (stages/score.py)
            reads += HEADROOM_COLUMNS
        if len(self.sides) > 1 and not self.decoys_required:  # the joint choice compares the sides' decisions
            reads += ["candidates.delta_joint"]
            writes += JOINT_COLUMNS
        return Contract("select", tuple(reads), tuple(writes))


class Select:
    """Ray Data stage over a batch: score_rows (and under the bar rule label_rows) on the columns its contract
    names (pure numpy, no model). Under the decoy rule the decisions wait for the calibration over the whole
    job (stages/calibrate.py)."""

    def __init__(self, spec: SelectSpec):
        self.spec = spec
        self._contract = spec.contract()

    def __call__(self, batch: pa.Table) -> pa.Table:
        spec = self.spec
        if spec.decoys_required:
            return self._contract.apply(batch, lambda rows: score_rows(rows, spec.epsilon, dict(spec.decoys_required),
                                                                            spec.decoy_groups))
        return self._contract.apply(batch, lambda rows: select_rows(rows, spec.epsilon))


SelectSpec.stage = Select
