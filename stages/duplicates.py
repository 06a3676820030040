"""Which row owns a pair_id: the first row of a pair_id in input order (shard_id, row_index) keeps it,
whichever shard it is in; later ones are quarantined as duplicate_pair_id.

A row owns its pair_id once its record passes every check but the image ones (stages/validate.py:parse_row),
so the owner is known without opening an image. Within a shard, `Owners` sees that while the shard is read.
Across shards, a pass over the whole input before the read writes each shard's owned ids to a small file
(`index_pair_ids`), and one task finds the rows whose pair_id an earlier shard owns (`find_duplicates`). The
driver only passes file names around, so its memory does not grow with the input.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import pyarrow as pa

# the index files: one per shard (PAIR_KEYS, `pair_keys`), and the list of repeats (DUPLICATES, `find_duplicates`)
from schemas import DUPLICATES, PAIR_KEYS
from stages.files import SHARD_GLOB, atomic_write_table, shard_file
from stages.inputs import records
from stages.inputs.base import Bad
from stages.validate import ImageChecker, blank_row, parse_row

if TYPE_CHECKING:  # stages/read.py imports this module
    from stages.read import ReadSpec


class Owners:
    """The owners of the pair_ids that one shard's rows claim, as the shard is read in row order. A spec may
    name, under "duplicates", the file written by `find_duplicates`: its rows for this shard belong to a
    pair_id that an earlier shard holds."""

    def __init__(self, spec: dict):
        self.earlier = _earlier_owners(spec)
        self.first_in_shard: dict[str, int] = {}

    def other_owner(self, pair_id: str, row_index: int) -> Optional[str]:
        """Who owns `pair_id` if not this row (words for the quarantine detail); None: this row does."""
        owner = self.earlier.get(row_index)
        if owner is None:
            first = self.first_in_shard.setdefault(pair_id, row_index)
            owner = None if first == row_index else f"row {first} of this shard"
        return owner


def _earlier_owners(spec: dict) -> dict[int, str]:
    path = spec.get("duplicates")
    if not path:
        return {}
    import pyarrow.parquet as pq

    table = pq.read_table(path, filters=[("shard_id", "=", int(spec["shard_id"]))])
    return {r["row_index"]: f"row {r['first_row_index']} of shard {r['first_shard_id']}" for r in table.to_pylist()}


# --------------------------------------------------------------------------- the index across shards


def pair_keys(spec: dict, read: ReadSpec) -> pa.Table:
    """The pair_id of every row of the shard that owns it within the shard (PAIR_KEYS), as `read` parses it."""
    checker = ImageChecker(Path(spec["image_root"]), read.max_image_pixels)
    owned: dict[str, int] = {}
    for row_index, record in enumerate(records(spec, checker.max_bytes)):  # the checker opens no image here
        if record.error is not None:
            continue
        row = blank_row(spec, row_index)
        try:
            parse_row(row, record.fields, read.max_query_chars)
        except Bad:
            continue
        owned.setdefault(row["pair_id"], row_index)
    shard_id = int(spec["shard_id"])
    return pa.table({"pair_id": list(owned), "shard_id": [shard_id] * len(owned), "row_index": list(owned.values())},
                    schema=PAIR_KEYS)


def index_pair_ids(specs: list[dict], read: ReadSpec, index_dir: str) -> int:
    """Writes INDEX_DIR/shard-XXXXXX.parquet (`pair_keys`) for each shard; returns how many. A rerun trusts
    the files it finds there, so they are written durably."""
    for spec in specs:
        atomic_write_table(pair_keys(spec, read), Path(index_dir) / shard_file(spec["shard_id"]))
    return len(specs)


def find_duplicates(index_dir: str, dest: str) -> int:
    """Rows whose pair_id a lower shard owns, from the files of `index_pair_ids`, into `dest`
    (DUPLICATES, sorted by shard), returning their number. Holds one hash table of pair_ids (tens of bytes
    per pair): run it as a task, not in the driver."""
    import polars as pl

    keys = pl.scan_parquet(f"{index_dir}/{SHARD_GLOB}.parquet", schema=pl.Schema(PAIR_KEYS))
    owners = keys.group_by("pair_id").agg(
        pl.col("shard_id").min().alias("first_shard_id"),
        pl.col("row_index").sort_by("shard_id").first().alias("first_row_index"))
    dups = (keys.join(owners, on="pair_id")
            .filter(pl.col("shard_id") != pl.col("first_shard_id"))
            .select(DUPLICATES.names)
            .sort("shard_id", "row_index")
            .collect())
    atomic_write_table(dups.to_arrow().cast(DUPLICATES), Path(dest), row_group_size=4096)
    return dups.height
