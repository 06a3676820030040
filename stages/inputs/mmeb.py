"""MMEB-train input: JSON Lines (.jsonl/.json, optionally .gz) or Parquet, told apart by the extension.

Fields: `qry`, `qry_image_path`, `pos_text`, `pos_image_path`, `neg_text`, `neg_image_path` (neg_* a string or
a list; "" means none), optional `pair_id`/`id` and `subset`/`dataset`. Blank JSONL lines are not rows.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Iterator, Optional

import pyarrow as pa

from stages.inputs.base import Bad, Record, table_records

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
SUFFIXES = JSONL_SUFFIXES + (".parquet",)


def kind_of(src: Path) -> Optional[str]:
    """The shard kind that reads `src` ("jsonl" or "parquet"), None if mmeb does not read it."""
    if src.name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if src.name.endswith(".parquet"):
        return "parquet"
    return None


def count(src: Path, per: int) -> tuple[int, Optional[list[int]]]:
    """Rows, and the byte offset of every per-th row where the file can be seeked (else None)."""
    if kind_of(src) == "jsonl":
        return _count_jsonl(src, per)
    import pyarrow.parquet as pq

    return pq.ParquetFile(src).metadata.num_rows, None


def records(spec: dict, max_member_bytes: int) -> Iterator[Record]:
    if spec["kind"] == "jsonl":
        return _jsonl_records(spec)
    return table_records(_parquet_rows(spec))


# --------------------------------------------------------------------------- JSON Lines


def _open_jsonl(src: Path):
    return gzip.open(src, "rb") if src.name.endswith(".gz") else open(src, "rb")


def _count_jsonl(src: Path, per: int) -> tuple[int, Optional[list[int]]]:
    """Rows (non-blank lines) and, for plain files, the byte offset of every
    per-th row, so that a task seeks to its shard instead of rereading the file."""
    seekable = not src.name.endswith(".gz")
    n, pos, offsets = 0, 0, []
    with _open_jsonl(src) as f:
        for line in f:
            if line.strip():
                if n == 0 and line.strip() in (b"[", b"{"):
                    raise ValueError(f"input.path: {src} looks like a JSON document, not JSON Lines")
                if n % per == 0:
                    offsets.append(pos)
                n += 1
            pos += len(line)
    return n, offsets if seekable else None


def _jsonl_records(spec: dict) -> Iterator[Record]:
    start, stop, offset = spec["start"], spec["stop"], spec["offset"]
    index = 0
    with _open_jsonl(Path(spec["source"])) as f:
        if offset is not None:
            f.seek(offset)
            index = start
        for line in f:
            if not line.strip():
                continue
            if index >= stop:
                break
            if index >= start:
                yield _jsonl_record(line)
            index += 1


def _jsonl_record(line: bytes) -> Record:
    raw = line.decode("utf-8", "replace").strip()
    try:
        text = line.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as e:
        return Record(None, Bad("not_utf8", str(e)), lambda: raw)
    try:
        obj = json.loads(text)
    except ValueError as e:
        return Record(None, Bad("malformed_record", f"not JSON: {e}"), lambda: raw)
    if not isinstance(obj, dict):
        return Record(None, Bad("malformed_record", f"expected a JSON object, got {type(obj).__name__}"), lambda: raw)
    return Record(obj, None, lambda: raw)


# --------------------------------------------------------------------------- Parquet


def _parquet_rows(spec: dict) -> pa.Table:
    """The shard's rows, reading only the row groups that hold them."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(spec["source"])
    start, stop = spec["start"], spec["stop"]
    groups, first, pos = [], None, 0
    for i in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(i).num_rows
        if pos < stop and pos + n > start:
            groups.append(i)
            first = pos if first is None else first
        pos += n
    if not groups:
        return pf.schema_arrow.empty_table()
    return pf.read_row_groups(groups).slice(start - first, stop - start)
