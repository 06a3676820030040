"""Write labelled pairs: stage parts, then commit whole shards exactly once.

Ray may batch rows of one input shard into several batches, and several shards into one batch. So:
1. `WriteParts` (a Ray Data task) writes each batch's rows of each shard to
   `_staging/shard-XXXXXX/` as part files (good rows and quarantine rows apart), and returns one small
   record per part: shard id, shard size, row counts.
2. The driver adds those records up. Once a shard's parts hold all `shard_size` rows it read, `commit_shard`
   merges them into `data/shard-XXXXXX.parquet` (and `quarantine/shard-XXXXXX.parquet`), each through a
   temporary name and an atomic rename, and last writes `_commits/shard-XXXXXX.json`: for each file its path,
   rows, bytes and sha256, and the schema version, which a resume and `pairsel verify` check the files against
   (pipeline/verify.py).

A shard counts as done only once its commit record exists. After a crash, a rerun skips the shards that have
one and redoes the others from scratch: nothing is lost and nothing is written twice.

Only the parts the driver names are merged, and a commit deletes only those: a part left by a task that died, or
by a retried task whose first attempt also wrote, is never read, so it cannot add a row twice. A commit checks
that its rows are exactly row_index 0..shard_size-1, and a commit that runs again (Ray retries a task whose
worker died) finds its record and returns it.
"""
from __future__ import annotations

import uuid
from collections import Counter
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from schemas import (CALIBRATED_COLUMNS, DECOY_RULE_COLUMNS, OUTPUT_SCHEMA, PART_META, QUARANTINE_SCHEMA,
                     SCHEMA_VERSION, TARGET_COLUMNS, WORK_SCHEMA, conform)
from stages import layout
from stages.contract import Contract
from stages.faults import fault_point
from stages.files import (atomic_copy, atomic_write_json, atomic_write_table, commit_record_path, file_sha256,
                          read_commit_record, shard_file, shard_name)
from stages.side import QUERY, TARGET, Side
from stages.spec import StageSpec


def to_output_row(row: dict, provenance: dict) -> dict:
    out = dict(row)
    out["negatives"] = [
        {"text": n.get("text"), "image_path": n.get("image_path"), "origin": n.get("origin")}
        for n in row.get("negatives") or []
    ]
    out["provenance"] = provenance
    return out


def to_work_table(output: pa.Table) -> pa.Table:
    """Output rows (OUTPUT_SCHEMA) back as WORK_SCHEMA rows, for the job's stages to run over again
    (pipeline/verify.py recomputes the labels so). What the output does not keep is null: the image references
    (`query_image`, `target_image`, `negatives[].image`), `shard_size`, the quarantine columns and `raw`;
    `provenance` is dropped. The inverse of to_output_row on every column the output keeps."""
    return conform(output.to_pylist(), WORK_SCHEMA)


def to_quarantine_row(row: dict) -> dict:
    return {**row, "reason": row["quarantine_reason"], "detail": row.get("quarantine_detail")}


@dataclass(frozen=True)
class WriteSpec(StageSpec):
    """The writer of the plan: stages parts under `staging` (OUT/_staging). sides: without the target side nothing
    writes the target columns, and their output columns are null as they would be anyway. decoys: the decoy rule,
    whose decisions the calibration fills after the whole job (schemas CALIBRATED_COLUMNS); without it the decoy
    columns stay null."""

    staging: str
    provenance: Mapping[str, Any]
    compression: str = "snappy"
    sides: tuple[Side, ...] = (QUERY,)
    decoys: bool = False

    def contract(self) -> Contract:
        """The columns the writer reads (it writes none: its output is PART_META, not rows), from the output
        and quarantine schemas."""
        reads = [n for n in OUTPUT_SCHEMA.names if n not in ("negatives", "provenance")]
        reads += [f"negatives.{f.name}" for f in OUTPUT_SCHEMA.field("negatives").type.value_type]
        reads += [n for n in QUARANTINE_SCHEMA.names if n not in ("reason", "detail")]
        reads += ["shard_size", "quarantine_reason", "quarantine_detail"]
        if TARGET not in self.sides:
            reads = [n for n in reads if n not in TARGET_COLUMNS]
        left = CALIBRATED_COLUMNS if self.decoys else DECOY_RULE_COLUMNS
        reads = [n for n in reads if n not in left]
        return Contract("write", tuple(reads), ())


class WriteParts:
    """Ray Data task: stages a batch's rows as part files and returns PART_META. It sees only the columns of its
    contract: what the output and quarantine shards hold (image references never reach it)."""

    def __init__(self, spec: WriteSpec):
        self._contract = spec.contract()
        self.staging = Path(spec.staging)
        self.provenance = dict(spec.provenance)
        self.compression = spec.compression

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
        for row in batch.select(self._contract.columns).to_pylist():
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
            fault_point("write", len(rows))
        return pa.Table.from_pylist(meta, schema=PART_META)


def _merge(parts: list[str], schema: pa.Schema, dest: Path, compression: str) -> pa.ChunkedArray:
    """Parts -> one file, rows in input order, so a shard's bytes do not depend on how Ray batched it.
    Returns the row_index column."""
    tables = [pq.read_table(p, schema=schema) for p in parts]
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    table = table.sort_by([("row_index", "ascending")])
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_table(table.replace_schema_metadata(schema.metadata), dest, compression)
    return table["row_index"]


def _check_rows(shard_id: int, size: int, *row_indices: pa.ChunkedArray) -> None:
    counts = Counter(i for column in row_indices for i in column.to_pylist())
    if set(counts) != set(range(size)) or any(n > 1 for n in counts.values()):
        twice = sorted(i for i, n in counts.items() if n > 1)[:10]
        missing = sorted(set(range(size)) - set(counts))[:10]
        raise RuntimeError(f"shard {shard_id}: parts hold {sum(counts.values())} rows for {size}; "
                           f"row_index twice: {twice}, missing: {missing}; not committed, rerun to redo it")


def _file_entry(out: Path, sub: str, shard_id: int, rows: int) -> dict:
    """A commit record's entry for the shard's file in `sub` (data: path, rows, bytes, sha256; quarantine: the same
    keys with the quarantine_ prefix)."""
    prefix = layout.RECORD_PREFIX[sub]
    dest = out / sub / shard_file(shard_id)
    return {f"{prefix}path": f"{sub}/{shard_file(shard_id)}", f"{prefix}rows": rows,
            f"{prefix}bytes": dest.stat().st_size, f"{prefix}sha256": file_sha256(dest)}


def _commit(out: Path, shard_id: int, record: dict) -> dict:
    """Write the shard's commit record, the commit point: its files are in place before."""
    fault_point("commit")  # the shard's files are in place, its record is not: a crash here must redo it
    commit_path = commit_record_path(out, shard_id)
    commit_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record, commit_path)
    return record


def _empty_record(shard_id: int) -> dict:
    return {"shard_id": shard_id, "schema_version": SCHEMA_VERSION, "path": None, "rows": 0, "bytes": None,
            "sha256": None, "quarantine_path": None, "quarantine_rows": 0, "quarantine_bytes": None,
            "quarantine_sha256": None}


def commit_shard(out_dir: str, shard_id: int, parts: list[str], quarantine_parts: list[str], compression: str,
                 size: int | None = None, staging_dir: str | None = None) -> dict:
    """Merge a shard's staged parts (in staging_dir, default OUT/_staging) into its files in out_dir and commit
    them."""
    out = Path(out_dir)
    name = shard_name(shard_id)
    done = read_commit_record(out, shard_id)
    if done is not None:  # a retry of a commit that got as far as its record
        return done
    record = _empty_record(shard_id)
    data_dest, quarantine_dest = out / layout.DATA / shard_file(shard_id), out / layout.QUARANTINE / shard_file(shard_id)
    good = _merge(parts, OUTPUT_SCHEMA, data_dest, compression) if parts else pa.chunked_array([], pa.int64())
    bad = (_merge(quarantine_parts, QUARANTINE_SCHEMA, quarantine_dest, compression) if quarantine_parts
           else pa.chunked_array([], pa.int64()))
    if size is not None:
        try:
            _check_rows(shard_id, size, good, bad)
        except RuntimeError:
            data_dest.unlink(missing_ok=True)
            quarantine_dest.unlink(missing_ok=True)
            raise
    if parts:
        record.update(_file_entry(out, layout.DATA, shard_id, len(good)))
    if quarantine_parts:
        record.update(_file_entry(out, layout.QUARANTINE, shard_id, len(bad)))
    _commit(out, shard_id, record)
    for part in parts + quarantine_parts:  # only our own parts: a rerun's may sit beside them
        Path(part).unlink(missing_ok=True)
    try:
        (Path(staging_dir or out / layout.STAGING) / name).rmdir()
    except OSError:  # not empty (a dead task's part) or already gone: the next run's cleanup takes it
        pass
    return record


def label_shard(out_dir: str, shard_id: int, scored_dir: str, labels: Callable[[list[dict]], None],
                compression: str) -> dict:
    """Under the decoy rule: the shard scored into `scored_dir` (committed there by commit_shard) with its
    decisions, `labels(rows)` filling them in place, committed into out_dir as commit_shard commits: data file,
    quarantine file (the same bytes) and record. The scored files stay until the job ends."""
    out, scored = Path(out_dir), Path(scored_dir)
    done = read_commit_record(out, shard_id)
    if done is not None:  # a retry of a commit that got as far as its record
        return done
    source = read_commit_record(scored, shard_id)
    record = _empty_record(shard_id)
    if source["path"]:
        table = pq.read_table(scored / source["path"], schema=OUTPUT_SCHEMA)
        rows = table.to_pylist()
        labels(rows)
        dest = out / layout.DATA / shard_file(shard_id)
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_table(conform(rows, OUTPUT_SCHEMA).replace_schema_metadata(OUTPUT_SCHEMA.metadata), dest,
                           compression)
        record.update(_file_entry(out, layout.DATA, shard_id, len(rows)))
    if source["quarantine_path"]:
        dest = out / layout.QUARANTINE / shard_file(shard_id)
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_copy(scored / source["quarantine_path"], dest)
        record.update(_file_entry(out, layout.QUARANTINE, shard_id, source["quarantine_rows"]))
    return _commit(out, shard_id, record)


WriteSpec.stage = WriteParts
