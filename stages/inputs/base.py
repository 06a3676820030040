"""What every input format hands the read stage: one `Record` per input row, `InlineImage` for an image the input
holds itself, and `Bad` for a row's problem."""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import pyarrow as pa

RAW_MAX_CHARS = 10_000  # a quarantined row keeps at most this much of its record as text


class Bad(Exception):
    """A record problem: becomes the row's quarantine_reason (schemas/reasons.py) and detail."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Record:
    fields: Optional[dict]  # the record's fields, None if it could not be parsed
    error: Optional[Bad]  # a problem found while parsing
    raw: Callable[[], str]  # the record as text, built only for quarantine (most rows never need it)


@dataclass(frozen=True)
class InlineImage:
    """An image whose bytes are part of the input, named by `name` (a tar member). `at`: where the bytes can be
    read again as they are, (file, byte offset), for a member of an uncompressed tar; None if nowhere (a
    compressed tar), so the reader stores them (stages/images.py:InlineStore)."""

    data: bytes
    name: str
    at: Optional[tuple[str, int]] = None


def table_records(table: pa.Table) -> Iterator[Record]:
    """Records of the rows of an Arrow table (Parquet and HF inputs): already typed, so never unparsable."""
    for rec in table.to_pylist():
        yield Record(rec, None, functools.partial(dump, rec))


def dump(value: Any) -> str:
    """JSON of a record with bytes shown by size: quarantine keeps text, not images."""

    def placeholder(v):
        return f"<{len(v)} bytes>" if isinstance(v, (bytes, bytearray)) else repr(v)

    return json.dumps(value, ensure_ascii=False, default=placeholder)
