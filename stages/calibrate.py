"""The decoy rule's calibration: one margin per side and calibration group, so that the estimated false-discovery
rate of the group's reason labels is at most scoring.decision.fdr (pure numpy over the pairs' null_score).

Each tested pair of a group has a null_score T (stages/select.py): its candidates and its decoys form groups of
equal make-up (the candidates; the decoys in scoring.decision.decoys_per_candidate groups, each with one decoy per
candidate slot of each generator); T is +size if the candidates' best tops every decoy group, -size if a decoy
group does, size being how far the top group's best clears the runner-up group's best and the pair's bar, as a
share of the pair's headroom (stages/score.py: the most a delta of the pair can be). The pair is labelled reason
iff T > margin.

Why this controls the false-discovery rate: under the null that a pair's candidates carry no content about the
pair, its candidates and decoys are exchangeable draws (same generator, same template, same kind of text), so its
groups are exchangeable too. Size is a symmetric function of the groups' best values and of the plain pair (its
bar, its headroom), so the top group is the candidates' with probability c = 1 / (1 + decoy groups), independently
of size: the sign of T is a biased coin, independent of |T|. Then, for every margin s, the reason labels that
are wrong are estimated by the decoy wins above s, and

    FDR_hat(s) = c / (1 - c) * (1 + #{T < -s}) / max(1, #{T > s})

picked at the smallest s in {0} U {|T|} with FDR_hat(s) <= fdr is the knockoff+ filter (Barber and Candes 2015;
with c != 1/2 the Selective SeqStep+ form), which keeps the expected share of wrong reason labels among all
reason labels of the group at most fdr (multiple knockoffs: Gimenez and Zou 2019). c = slots / (slots + decoys)
of a pair: 1/2 by default (one decoy group). A pair counts its candidate slots, not its valid candidates: a pair
with fewer valid candidates than slots (cut-off texts, rounds that stop a pair early) wins less often by chance.
Why a difference and not the top's height above the bar: a decoy that beats the evidence by a hair then costs a
loss of a hair, which the margin can pass, where a loss as tall as the evidence would cost every win below it.

The guarantee needs no assumption on the score's distribution; it needs decoys that are no weaker than the
candidates would be without content. Decoys written for other targets carry content about something else, which
moves the score more than text about nothing: the rule errs on the safe side (measured in the README).
A group needs at least about c / (1 - c) / fdr winners (10 at fdr 0.1) before it can label any pair reason;
scoring.decision.group: job pools small subsets.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import numpy as np

from stages.decoys import decoy_counts
from stages.side import SIDES, Side, has_side, sides_of

NULL_GROUPS = ("subset", "job")  # scoring.decision.group (pipeline/config.py takes its choices from here)
JOB_GROUP = "*"


def win_chance(generators: list[dict], decoys_per_candidate: float) -> float:
    """c: the most a pair's candidates win the decoy competition by chance, on either side: its candidate slots
    over its slots and decoys (stages/decoys.py:decoy_counts; every pair of a side has the same)."""
    counts = decoy_counts(generators, decoys_per_candidate)
    slots = {side.name: sum(g.get(side.count_key, 0) for g in generators) for side in SIDES}
    return max(slots[name] / (slots[name] + sum(c.values())) for name, c in counts.items())


def knockoff_margin(scores, fdr: float, chance: float) -> dict:
    """The smallest s in {0} U {|T|} with FDR_hat(s) <= fdr, and the counts at it. margin None (and fdr_estimate
    the lowest FDR_hat over all s) when no s qualifies: the group labels no pair reason.

    The margin returned lies halfway between s and the next |T| (twice s above the largest), so that no score sits
    on it: it labels the same pairs as s, and a pair's label (best_delta > max(bar, best decoy) + margin) then
    agrees with the count here (T > margin) although rounding can split the two forms of that inequality at a
    tie, which s itself, being some pair's |T|, always is."""
    t = np.asarray(list(scores), dtype=np.float64)
    wins, losses = np.sort(t[t > 0]), np.sort(-t[t < 0])
    candidates = np.concatenate([[0.0], np.unique(np.concatenate([wins, losses]))])
    above_wins = len(wins) - np.searchsorted(wins, candidates, side="right")
    above_losses = len(losses) - np.searchsorted(losses, candidates, side="right")
    estimate = chance / (1 - chance) * (1 + above_losses) / np.maximum(1, above_wins)
    ok = np.flatnonzero(estimate <= fdr)
    i = int(ok[0]) if len(ok) else int(np.argmin(estimate))
    between = (candidates + np.append(candidates[1:], 3 * candidates[-1])) / 2
    return {"pairs": len(t), "wins": len(wins), "losses": len(losses),
            "margin": float(between[i]) if len(ok) else None,
            "reason": int(above_wins[i]) if len(ok) else 0,
            "decoy_wins_above": int(above_losses[i]),
            "fdr_estimate": float(min(estimate[i], 1.0))}


def group_key(subset: Optional[str], group: str) -> str:
    return JOB_GROUP if group == "job" else str(subset)


def group_expr(group: str):
    """group_key over output shards, as a polars expression of the subset column."""
    import polars as pl

    return pl.lit(JOB_GROUP) if group == "job" else pl.col("subset").cast(pl.String)


def calibrate(scores: Iterable[tuple[str, str, Optional[float]]], fdr: float, chance: float) -> list[dict]:
    """scores: (side, group key, null_score) of every tested pair (null_score None: untested, left out).
    Returns one record per (side, group): knockoff_margin's, with its side and group."""
    by_group: dict[tuple[str, str], list[float]] = {}
    for side, key, score in scores:
        if score is not None:
            by_group.setdefault((side, key), []).append(score)
    return [{"side": side, "group": key, **knockoff_margin(values, fdr, chance)}
            for (side, key), values in sorted(by_group.items())]


def margin_lookup(calibration: list[dict], group: str) -> Callable[[Side, dict], Optional[float]]:
    """(side, row) -> the margin of the row's group, for stages/select.py:label_rows."""
    margins = {(c["side"], c["group"]): c["margin"] for c in calibration}
    return lambda side, row: margins.get((side.name, group_key(row.get("subset"), group)))


def row_scores(rows: list[dict], group: str) -> Iterable[tuple[str, str, Optional[float]]]:
    """calibrate()'s input from rows held in memory (pipeline/plan.py:run_local)."""
    for row in rows:
        if row.get("quarantine_reason"):
            continue
        for side in sides_of(row):
            yield side.name, group_key(row.get("subset"), group), row.get(side.column("null_score"))


def output_scores(pairs, group: str) -> Iterable[tuple[str, str, Optional[float]]]:
    """calibrate()'s input from output shards (a polars LazyFrame of them): the same scores row_scores takes from
    rows, so that the manifest, the report and `pairsel verify` recompute the job's calibration from its output."""
    import polars as pl

    has = [has_side(side) for side in SIDES]
    df = pairs.select("subset", *[pl.when(h).then(pl.col(side.column("null_score"))).alias(side.name)
                                  for side, h in zip(SIDES, has)],
                      *[h.alias(f"has_{side.name}") for side, h in zip(SIDES, has)]).collect()
    for row in df.iter_rows(named=True):
        key = group_key(row["subset"], group)
        for side in SIDES:
            if row[f"has_{side.name}"]:
                yield side.name, key, row[side.name]
