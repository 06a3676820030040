"""manifest.json: what a finished job wrote, counted from the committed shards themselves.

The counts are computed with polars over the committed files (lazily, a few columns at a time), so a resumed
job reports the same numbers as one that never stopped.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import polars as pl

from pipeline import version
from pipeline.config import config_hash, to_dict
from schemas import SCHEMA_VERSION
from stages.write import atomic_write_json


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def commit_records(out_dir: Path) -> list[dict]:
    return sorted(
        (json.loads(p.read_text()) for p in (out_dir / "_commits").glob("shard-*.json")),
        key=lambda r: r["shard_id"],
    )


def _rate(num: int, den: int) -> float | None:
    return None if den == 0 else num / den


def _stats(out_dir: Path, records: list[dict]) -> dict:
    data = [str(out_dir / r["path"]) for r in records if r["path"]]
    quarantine = [str(out_dir / r["quarantine_path"]) for r in records if r["quarantine_path"]]
    written = sum(r["rows"] for r in records)
    quarantined = sum(r["quarantine_rows"] for r in records)
    stats = {
        "counts": {
            "pairs_read": written + quarantined,
            "pairs_written": written,
            "pairs_quarantined": quarantined,
            "need_reasoning": 0,
            "need_reasoning_rate": None,
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
    subsets = (
        pairs.group_by("subset")
        .agg(pl.len().alias("pairs"), pl.col("need_reasoning").sum().alias("need_reasoning"))
        .sort("subset")
        .collect()
    )
    for s in subsets.iter_rows(named=True):
        stats["subsets"][s["subset"]] = {
            "pairs": s["pairs"], "need_reasoning": s["need_reasoning"],
            "need_reasoning_rate": _rate(s["need_reasoning"], s["pairs"]),
        }
    counts["need_reasoning"] = int(subsets["need_reasoning"].sum())
    counts["need_reasoning_rate"] = _rate(counts["need_reasoning"], written)

    cands = pairs.select(pl.col("candidates").explode()).unnest("candidates")
    per_gen = (
        cands.group_by("generator")
        .agg(
            pl.len().alias("candidates"),
            pl.col("valid").sum().alias("valid"),
            pl.col("delta").filter(pl.col("valid")).mean().alias("mean_delta"),
            pl.col("tokens").sum().alias("tokens"),
            pl.col("model").first().alias("model"),
        )
        .collect()
    )
    chosen = pairs.filter(pl.col("need_reasoning")).group_by("chosen_generator").len().collect()
    chosen = dict(zip(chosen["chosen_generator"], chosen["len"]))
    total_chosen = sum(chosen.values())
    for g in per_gen.sort("generator").iter_rows(named=True):
        if g["generator"] is None:
            continue
        stats["generators"][g["generator"]] = {
            "model": g["model"], "candidates": g["candidates"], "valid": g["valid"],
            "chosen": chosen.get(g["generator"], 0),
            "chosen_share": _rate(chosen.get(g["generator"], 0), total_chosen),
            "mean_delta": g["mean_delta"], "tokens": g["tokens"],
        }
    counts["candidates"] = int(per_gen["candidates"].sum())
    counts["tokens_generated"] = int(per_gen["tokens"].sum())
    invalid = cands.filter(~pl.col("valid").fill_null(False)).group_by("finish_reason").len().collect()
    counts["candidates_invalid_by_reason"] = dict(sorted(zip(invalid["finish_reason"], invalid["len"])))
    return stats


def build(out_dir: str | Path, cfg, started_at: str, wall_seconds: float, planned_shards: int) -> dict:
    out_dir = Path(out_dir)
    records = commit_records(out_dir)
    stats = _stats(out_dir, records)
    generator_info = {g.name: {"backend": g.backend, "model": g.model} for g in cfg.generators}
    for name, info in generator_info.items():
        stats["generators"].setdefault(name, {}).update(info)
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
        "embedder": {"backend": cfg.embedder.backend, "model": cfg.embedder.model},
        "shards": records,
    }


def write(out_dir: str | Path, manifest: dict) -> Path:
    path = Path(out_dir) / "manifest.json"
    atomic_write_json(manifest, path)
    return path

