"""Readers of a pairsel output folder, shared by report, show and export: the committed shards, the
quarantine shards, the manifest, and one lazy frame over every output row.

Only committed shards are read: their names come from stages/files.py (SHARD_GLOB), so the temporary files of
atomic writes (".shard-…tmp") and the "_" bookkeeping folders are never taken for data.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import polars as pl

from stages.files import SHARD_GLOB


def _shard_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(folder.glob(f"{SHARD_GLOB}.parquet"))


def data_files(out_dir) -> list[Path]:
    """The committed output shards, OUT/data/shard-*.parquet, in shard order."""
    return _shard_files(Path(out_dir) / "data")


def quarantine_files(out_dir) -> list[Path]:
    return _shard_files(Path(out_dir) / "quarantine")


def check_schema_version(files: list[Path]) -> None:
    """The output tools read the current schema only: say so plainly for shards of another version (from the
    footers, no data read) instead of failing on a missing column."""
    import pyarrow.parquet as pq

    from schemas import SCHEMA_VERSION

    found = sorted({(pq.read_schema(f).metadata or {}).get(b"pairsel.schema_version", b"?").decode() for f in files})
    if found != [str(SCHEMA_VERSION)]:
        raise SystemExit(f"{files[0].parent}: shards of schema version {', '.join(found)}; this pairsel reads version "
                         f"{SCHEMA_VERSION} (README: output schema): rerun the job with --overwrite")


def scan_pairs(out_dir) -> pl.LazyFrame:
    """A lazy frame over every output row; nothing is read until it is collected."""
    files = data_files(out_dir)
    if not files:
        raise SystemExit(f"no output shards in {Path(out_dir) / 'data'} (is {out_dir} a pairsel output folder?)")
    check_schema_version(files)
    return pl.scan_parquet(files)


def read_manifest(out_dir) -> Optional[dict]:
    """manifest.json, or None while the job has not finished (it is written last)."""
    path = Path(out_dir) / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else None

