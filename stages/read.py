"""The read stage: input shards -> canonical pair records (the pair columns of WORK_SCHEMA).

The read tasks (pipeline/read_source.py) call this module; each job of the read lives in its own:
- stages/inputs/: finding the input, cutting it into fixed shards (`plan_shards`), and one module per
  `input.format` (mmeb JSONL/Parquet, hf save_to_disk, webdataset tars) behind one `records(spec)`;
- stages/validate.py: one record -> one row, or a reason code; its images read and decoded once, and kept as
  references (schemas IMAGE_REF: a file, a tar member's bytes, or inline bytes stored once per digest in the
  folder the spec names under "images_dir", OUTPUT/_images/), never as bytes: the model stages load what they
  need (stages/images.py);
- stages/duplicates.py: which row owns a pair_id, within a shard and across shards (`index_pair_ids`,
  `find_duplicates`);
- stages/negatives.py: in-shard negatives, for pair-aware scoring.

Each shard is read whole by one task (pipeline/read_source.py) with `read_shard`, which returns exactly
`stop - start` rows; `read_shard_table` makes them a WORK_SCHEMA table checked against CONTRACT. Bad rows
are never dropped: they come back with `quarantine_reason` (a code of schemas/reasons.py), `quarantine_detail`, `raw` (the
record as text, truncated) and the identity fields that could be recovered. A bad negative quarantines its
row. Without `input.image_root`, image paths are relative to the folder holding the input file.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import pyarrow as pa

import schemas  # the current version (schemas/__init__.py re-exports it)
from stages.contract import Contract
from stages.duplicates import Owners
from stages.images import InlineStore
from stages.inputs import records
from stages.inputs.base import RAW_MAX_CHARS, Bad
from stages.negatives import add_in_shard_negatives
from stages.validate import ImageChecker, blank_row, check_images, parse_row


# The reader writes the pair columns and nothing else: every later column is null in what it hands on.
CONTRACT = Contract("read", (), tuple(schemas.PAIR_COLUMNS))


@dataclass(frozen=True)
class ReadSpec:
    """The read's parameters, whatever the shard: what a record may hold, and the in-shard negatives drawn for
    each row (a shard itself is a JSON-able spec of stages/inputs:plan_shards)."""

    max_image_pixels: int
    max_query_chars: int
    in_shard_negatives: int
    seed: int

    @classmethod
    def from_input(cls, input_cfg: Mapping, in_shard_negatives: int, seed: int) -> "ReadSpec":
        """From the config's `input` section (typed or a plain dict; defaults: configs/default.yaml) and
        scoring.in_shard_negatives and scoring.seed."""
        return cls(int(input_cfg["max_image_pixels"]), int(input_cfg["max_query_chars"]), int(in_shard_negatives),
                   int(seed))


def read_shard_table(spec: dict, read: ReadSpec) -> pa.Table:
    """`read_shard` as one WORK_SCHEMA table, checked against the reader's CONTRACT (pipeline/read_source.py's
    read tasks, pipeline/plan.py:run_local)."""
    table = schemas.conform(read_shard(spec, read), schemas.WORK_SCHEMA)
    CONTRACT.check_source(table)
    return table


def read_shard(spec: dict, read: ReadSpec) -> list[dict]:
    """One dict per input row of the shard (stop - start of them), with the pair
    columns of WORK_SCHEMA. A spec may name, under "duplicates", the file written
    by `find_duplicates`: its rows for this shard are quarantined as duplicates of
    a pair_id that an earlier shard holds; and under "images_dir" the folder where
    inline image bytes that no input file holds as they are get stored
    (stages/images.py:InlineStore; pipeline/plan.py names OUTPUT/_images)."""
    checker = ImageChecker(Path(spec["image_root"]), read.max_image_pixels, InlineStore(spec.get("images_dir")))
    owners = Owners(spec)
    rows = []
    for row_index, record in enumerate(records(spec, checker.max_bytes)):
        row = blank_row(spec, row_index)
        try:
            if record.error is not None:
                raise record.error
            images = parse_row(row, record.fields, read.max_query_chars)
            owner = owners.other_owner(row["pair_id"], row_index)
            if owner is not None:
                raise Bad("duplicate_pair_id", f"same pair_id as {owner}")
            check_images(row, images, checker)
        except Bad as bad:
            _quarantine(row, bad, record.raw)
        rows.append(row)
    add_in_shard_negatives(rows, read.in_shard_negatives, read.seed, int(spec["shard_id"]))
    for row in rows:
        row["shard_size"] = len(rows)  # the writer commits a shard once it holds this many rows
    return rows


def _quarantine(row: dict, bad: Bad, raw: Callable[[], str]) -> None:
    row.update(
        quarantine_reason=bad.reason,
        quarantine_detail=bad.detail,
        raw=_truncate(raw()),
        # image references stay out of the quarantine; paths and texts stay for diagnosis
        query_image=None,
        target_image=None,
        negatives=[],
    )


def _truncate(text: str) -> str:
    return text if len(text) <= RAW_MAX_CHARS else text[:RAW_MAX_CHARS] + "...[truncated]"
