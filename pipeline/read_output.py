"""Readers of a pairsel output folder, shared by report, show and export: the committed shards, the
quarantine shards, the manifest, and one lazy frame over every output row.

Only committed shards are read, and only as committed: the files that the commit records name (else the
manifest's list of them), each checked first against its record, size and sha256 (pipeline/verify.py); a damaged
output is refused with pipeline/verify.py:DamagedOutput, which names the first damaged shard. An output with no
records at all is read as its files are named (stages/files.py: SHARD_GLOB), so that the temporary files of
atomic writes (".shard-…tmp") and the "_" bookkeeping folders are never taken for data.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import polars as pl

from pipeline.verify import check_readable
from stages import layout
from stages.files import SHARD_GLOB


def _shard_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(folder.glob(f"{SHARD_GLOB}.parquet"))


# The last output checked, by its files' names, sizes and times: one reader (report reads the data and the
# quarantine files twice) hashes an unchanged output once.
_CHECKED: dict[tuple, list[dict]] = {}


def _stamp(out_dir) -> tuple:
    out = Path(out_dir).resolve()
    files = [out / layout.MANIFEST]
    files += [f for sub in (layout.COMMITS, layout.DATA, layout.QUARANTINE) for f in sorted((out / sub).glob("*"))]
    return (str(out), *((str(f), st.st_size, st.st_mtime_ns) for f in files if f.is_file() and (st := f.stat())))


def _committed(out_dir, key: str, sub: str) -> list[Path]:
    """The files of one kind (key: "path" or "quarantine_path") of the committed shards, in shard order, after
    checking every committed file; DamagedOutput if one differs from its record."""
    stamp = _stamp(out_dir)
    if stamp not in _CHECKED:
        records = check_readable(out_dir)  # raises before anything is remembered
        _CHECKED.clear()
        _CHECKED[stamp] = records
    records = _CHECKED[stamp]
    if not records:
        return _shard_files(Path(out_dir) / sub)
    return [Path(out_dir) / r[key] for r in records if r.get(key)]


def data_files(out_dir) -> list[Path]:
    """The committed output shards, OUT/data/shard-*.parquet, in shard order."""
    return _committed(out_dir, "path", layout.DATA)


def quarantine_files(out_dir) -> list[Path]:
    return _committed(out_dir, "quarantine_path", layout.QUARANTINE)


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
    path = Path(out_dir) / layout.MANIFEST
    return json.loads(path.read_text()) if path.exists() else None

