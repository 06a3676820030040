"""manifest.json: what a finished job wrote, counted from the committed shards themselves.

The counts are computed with polars over the committed files (lazily, a few columns at a time), so a resumed
job reports the same numbers as one that never stopped.
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import polars as pl

from pipeline import version
from pipeline.config import config_hash, to_dict
from pipeline.verify import DamagedOutput, read_commit_records
from schemas import SCHEMA_VERSION
from stages import layout
from stages.calibrate import calibrate, output_scores, win_chance
from stages.select import DIRECT, REASON, UNDECIDED, lacked_decoys, turned_direct
from stages.side import QUERY, TARGET, Side, has_side
from stages.files import atomic_write_json


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def commit_records(out_dir: Path) -> list[dict]:
    """The job's commit records in shard order, all of them readable (what the manifest counts): a record that does
    not read is a damaged output, not a shard to leave out."""
    records, unreadable = read_commit_records(out_dir)
    if unreadable:
        raise DamagedOutput(out_dir, unreadable)
    return records


def _rate(num: int, den: int) -> float | None:
    return None if den == 0 else num / den


def outcome_counts(pairs: int, reason: int, direct: int, undecided: int, control_turned: int,
                   null_turned: int, undecided_few_decoys: int) -> dict:
    """The three outcomes of a set of pairs, each with its share of the pairs (the shares add up to 1), how
    many pairs the content-free control and the decoys turned from reason to direct, and how many are undecided
    with a valid candidate: too few decoys could be drawn for them (the rest had no valid candidate)."""
    return {"pairs": pairs, "need_reasoning": reason, "direct": direct, "undecided": undecided,
            "need_reasoning_rate": _rate(reason, pairs), "direct_rate": _rate(direct, pairs),
            "undecided_rate": _rate(undecided, pairs), "control_turned_direct": control_turned,
            "null_turned_direct": null_turned, "undecided_few_decoys": undecided_few_decoys}


def outcomes_by_subset(pairs: pl.LazyFrame, epsilon: float, side: Side = QUERY) -> pl.LazyFrame:
    """Per subset: pairs, need_reasoning (decision reason), direct, undecided, control_turned_direct,
    null_turned_direct (stages/select.py:turned_direct), undecided_few_decoys (stages/select.py:lacked_decoys), of
    one side (query: `decision`; target: `target_decision`, over the pairs that have target candidates)."""
    decision = pl.col(side.column("decision"))
    return (pairs.filter(has_side(side)).group_by("subset")
            .agg(pl.len().alias("pairs"),
                 (decision == REASON).sum().alias("need_reasoning"),
                 (decision == DIRECT).sum().alias("direct"),
                 (decision == UNDECIDED).sum().alias("undecided"),
                 turned_direct("control", epsilon, side).sum().alias("control_turned_direct"),
                 turned_direct("null", epsilon, side).sum().alias("null_turned_direct"),
                 lacked_decoys(side).sum().alias("undecided_few_decoys"))
            .sort("subset"))


def decision_rule(pairs: Optional[pl.LazyFrame], cfg) -> dict:
    """The rule the labels were decided by, its parameters and what it promises; under the decoy rule also the
    calibration of every side and group, recomputed from the output (stages/calibrate.py)."""
    rule = cfg.scoring.decision
    out = {"rule": rule.rule, "epsilon": float(cfg.scoring.epsilon), "controls": len(cfg.scoring.controls)}
    if rule.rule != "decoys":
        out["promise"] = ("reason iff best_delta > help_threshold = epsilon (and the best control's delta + "
                          "epsilon): a fixed bar, no stated error rate")
        return out
    chance = win_chance(to_dict(cfg)["generators"], rule.decoys_per_candidate)
    out.update(fdr=float(rule.fdr), decoys_per_candidate=int(rule.decoys_per_candidate), group=rule.group,
               win_chance=chance, promise=(
                   f"reason iff best_delta > help_threshold = max(base_threshold, best decoy delta) + null_margin, "
                   f"null_margin = margin x the pair's headroom (-log p(t+ | q), or 1 - s_direct in cosine mode); "
                   f"per {rule.group} and side, the margin is set so that the estimated false-discovery rate of "
                   f"the reason labels is at most {rule.fdr:g} (knockoff+ over decoys: the expected share of reason "
                   f"labels whose rationales carry nothing about the pair stays under it, as far as the decoys move "
                   f"the score no less than the pair's own content-free rationales would)" + (
                       "; cosine mode sees the positive alone, and there a rationale that names an entity of the "
                       "target's kind beats the decoys more often than chance, so groups that mix pairs with and "
                       "without content can exceed the rate (README: a mixed group)"
                       if cfg.scoring.mode == "cosine" else "")))
    out["calibration"] = [] if pairs is None else calibrate(output_scores(pairs, rule.group), rule.fdr, chance)
    return out


def joint_by_subset(pairs: pl.LazyFrame) -> pl.LazyFrame:
    """Per subset, over pairs with a joint choice (a valid candidate on both sides): how often the joint
    (k, j) beats the query side's choice, the target side's, and both."""
    return (pairs.filter(pl.col("joint_delta").is_not_null()).group_by("subset")
            .agg(pl.len().alias("pairs_with_joint"),
                 pl.col("joint_beats_query").sum().alias("beats_query"),
                 pl.col("joint_beats_target").sum().alias("beats_target"),
                 (pl.col("joint_beats_query") & pl.col("joint_beats_target")).sum().alias("beats_both"))
            .sort("subset"))


OUTCOME_KEYS = ("pairs", "need_reasoning", "direct", "undecided", "control_turned_direct", "null_turned_direct",
                "undecided_few_decoys")
JOINT_KEYS = ("pairs_with_joint", "beats_query", "beats_target", "beats_both")


def target_side_stats(pairs: pl.LazyFrame, epsilon: float) -> dict | None:
    """The target side's outcomes (overall and per subset) and the joint choice's wins, or None when no pair
    has target candidates (generators[].k_target 0: the manifest of a query-side job is unchanged)."""
    subsets = outcomes_by_subset(pairs, epsilon, TARGET).collect()
    if subsets.is_empty():
        return None
    joint = {r["subset"]: {k: int(r[k]) for k in JOINT_KEYS} for r in joint_by_subset(pairs).collect().iter_rows(named=True)}
    none = dict.fromkeys(JOINT_KEYS, 0)
    out = {"counts": {**outcome_counts(*(int(subsets[k].sum()) for k in OUTCOME_KEYS)),
                      "joint": {k: sum(j[k] for j in joint.values()) for k in JOINT_KEYS}},
           "subsets": {}}
    for s in subsets.iter_rows(named=True):
        out["subsets"][s["subset"]] = {**outcome_counts(*(int(s[k]) for k in OUTCOME_KEYS)),
                                       "joint": joint.get(s["subset"], none)}
    return out


def _stats(out_dir: Path, records: list[dict], epsilon: float) -> dict:
    data = [str(out_dir / r["path"]) for r in records if r["path"]]
    quarantine = [str(out_dir / r["quarantine_path"]) for r in records if r["quarantine_path"]]
    written = sum(r["rows"] for r in records)
    quarantined = sum(r["quarantine_rows"] for r in records)
    stats = {
        "counts": {
            "pairs_read": written + quarantined,
            "pairs_written": written,
            "pairs_quarantined": quarantined,
            **{k: v for k, v in outcome_counts(written, 0, 0, 0, 0, 0, 0).items() if k != "pairs"},
            "quarantined_by_reason": {},
            "candidates": 0,
            "candidates_invalid_by_reason": {},
            "tokens_generated": 0,
        },
        "generators": {},
        "subsets": {},
    }
    counts = stats["counts"]
    if quarantine:
        by_reason = pl.scan_parquet(quarantine).group_by("reason").len().collect()
        counts["quarantined_by_reason"] = dict(sorted(zip(by_reason["reason"], by_reason["len"])))
    if not data:
        return stats
    pairs = pl.scan_parquet(data)
    keys = OUTCOME_KEYS
    subsets = outcomes_by_subset(pairs, epsilon).collect()
    for s in subsets.iter_rows(named=True):
        stats["subsets"][s["subset"]] = outcome_counts(*(int(s[k]) for k in keys))
    total = outcome_counts(*(int(subsets[k].sum()) for k in keys))
    counts.update({k: v for k, v in total.items() if k != "pairs"})

    target = target_side_stats(pairs, epsilon)
    if target is not None:
        stats["target_side"] = target
    cands = (pairs.select(pl.col("candidates").explode()).unnest("candidates")
             .filter(pl.col("generator").is_not_null()))  # a pair without candidates explodes to one null
    stats["generators"] = generator_stats(pairs, cands)
    counts["candidates"] = sum(g["candidates"] for g in stats["generators"].values())
    counts["tokens_generated"] = sum(g["tokens"] for g in stats["generators"].values())
    invalid = cands.filter(~pl.col("valid").fill_null(False)).group_by("finish_reason").len().collect()
    counts["candidates_invalid_by_reason"] = dict(sorted(zip(invalid["finish_reason"], invalid["len"])))
    return stats


def generator_stats(pairs: pl.LazyFrame, cands: pl.LazyFrame) -> dict:
    """Per generator: its candidates (valid, and invalid by finish_reason), how often its rationale is the
    one a pair keeps (chosen: need_reasoning pairs whose chosen_generator it is; chosen_share: of all such
    pairs), its mean delta over valid candidates, the mean best_delta where it was chosen, and tokens.
    Each figure is one polars query over the output columns, so users can reproduce it."""
    per_gen = (
        cands.group_by("generator")
        .agg(
            pl.len().alias("candidates"),
            pl.col("valid").fill_null(False).sum().alias("valid"),
            pl.col("delta").filter(pl.col("valid").fill_null(False)).mean().alias("mean_delta"),
            pl.col("tokens").sum().alias("tokens"),
            pl.col("model").first().alias("model"),
        )
        .sort("generator")
        .collect()
    )
    invalid = (cands.filter(~pl.col("valid").fill_null(False))
               .group_by("generator", "finish_reason").len().sort("generator", "finish_reason").collect())
    chosen = (
        pairs.filter(pl.col("need_reasoning"))
        .group_by("chosen_generator")
        .agg(pl.len().alias("chosen"), pl.col("best_delta").mean().alias("mean_chosen_delta"))
        .collect()
    )
    chosen = {r["chosen_generator"]: r for r in chosen.iter_rows(named=True)}
    total_chosen = sum(r["chosen"] for r in chosen.values())
    out = {}
    for g in per_gen.iter_rows(named=True):
        name = g["generator"]
        mine = chosen.get(name, {"chosen": 0, "mean_chosen_delta": None})
        out[name] = {
            "model": g["model"], "candidates": g["candidates"], "valid": g["valid"],
            "invalid_by_reason": {r["finish_reason"]: r["len"]
                                  for r in invalid.filter(pl.col("generator") == name).iter_rows(named=True)},
            "chosen": mine["chosen"], "chosen_share": _rate(mine["chosen"], total_chosen),
            "mean_delta": g["mean_delta"], "mean_chosen_delta": mine["mean_chosen_delta"], "tokens": g["tokens"],
        }
    return out


EMPTY_GENERATOR = {"candidates": 0, "valid": 0, "invalid_by_reason": {}, "chosen": 0, "chosen_share": None,
                   "mean_delta": None, "mean_chosen_delta": None, "tokens": 0}


def build(out_dir: str | Path, cfg, started_at: str, wall_seconds: float, planned_shards: int) -> dict:
    out_dir = Path(out_dir)
    records = commit_records(out_dir)
    stats = _stats(out_dir, records, float(cfg.scoring.epsilon))
    generator_info = {g.name: {"backend": g.backend, "model": g.model} for g in cfg.generators}
    # in config order; a generator without output gets zeros, one only in the output (a forced resume) stays
    found = stats["generators"]
    stats["generators"] = {name: {**EMPTY_GENERATOR, **found.pop(name, {}), **info}
                           for name, info in generator_info.items()}
    stats["generators"].update(found)
    data = [str(out_dir / r["path"]) for r in records if r["path"]]
    return {
        "pairsel_version": version(),
        "schema_version": SCHEMA_VERSION,
        "config_hash": config_hash(cfg),
        "config": to_dict(cfg),
        "status": "complete" if len(records) == planned_shards else "incomplete",
        "started_at": started_at,
        "finished_at": now_iso(),
        "wall_seconds": round(wall_seconds, 3),
        **stats,
        "decision": decision_rule(pl.scan_parquet(data) if data else None, cfg),
        "embedder": {"backend": cfg.embedder.backend, "model": cfg.embedder.model},
        "shards": records,
    }


def write(out_dir: str | Path, manifest: dict) -> Path:
    path = Path(out_dir) / layout.MANIFEST
    atomic_write_json(manifest, path)
    return path

