"""The numbers behind `pairsel report`: every figure, table and summary line is drawn from `compute`'s dict.

Everything is aggregated lazily by polars over OUT/data/*.parquet, so the report of a 10 GB output costs a
few small aggregates, not the output: candidate texts are never collected, and the delta-vs-length scatter
uses a seeded sample of at most `max_points` candidates.

Every pair has one of three outcomes (stages/select.py): reason, direct, undecided (no valid candidate, so
reasoning was never tested). They are counted apart per subset, with the pairs that the content-free control
turned from reason to direct. Every percentage (tables, figures, summary, the dataset card) is written by
`percent`.
"""
from __future__ import annotations

import math
from typing import Optional

import polars as pl

from pipeline.read_output import quarantine_files, read_manifest, scan_pairs
from stages.calibrate import group_expr
from stages.side import SIDES

DEFAULT_MAX_POINTS = 20_000
HISTOGRAM_BINS = 30
SAMPLE_SEED = 0
_HASH_RANGE = 1 << 32


def percent(x: Optional[float]) -> str:
    """The one way a share is written in the report: tables, figures and the summary alike."""
    return "n/a" if x is None else f"{x:.1%}"


def _stats(col: str) -> list[pl.Expr]:
    c = pl.col(col)
    return [
        c.count().alias(f"{col}:n"),
        c.null_count().alias(f"{col}:null"),
        c.min().alias(f"{col}:min"),
        c.quantile(0.25, interpolation="linear").alias(f"{col}:q1"),
        c.median().alias(f"{col}:median"),
        c.quantile(0.75, interpolation="linear").alias(f"{col}:q3"),
        c.max().alias(f"{col}:max"),
        c.mean().alias(f"{col}:mean"),
    ]


def _unpack_stats(row: dict, col: str) -> dict:
    return {k.split(":", 1)[1]: v for k, v in row.items() if k.startswith(f"{col}:")}


def _candidates(lf: pl.LazyFrame) -> pl.LazyFrame:
    """One row per candidate, numeric fields only (the texts stay on disk)."""
    fields = ("generator", "tokens", "finish_reason", "delta", "valid", "delta_control")
    return lf.select("candidates").explode("candidates").select(pl.col("candidates").struct.field(*fields))


def compute(out_dir, max_points: int = DEFAULT_MAX_POINTS, seed: int = SAMPLE_SEED) -> dict:
    """The numbers behind every figure (see module doc); only aggregates are collected."""
    from pipeline.manifest import OUTCOME_KEYS, outcome_counts, outcomes_by_subset, target_side_stats

    lf = scan_pairs(out_dir)
    manifest = read_manifest(out_dir)
    prov = lf.select(
        pl.col("provenance").struct.field("config_hash").unique().sort().implode().alias("config_hashes"),
        pl.col("provenance").struct.field("epsilon").max().alias("epsilon"),
        pl.col("scoring_mode").unique().sort().implode().alias("scoring_modes"),
        pl.col("s_control").list.len().max().alias("controls"),
    ).collect().to_dicts()[0]
    epsilon = prov["epsilon"] or 0.0

    cands = _candidates(lf)
    # One collect_all: polars runs the aggregates together and shares their scans of the shards.
    outcomes, per_subset, per_gen, chosen, n_scored = pl.collect_all([
        outcomes_by_subset(lf, epsilon),
        lf.group_by("subset").agg(*_stats("best_delta"), *_stats("s_direct")).sort("subset"),
        cands.group_by("generator")
        .agg(pl.len().alias("candidates"), pl.col("valid").sum().alias("valid"), pl.col("tokens").sum().alias("tokens"),
             pl.col("delta").filter(pl.col("valid")).mean().alias("mean_delta"))
        .sort("generator"),
        # A chosen rationale is one that will be used: the pair needs reasoning (best delta > epsilon).
        lf.filter(pl.col("need_reasoning")).group_by("chosen_generator").agg(pl.len().alias("n")).sort("chosen_generator"),
        cands.filter(pl.col("delta").is_not_null()).select(pl.len()),
    ])
    subsets = per_subset.to_dicts()
    keys = OUTCOME_KEYS
    per_outcome = {r["subset"]: outcome_counts(*(int(r[k]) for k in keys)) for r in outcomes.to_dicts()}
    pairs = {s: o["pairs"] for s, o in per_outcome.items()}
    need = {s: o["need_reasoning"] for s, o in per_outcome.items()}
    total = sum(pairs.values())
    per_gen = per_gen.to_dicts()
    chosen_count = {r["chosen_generator"]: r["n"] for r in chosen.to_dicts()}
    n_chosen = sum(chosen_count.values())

    quarantine = {}
    if quarantine_files(out_dir):
        q = pl.scan_parquet(quarantine_files(out_dir)).group_by("reason").agg(pl.len().alias("n")).sort("reason")
        quarantine = {r["reason"]: r["n"] for r in q.collect().to_dicts()}

    return {
        "pairs": total,
        "pairs_per_subset": pairs,
        "need_reasoning_per_subset": need,
        "need_reasoning_rate": {s: need[s] / pairs[s] for s in pairs},
        "need_reasoning_overall": sum(need.values()) / total if total else 0.0,
        "outcomes_per_subset": per_outcome,
        "outcomes_overall": outcome_counts(*(sum(o[k] for o in per_outcome.values()) for k in keys)),
        "controls": int(prov["controls"] or 0),
        "best_delta": {r["subset"]: _unpack_stats(r, "best_delta") for r in subsets},
        "best_delta_histogram": _histograms(lf, list(pairs), pl.col("best_delta"), epsilon),
        # how far each tested pair's best rationale is above (reason) or below what it had to beat
        "over_threshold_histogram": _histograms(lf, list(pairs), pl.col("best_delta") - pl.col("help_threshold"), 0.0),
        "s_direct": {r["subset"]: _unpack_stats(r, "s_direct") for r in subsets},
        "delta_vs_length": _sample_delta_vs_length(cands, n_scored.item(), max_points, seed),
        "candidates_per_generator": {r["generator"]: {k: r[k] for k in ("candidates", "valid", "tokens", "mean_delta")}
                                     for r in per_gen},
        "tokens_per_generator": {r["generator"]: int(r["tokens"] or 0) for r in per_gen},
        "chosen_count": chosen_count,
        "chosen_share": {g: n / n_chosen for g, n in chosen_count.items()},
        "quarantine_by_reason": quarantine,
        "provenance": _provenance(manifest, prov),
        # generators[].k_target > 0: the target side's outcomes and the joint choice's wins (else None)
        "target_side": target_side_stats(lf, epsilon),
        "decision": _decision(lf, manifest),
    }


def _decision(lf: pl.LazyFrame, manifest: Optional[dict]) -> dict:
    """The rule (from the manifest) and, per side and calibration group, its margin, estimated false-discovery
    rate and the quartiles of the tested pairs' best_delta - help_threshold (how far the best rationale is above
    or below what it had to beat; the pair is reason where > 0)."""
    rule = dict((manifest or {}).get("decision") or {})
    group = group_expr(rule.get("group"))
    rule["over_threshold"] = {}
    for side in SIDES:
        best, threshold = pl.col(side.column("best_delta")), pl.col(side.column("help_threshold"))
        quartiles = (lf.filter(threshold.is_not_null() & threshold.is_finite())
                     .group_by(group.alias("group"))
                     .agg(pl.len().alias("n"), *[(best - threshold).quantile(q, interpolation="linear").alias(name)
                                                 for q, name in ((0.05, "p5"), (0.25, "q1"), (0.5, "median"),
                                                                 (0.75, "q3"), (0.95, "p95"))])
                     .sort("group").collect())
        rule["over_threshold"][side.name] = {r.pop("group"): r for r in quartiles.to_dicts()}
    return rule


def _histograms(lf: pl.LazyFrame, subsets: list, value: pl.Expr, marker: float, bins: int = HISTOGRAM_BINS) -> dict:
    """Per subset, the counts of `value` (its finite values) in `bins` equal bins over the range of all subsets
    (the marker included, so that its line falls on the axis)."""
    scored = lf.select("subset", value.alias("value")).filter(pl.col("value").is_finite())
    lo, hi = scored.select(pl.col("value").min().alias("lo"), pl.col("value").max().alias("hi")).collect().row(0)
    if lo is None:
        return {"edges": [], "counts": {s: [] for s in subsets}, "marker": marker}
    lo, hi = min(lo, marker), max(hi, marker)
    if hi <= lo:
        hi = lo + 1e-9
    width = (hi - lo) / bins
    index = ((pl.col("value") - lo) / width).floor().cast(pl.Int64).clip(0, bins - 1).alias("bin")
    counted = scored.select("subset", index).group_by("subset", "bin").len().collect()
    counts = {s: [0] * bins for s in subsets}
    for r in counted.iter_rows(named=True):
        counts[r["subset"]][r["bin"]] = int(r["len"])
    return {"edges": [lo + i * width for i in range(bins + 1)], "counts": counts, "marker": marker}


def _sample_delta_vs_length(cands: pl.LazyFrame, n_scored: int, max_points: int, seed: int) -> dict:
    """A seeded sample of scored candidates (delta not null): at most max_points of them.

    LazyFrame has no sample(), so rows are kept where a seeded hash of their position falls under the
    wanted fraction; that streams, and the exact cap is applied to the (small) result."""
    scored = cands.filter(pl.col("delta").is_not_null())
    keep = min(1.0, max_points / n_scored) if n_scored else 1.0
    sample = scored.select("generator", "tokens", "delta", pl.col("valid").fill_null(False))
    if keep < 1.0:
        sample = sample.with_row_index("_i").filter(
            (pl.col("_i").hash(seed) % _HASH_RANGE) < int(keep * _HASH_RANGE)).drop("_i")
    df = sample.collect()
    if df.height > max_points:
        df = df.sample(n=max_points, seed=seed)
    valid = df.filter(pl.col("valid"))  # cut-off candidates pile up at the token cap: r is over valid ones
    r = valid.select(pl.corr("tokens", "delta")).item() if valid.height > 2 else None
    return {"n_scored": n_scored, "n_sampled": df.height,
            "pearson_r": None if r is None or not math.isfinite(r) else float(r),
            "generator": df["generator"].to_list(), "tokens": df["tokens"].to_list(), "delta": df["delta"].to_list(),
            "valid": df["valid"].to_list(), "n_sampled_valid": int(df["valid"].sum())}


def _provenance(manifest: Optional[dict], prov: dict) -> dict:
    out = {"manifest": manifest is not None, "config_hashes_in_data": prov["config_hashes"],
           "scoring_modes": prov["scoring_modes"], "epsilon": prov["epsilon"]}
    if manifest:
        out.update(
            status=manifest.get("status"), config_hash=manifest.get("config_hash"),
            pairsel_version=manifest.get("pairsel_version"), schema_version=manifest.get("schema_version"),
            started_at=manifest.get("started_at"), finished_at=manifest.get("finished_at"),
            wall_seconds=manifest.get("wall_seconds"),
            embedder=manifest.get("embedder"),
            generators={name: {"backend": g.get("backend"), "model": g.get("model")}
                        for name, g in (manifest.get("generators") or {}).items()},
        )
    return out
