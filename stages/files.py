"""The names and the writing of pairsel's files: one helper for shard file names, one for atomic writes, one for
a file's sha256 (what a commit record holds, stages/write.py).

Shard names: shard N of the input is `shard-NNNNNN` everywhere (staged parts, output and quarantine files,
commit records, the pair_id index), zero-padded so that a sorted listing is shard order.

Atomic writes: a file is written under a temporary dot name beside its final name and renamed into place, so
that a reader sees the whole file or none. With `durable=True` (the default) the bytes and then the rename are
fsynced first: a commit record, or anything a later run trusts because it exists, must still be whole after
the machine dies (a preempted VM loses what was only in its page cache). Only a cache that checks its entries
on read (stages/embed_cache.py) writes with `durable=False`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from stages import layout

SHARD_GLOB = "shard-*"
# an output or quarantine shard file, and the temporary name atomic_write_table gives it on its way in
SHARD_FILE = re.compile(r"shard-(\d+)\.parquet")
TEMP_SHARD_FILE = re.compile(r"\.shard-\d+\.parquet\.[0-9a-f]{32}\.tmp")


def shard_name(shard_id: int) -> str:
    return f"shard-{int(shard_id):06d}"


def shard_file(shard_id: int, suffix: str = ".parquet") -> str:
    return shard_name(shard_id) + suffix


def commit_record_path(folder, shard_id: int) -> Path:
    """A shard's commit record in an output folder (the output dir, or OUT/_scored): stages/write.py writes it."""
    return Path(folder) / layout.COMMITS / shard_file(shard_id, ".json")


def read_commit_record(folder, shard_id: int) -> Optional[dict]:
    """The shard's commit record, or None if it has none (not committed)."""
    path = commit_record_path(folder, shard_id)
    return json.loads(path.read_text()) if path.is_file() else None


def temp_path(path: Path) -> Path:
    """Where `path` is written before its rename: a dot name (no reader globs it) unique to this writer, so
    two writers of one file never share a temporary."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync puts a rename inside it on disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], object], durable: bool = True) -> None:
    """Call `write(tmp)` to write the file at a temporary name, then rename it to `path`. A failed write
    leaves no temporary behind (a killed process may: its dot name is never read)."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        write(tmp)
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone already when the rename happened
    if durable:
        fsync_path(path.parent)


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data), durable)


def atomic_write_text(path: Path, text: str, durable: bool = True) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), durable)


def atomic_copy(source: Path, path: Path) -> None:
    """A copy of a file, byte for byte, written atomically."""
    atomic_write(path, lambda tmp: shutil.copyfile(source, tmp))


def atomic_write_json(obj, path: Path) -> None:
    # ensure_ascii (json's default) keeps the file ASCII, whatever the locale's encoding
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def atomic_write_table(table: pa.Table, path: Path, compression: str = "snappy", **options) -> None:
    """A Parquet file; `options` go to pyarrow.parquet.write_table (snappy is its default compression)."""
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression=compression, **options))


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes (hashlib reads it in chunks and releases the GIL while it hashes, so threads
    may hash several files at once)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
