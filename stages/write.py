"""Write labelled pairs: stage parts, then commit whole shards exactly once.

Ray may batch rows of one input shard into several batches, and several shards into one batch. So:
1. `WriteParts` (a Ray Data task) writes each batch's rows of each shard to
   `_staging/shard-XXXXXX/` as part files (good rows and quarantine rows apart), and returns one small
   record per part: shard id, shard size, row counts.
2. The driver adds those records up. Once a shard's parts hold all `shard_size` rows it read, `commit_shard`
   merges them into `data/shard-XXXXXX.parquet` (and `quarantine/shard-XXXXXX.parquet`), each through a
   temporary name and an atomic rename, and last writes `_commits/shard-XXXXXX.json`.

A shard counts as done only once its commit record exists. After a crash, a rerun skips the shards that have
one and redoes the others from scratch: nothing is lost and nothing is written twice.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from schemas import OUTPUT_SCHEMA, QUARANTINE_SCHEMA, conform

INPUTS = ("*",)  # every WORK_SCHEMA column
OUTPUTS = ("shard_id", "shard_size", "part", "rows", "quarantine_part", "quarantine_rows")

PART_META = pa.schema(
    [
        pa.field("shard_id", pa.int64()),
        pa.field("shard_size", pa.int64()),
        pa.field("part", pa.string()),
        pa.field("rows", pa.int64()),
        pa.field("quarantine_part", pa.string()),
        pa.field("quarantine_rows", pa.int64()),
    ]
)


def shard_name(shard_id: int) -> str:
    return f"shard-{shard_id:06d}"


def atomic_write_table(table: pa.Table, path: Path, compression: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    pq.write_table(table, tmp, compression=compression)
    os.replace(tmp, path)


def atomic_write_json(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def to_output_row(row: dict, provenance: dict) -> dict:
    out = dict(row)
    out["negatives"] = [
        {"text": n.get("text"), "image_path": n.get("image_path"), "origin": n.get("origin")}
        for n in row.get("negatives") or []
    ]
    out["provenance"] = provenance
    return out


def to_quarantine_row(row: dict) -> dict:
    return {**row, "reason": row["quarantine_reason"], "detail": row.get("quarantine_detail")}


class WriteParts:
    def __init__(self, out_dir: str, provenance: dict, compression: str):
        self.staging = Path(out_dir) / "_staging"
        self.provenance = provenance
        self.compression = compression

    def _write(self, rows: list[dict], schema: pa.Schema, shard_id: int, prefix: str) -> str | None:
        if not rows:
            return None
        folder = self.staging / shard_name(shard_id)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{prefix}-{uuid.uuid4().hex}.parquet"
        atomic_write_table(conform(rows, schema), path, self.compression)
        return str(path)

    def __call__(self, batch: pa.Table) -> pa.Table:
        by_shard: dict[int, list[dict]] = {}
        for row in batch.to_pylist():
            by_shard.setdefault(row["shard_id"], []).append(row)
        meta = []
        for shard_id, rows in sorted(by_shard.items()):
            good = [to_output_row(r, self.provenance) for r in rows if not r.get("quarantine_reason")]
            bad = [to_quarantine_row(r) for r in rows if r.get("quarantine_reason")]
            meta.append(
                {
                    "shard_id": shard_id,
                    "shard_size": rows[0]["shard_size"],
                    "part": self._write(good, OUTPUT_SCHEMA, shard_id, "part"),
                    "rows": len(good),
                    "quarantine_part": self._write(bad, QUARANTINE_SCHEMA, shard_id, "quarantine"),
                    "quarantine_rows": len(bad),
                }
            )
        return pa.Table.from_pylist(meta, schema=PART_META)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _merge(parts: list[str], schema: pa.Schema, dest: Path, compression: str) -> int:
    """Parts -> one file, rows in input order, so a shard's bytes do not depend on how Ray batched it."""
    tables = [pq.read_table(p, schema=schema) for p in parts]
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    table = table.sort_by([("row_index", "ascending")])
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_table(table.replace_schema_metadata(schema.metadata), dest, compression)
    return table.num_rows


def commit_shard(out_dir: str, shard_id: int, parts: list[str], quarantine_parts: list[str], compression: str) -> dict:
    out = Path(out_dir)
    name = shard_name(shard_id)
    record = {"shard_id": shard_id, "path": None, "rows": 0, "sha256": None,
              "quarantine_path": None, "quarantine_rows": 0}
    if parts:
        dest = out / "data" / f"{name}.parquet"
        record.update(path=f"data/{name}.parquet", rows=_merge(parts, OUTPUT_SCHEMA, dest, compression),
                      sha256=_sha256(dest))
    if quarantine_parts:
        dest = out / "quarantine" / f"{name}.parquet"
        record.update(quarantine_path=f"quarantine/{name}.parquet",
                      quarantine_rows=_merge(quarantine_parts, QUARANTINE_SCHEMA, dest, compression))
    commits = out / "_commits"
    commits.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record, commits / f"{name}.json")  # the commit point
    shutil.rmtree(out / "_staging" / name, ignore_errors=True)
    return record
