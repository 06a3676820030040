"""Reading the input into canonical pair records (the pair columns of WORK_SCHEMA).

The input is cut into fixed shards on the driver by `plan_shards`, cheaply
(line counts, Parquet metadata, tar headers; no image is opened), and each
shard is read whole by one task with `read_shard`. Shard ids depend only on the
sorted input names and `rows_per_shard`, never on Ray's block layout, so a
resumed run sees the same shards, output shard N holds exactly input shard N,
and in-shard negatives can be drawn deterministically. A spec's `stop - start`
is the number of rows `read_shard` returns for it.

Formats (`input.format`):
- mmeb: JSON Lines (.jsonl/.json, optionally .gz) or Parquet (.parquet), told
  apart by extension, with the MMEB-train fields `qry`, `qry_image_path`,
  `pos_text`, `pos_image_path`, `neg_text`, `neg_image_path` (neg_* a string or
  a list; "" means none) and optional `pair_id`/`id` and `subset`/`dataset`.
  Blank JSONL lines are not rows.
- hf: folder(s) written by `datasets.save_to_disk`, with the same columns.
- webdataset: tar files. Members are grouped into samples by key as webdataset
  does (key = name up to the first dot of the base name; consecutive members with
  one key form a sample). A sample may carry `KEY.json` (an object with the MMEB
  fields, image paths relative to image_root) and/or members named by field:
  `KEY.qry.txt`, `KEY.pos.txt`, `KEY.neg.txt`, `KEY.neg1.txt`, ... for text and
  `KEY.qry.<ext>`, `KEY.pos.<ext>`, `KEY.neg.<ext>`, ... (ext jpg, png, ...) for
  inline images; members override the json's fields. Read with `tarfile`, not
  webdataset's iterators, because those silently skip links and do not flag
  unsafe names, and because planning needs header offsets.

An image field may hold a path (relative to image_root), raw bytes, or a
`{"bytes", "path"}` struct (how `datasets.Image` stores images); inline bytes
are used as they are. Paths must stay inside image_root after resolving `..`
and symlinks; absolute paths are refused. Without `input.image_root`, paths are
relative to the folder holding the input file. Each image is decoded once, by
`stages.images.decode_image`, to validate it; the row keeps the original bytes.

Bad rows are never dropped: they come back with `quarantine_reason` (one of
REASONS), `quarantine_detail`, `raw` (the record as text, truncated) and the
identity fields that could be recovered. A bad negative quarantines its row.
The first row of a pair_id in input order (by shard_id, then row_index) keeps
it, whichever shard it is in; later ones are quarantined as duplicate_pair_id.
A row claims its pair_id once its record passes every check but the image
ones (see "duplicates across shards" below).

pair_id, when the record has none, is a sha256 over the normalized query, target
and explicit negatives (texts, and image paths or, for path-less inline images,
a digest of the bytes); subset is not part of it, so the same pair gets the
same id in every format.
"""
from __future__ import annotations

import functools
import glob
import gzip
import hashlib
import json
import os
import re
import stat
import tarfile
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, Optional

import numpy as np
import pyarrow as pa

import schemas  # the current version (schemas/__init__.py re-exports it)
from stages.backends.base import IMAGE_MARKER
from stages.faults import fault_point
from stages.images import ImageError, decode_image

REASONS = (
    "image_missing",
    "image_empty",
    "image_corrupt",
    "image_too_large",
    "image_unsupported",
    "image_outside_root",
    "image_marker_without_image",  # text has <|image_1|> but that side has no image
    "empty_query",
    "missing_target",
    "wrong_type",
    "malformed_record",
    "not_utf8",
    "query_too_long",
    "duplicate_pair_id",
    "unsafe_member_name",  # tar member with an absolute name or a `..` part
    "unsafe_member_type",  # tar member that is a link, device or fifo
)

RAW_MAX_CHARS = 10_000
PAIR_ID_CHARS = 20
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
SPEC_KEYS = ("shard_id", "kind", "source", "start", "stop", "offset", "subset", "image_root")


class Bad(Exception):
    """A record problem: becomes the row's quarantine_reason and detail."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------- planning


def plan_shards(input_cfg) -> list[dict]:
    """Cut the input into fixed shards: JSON-able specs numbered in the order of
    the sorted input names, then position within each input."""
    fmt = input_cfg["format"]
    per = int(input_cfg["rows_per_shard"])
    if per < 1:
        raise ValueError("input.rows_per_shard: must be >= 1")
    sources = _sources(str(input_cfg["path"]), fmt)
    if not sources:
        raise FileNotFoundError(f"input.path: no {fmt} input found at {input_cfg['path']}")
    root = input_cfg.get("image_root")
    specs = []
    for src in sources:
        kind = _kind(src, fmt)
        for start, stop, offset in _ranges(src, kind, per):
            specs.append(
                {
                    "shard_id": len(specs),
                    "kind": kind,
                    "source": str(src),
                    "start": start,
                    "stop": stop,
                    # byte offset of row `start`, where the file can be seeked; else None
                    "offset": offset,
                    "subset": input_cfg.get("subset") or _stem(src),
                    # absolute, so that tasks don't depend on their working directory
                    "image_root": str(Path(root).resolve()) if root else str(src.parent),
                }
            )
    return specs


def _sources(path: str, fmt: str) -> list[Path]:
    if any(c in path for c in "*?["):
        found = [Path(p) for p in glob.glob(path, recursive=True)]
    else:
        found = [Path(path)] if Path(path).exists() else []
    out = set()
    for p in found:
        p = p.resolve()
        if p.is_dir() and _is_hf_dataset(p) and fmt != "hf":  # its .json files are not JSON Lines
            raise ValueError(f"input.format: {fmt} does not read {p}, a datasets save_to_disk folder; "
                             "input.format=hf reads it")
        if p.is_dir() and not (fmt == "hf" and _is_hf_dataset(p)):
            out.update(_inputs_under(p, fmt))
        else:
            out.add(p)
    return sorted(out, key=str)


def _inputs_under(folder: Path, fmt: str) -> list[Path]:
    if fmt == "hf":
        return [p.parent for p in folder.rglob("state.json")]
    suffixes = TAR_SUFFIXES if fmt == "webdataset" else JSONL_SUFFIXES + (".parquet",)
    return [p for p in folder.rglob("*") if p.is_file() and p.name.endswith(suffixes)]


def _is_hf_dataset(folder: Path) -> bool:
    return (folder / "state.json").is_file()


def _kind(src: Path, fmt: str) -> str:
    """What reads `src`; an input that input.format cannot read is a user error naming the key to fix."""
    if fmt == "hf":
        if not _is_hf_dataset(src):
            if src.is_file():
                raise ValueError(f"input.format: hf reads a datasets save_to_disk folder, but input.path {src} is "
                                 f"a file{_format_hint(src)}")
            raise ValueError(f"input.path: {src} is not a datasets save_to_disk folder (no state.json)")
        return "hf"
    if fmt == "webdataset":
        if not src.name.endswith(TAR_SUFFIXES):
            raise ValueError(f"input.format: webdataset reads tar files ({', '.join(TAR_SUFFIXES)}), but "
                             f"input.path {src} is not one{_format_hint(src)}")
        return "tar"
    if src.name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if src.name.endswith(".parquet"):
        return "parquet"
    raise ValueError(f"input.format: mmeb reads {', '.join(JSONL_SUFFIXES)} or .parquet files, but input.path "
                     f"{src} is not one{_format_hint(src)}")


def _format_hint(src: Path) -> str:
    """The input.format that does read `src`, as the end of a message."""
    if src.is_dir() and _is_hf_dataset(src):
        fmt = "hf"
    elif src.name.endswith(TAR_SUFFIXES):
        fmt = "webdataset"
    elif src.name.endswith(JSONL_SUFFIXES + (".parquet",)):
        fmt = "mmeb"
    else:
        return ""
    return f"; input.format={fmt} reads it"


def _stem(src: Path) -> str:
    if src.is_dir() and (src.parent / "dataset_dict.json").is_file():
        return src.parent.name  # a split folder of a DatasetDict: name it after the dict
    name = src.name
    for suffix in sorted(JSONL_SUFFIXES + TAR_SUFFIXES + (".parquet",), key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _ranges(src: Path, kind: str, per: int) -> list[tuple[int, int, Optional[int]]]:
    if kind == "jsonl":
        n, offsets = _count_jsonl(src, per)
    elif kind == "tar":
        n, offsets = _count_tar(src, per)
    elif kind == "parquet":
        import pyarrow.parquet as pq

        n, offsets = pq.ParquetFile(src).metadata.num_rows, None
    else:
        n, offsets = len(_load_hf(str(src))), None
    return [
        (start, min(start + per, n), offsets[i] if offsets else None)
        for i, start in enumerate(range(0, n, per))
    ]


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


def _open_jsonl(src: Path):
    return gzip.open(src, "rb") if src.name.endswith(".gz") else open(src, "rb")


def _count_tar(src: Path, per: int) -> tuple[int, Optional[list[int]]]:
    """Samples and, for uncompressed tars, the header offset of every per-th sample."""
    seekable = src.name.endswith(".tar")
    n, key, offsets = 0, None, []
    with tarfile.open(src, "r:*") as tf:
        for info in tf:
            tf.members = []  # keep memory flat on big tars
            if info.isdir():
                continue
            k = _sample_key(info.name)[0]
            if n == 0 or k != key:
                if n % per == 0:
                    offsets.append(info.offset)
                n += 1
                key = k
    return n, offsets if seekable else None


@functools.lru_cache(maxsize=8)
def _load_hf(path: str):
    import datasets  # heavy; only for hf input

    ds = datasets.load_from_disk(path)
    if not isinstance(ds, datasets.Dataset):
        raise ValueError(f"input.path: {path} holds a {type(ds).__name__}; point at one split's folder")
    return ds


# --------------------------------------------------------------------------- reading


@dataclass
class _Record:
    fields: Optional[dict]  # the record's fields, None if it could not be parsed
    error: Optional[Bad]  # a problem found while parsing
    raw: Callable[[], str]  # the record as text, built only for quarantine


def read_shards_batch(batch: pa.Table, input_cfg: dict, in_shard_negatives: int, seed: int,
                      duplicates=None) -> pa.Table:
    """`map_batches` body over a dataset of shard specs (one spec per batch is
    best: a shard is one task's work). `duplicates`: the file of `find_duplicates`,
    or the driver's Ray reference to the task that writes it (pipeline/run.py),
    which this read waits for."""
    if duplicates is not None and not isinstance(duplicates, str):
        import ray

        duplicates = ray.get(duplicates)["path"]
    rows = []
    for spec in batch.to_pylist():
        if duplicates is not None:
            spec = {**spec, "duplicates": duplicates}
        shard = read_shard(spec, input_cfg, in_shard_negatives, seed)
        fault_point("read", len(shard))
        rows.extend(shard)
    return schemas.conform(rows, schemas.WORK_SCHEMA)


def read_shard(spec: dict, input_cfg, in_shard_negatives: int, seed: int) -> list[dict]:
    """One dict per input row of the shard (stop - start of them), with the pair
    columns of WORK_SCHEMA. A spec may name, under "duplicates", the file written
    by `find_duplicates`: its rows for this shard are quarantined as duplicates of
    a pair_id that an earlier shard holds."""
    max_pixels = int(input_cfg.get("max_image_pixels") or 40_000_000)
    max_query_chars = int(input_cfg.get("max_query_chars") or 20_000)
    store = _ImageStore(Path(spec["image_root"]), max_pixels)
    earlier = _earlier_owners(spec)
    rows, first_in_shard = [], {}
    for row_index, record in enumerate(_records(spec, store.max_bytes)):
        row = _blank_row(spec, row_index)
        try:
            if record.error is not None:
                raise record.error
            images = _parse_row(row, record.fields, max_query_chars)
            owner = earlier.get(row_index)
            if owner is None:
                first = first_in_shard.setdefault(row["pair_id"], row_index)
                owner = None if first == row_index else f"row {first} of this shard"
            if owner is not None:
                raise Bad("duplicate_pair_id", f"same pair_id as {owner}")
            _load_images(row, images, store)
        except Bad as bad:
            _quarantine(row, bad, record.raw)
        rows.append(row)
    _add_in_shard_negatives(rows, in_shard_negatives, seed, int(spec["shard_id"]))
    for row in rows:
        row["shard_size"] = len(rows)  # the writer commits a shard once it holds this many rows
    return rows


# --------------------------------------------------------------------------- duplicates across shards
# The first row of a pair_id in input order (shard_id, row_index) owns it; a row
# owns its pair_id once its record passes every check but the image ones, so the
# owner is known without opening an image. Within a shard, read_shard sees that
# itself. Across shards, a pass over the whole input before the job writes each
# shard's owned ids to a small file (`index_pair_ids`), and one task finds
# the rows whose pair_id an earlier shard owns (`find_duplicates`). The driver
# only passes file names around, so its memory does not grow with the input.

PAIR_KEYS = pa.schema([pa.field("pair_id", pa.string()), pa.field("shard_id", pa.int64()),
                       pa.field("row_index", pa.int64())])
DUPLICATES = pa.schema([pa.field("shard_id", pa.int64()), pa.field("row_index", pa.int64()),
                        pa.field("pair_id", pa.string()), pa.field("first_shard_id", pa.int64()),
                        pa.field("first_row_index", pa.int64())])


def pair_keys(spec: dict, input_cfg) -> pa.Table:
    """The pair_id of every row of the shard that owns it within the shard (PAIR_KEYS)."""
    max_query_chars = int(input_cfg.get("max_query_chars") or 20_000)
    store = _ImageStore(Path(spec["image_root"]), int(input_cfg.get("max_image_pixels") or 40_000_000))
    owned: dict[str, int] = {}
    for row_index, record in enumerate(_records(spec, store.max_bytes)):  # the store opens no image here
        if record.error is not None:
            continue
        row = _blank_row(spec, row_index)
        try:
            _parse_row(row, record.fields, max_query_chars)
        except Bad:
            continue
        owned.setdefault(row["pair_id"], row_index)
    shard_id = int(spec["shard_id"])
    return pa.table({"pair_id": list(owned), "shard_id": [shard_id] * len(owned), "row_index": list(owned.values())},
                    schema=PAIR_KEYS)


def index_pair_ids(specs: list[dict], input_cfg: dict, index_dir: str) -> int:
    """Writes INDEX_DIR/shard-XXXXXX.parquet (`pair_keys`) for each shard; returns how many."""
    import pyarrow.parquet as pq

    for spec in specs:
        path = Path(index_dir) / f"shard-{int(spec['shard_id']):06d}.parquet"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        pq.write_table(pair_keys(spec, input_cfg), tmp)
        os.replace(tmp, path)
    return len(specs)


def find_duplicates(index_dir: str, dest: str) -> int:
    """Rows whose pair_id a lower shard owns, from the files of `index_pair_ids`, into `dest`
    (DUPLICATES, sorted by shard), returning their number. Holds one hash table of pair_ids (tens of bytes
    per pair): run it as a task, not in the driver."""
    import polars as pl
    import pyarrow.parquet as pq

    keys = pl.scan_parquet(f"{index_dir}/shard-*.parquet", schema=pl.Schema(PAIR_KEYS))
    owners = keys.group_by("pair_id").agg(
        pl.col("shard_id").min().alias("first_shard_id"),
        pl.col("row_index").sort_by("shard_id").first().alias("first_row_index"))
    dups = (keys.join(owners, on="pair_id")
            .filter(pl.col("shard_id") != pl.col("first_shard_id"))
            .select(DUPLICATES.names)
            .sort("shard_id", "row_index")
            .collect())
    tmp = f"{dest}.{os.getpid()}.tmp"
    pq.write_table(dups.to_arrow().cast(DUPLICATES), tmp, row_group_size=4096)
    os.replace(tmp, dest)
    return dups.height


def _earlier_owners(spec: dict) -> dict[int, str]:
    path = spec.get("duplicates")
    if not path:
        return {}
    import pyarrow.parquet as pq

    table = pq.read_table(path, filters=[("shard_id", "=", int(spec["shard_id"]))])
    return {r["row_index"]: f"row {r['first_row_index']} of shard {r['first_shard_id']}" for r in table.to_pylist()}


def _blank_row(spec: dict, row_index: int) -> dict:
    row = dict.fromkeys(schemas.PAIR_COLUMNS)
    row.update(
        subset=spec["subset"],
        source=spec["source"],
        shard_id=int(spec["shard_id"]),
        row_index=row_index,
        negatives=[],
    )
    return row


def _quarantine(row: dict, bad: Bad, raw: Callable[[], str]) -> None:
    row.update(
        quarantine_reason=bad.reason,
        quarantine_detail=bad.detail,
        raw=_truncate(raw()),
        # bytes stay out of the quarantine; paths and texts stay for diagnosis
        query_image=None,
        target_image=None,
        negatives=[],
    )


def _truncate(text: str) -> str:
    return text if len(text) <= RAW_MAX_CHARS else text[:RAW_MAX_CHARS] + "...[truncated]"


def _records(spec: dict, max_member_bytes: int) -> Iterator[_Record]:
    kind = spec["kind"]
    if kind == "jsonl":
        return _jsonl_records(spec)
    if kind == "parquet":
        return _table_records(_parquet_rows(spec))
    if kind == "hf":
        table = _load_hf(spec["source"]).with_format("arrow")[spec["start"] : spec["stop"]]
        return _table_records(table)
    if kind == "tar":
        return _tar_records(spec, max_member_bytes)
    raise ValueError(f"unknown shard kind {kind!r}")


def _jsonl_records(spec: dict) -> Iterator[_Record]:
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


def _jsonl_record(line: bytes) -> _Record:
    raw = line.decode("utf-8", "replace").strip()
    try:
        text = line.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as e:
        return _Record(None, Bad("not_utf8", str(e)), lambda: raw)
    try:
        obj = json.loads(text)
    except ValueError as e:
        return _Record(None, Bad("malformed_record", f"not JSON: {e}"), lambda: raw)
    if not isinstance(obj, dict):
        return _Record(None, Bad("malformed_record", f"expected a JSON object, got {type(obj).__name__}"), lambda: raw)
    return _Record(obj, None, lambda: raw)


def _parquet_rows(spec: dict) -> pa.Table:
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


def _table_records(table: pa.Table) -> Iterator[_Record]:
    for rec in table.to_pylist():
        yield _Record(rec, None, functools.partial(_dump, rec))


def _dump(value: Any) -> str:
    """JSON of a record with bytes shown by size: quarantine keeps text, not images."""

    def placeholder(v):
        return f"<{len(v)} bytes>" if isinstance(v, (bytes, bytearray)) else repr(v)

    return json.dumps(value, ensure_ascii=False, default=placeholder)


# --------------------------------------------------------------------------- webdataset

_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's key/extension split
_FIELD_RE = re.compile(r"^(qry|pos|neg\d*)\.([^.]+)$")


def _sample_key(name: str) -> tuple[str, str]:
    m = _KEY_RE.match(name)
    return (m.group(1), m.group(2)) if m else (name, "")


def _tar_records(spec: dict, max_member_bytes: int) -> Iterator[_Record]:
    start, stop, offset = spec["start"], spec["stop"], spec["offset"]
    index = start if offset is not None else 0
    key, members = None, []
    with open(spec["source"], "rb") as f:
        f.seek(offset or 0)
        with tarfile.open(fileobj=f, mode="r|*") as tf:
            for info in tf:
                tf.members = []
                if info.isdir():
                    continue
                k = _sample_key(info.name)[0]
                if members and k != key:
                    if index >= start:
                        yield _tar_record(key, members)
                    index += 1
                    members = []
                if index >= stop:
                    return
                key = k
                wanted = index >= start and info.isreg() and info.size <= max_member_bytes
                members.append((info, tf.extractfile(info).read() if wanted else None))
    if members and start <= index < stop:
        yield _tar_record(key, members)


def _tar_record(key: str, members: list) -> _Record:
    raw = functools.partial(_dump, {"key": key, "members": {i.name: _preview(i, d) for i, d in members}})
    try:
        return _Record(_sample_fields(members), None, raw)
    except Bad as bad:
        return _Record(None, bad, raw)


def _preview(info: tarfile.TarInfo, data: Optional[bytes]):
    if data is not None and info.name.endswith((".json", ".txt")) and len(data) <= RAW_MAX_CHARS:
        return data.decode("utf-8", "replace")
    return data if data is not None else f"<{info.size} bytes, not read>"


def _sample_fields(members: list) -> dict:
    for info, _ in members:
        parts = PurePosixPath(info.name).parts
        if info.name.startswith(("/", "\\")) or ".." in parts or ".." in info.name.split("\\"):
            raise Bad("unsafe_member_name", f"tar member {info.name!r}")
        if not info.isreg():
            target = f" -> {info.linkname}" if info.issym() or info.islnk() else ""
            raise Bad("unsafe_member_type", f"tar member {info.name!r} is not a regular file{target}")
    fields, negs, known = {}, {}, False
    for info, data in members:
        ext = _sample_key(info.name)[1]
        if data is None:  # regular but over the size cap, so it was not read
            reason = "malformed_record" if ext.endswith(("txt", "json")) else "image_too_large"
            raise Bad(reason, f"tar member {info.name!r} is {info.size} bytes")
        if ext == "json":
            known = True
            try:
                obj = json.loads(data.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise Bad("not_utf8", f"{info.name}: {e}") from None
            except ValueError as e:
                raise Bad("malformed_record", f"{info.name}: not JSON: {e}") from None
            if not isinstance(obj, dict):
                raise Bad("malformed_record", f"{info.name}: expected a JSON object, got {type(obj).__name__}")
            fields = {**obj, **fields}
            continue
        m = _FIELD_RE.match(ext)
        if not m:
            continue  # unknown members (e.g. __key__ or extra metadata) are not part of the pair
        known = True
        side, what = m.groups()
        value = data if what == "txt" else {"bytes": data, "path": info.name}
        if side.startswith("neg"):
            negs.setdefault(int(side[3:] or 0), {})["text" if what == "txt" else "image"] = value
        else:
            name = {"qry": ("qry", "qry_image_path"), "pos": ("pos_text", "pos_image_path")}[side]
            fields[name[0] if what == "txt" else name[1]] = value
    if not known:
        names = ", ".join(i.name for i, _ in members)
        raise Bad("malformed_record", f"sample has no json, qry.* or pos.* member ({names})")
    if negs:
        ordered = [negs[i] for i in sorted(negs)]
        fields["neg_text"] = [n.get("text") for n in ordered]
        fields["neg_image_path"] = [n.get("image") for n in ordered]
    return fields


# --------------------------------------------------------------------------- fields


@dataclass(frozen=True)
class _ImageRef:
    path: Optional[str]
    data: Optional[bytes]  # inline bytes; None: load `path` from image_root

    @property
    def present(self) -> bool:
        return self.path is not None or self.data is not None

    def identity(self) -> Optional[str]:
        if self.path is not None:
            return self.path
        return None if self.data is None else "sha256:" + hashlib.sha256(self.data).hexdigest()[:16]


_NO_IMAGE = _ImageRef(None, None)


def _parse_row(row: dict, rec: dict, max_query_chars: int) -> tuple:
    """Parse and check one record into `row`, all but its images; raises Bad at
    the first problem, after filling the identity fields it could. Returns the
    image references for `_load_images`."""
    subset = _identity(rec, ("subset", "dataset"))
    if subset:
        row["subset"] = subset
    explicit_id = _identity(rec, ("pair_id", "id"))
    row["pair_id"] = explicit_id
    q_text, q_img = _text(rec.get("qry"), "qry"), _image_ref(rec.get("qry_image_path"), "qry_image_path")
    t_text, t_img = _text(rec.get("pos_text"), "pos_text"), _image_ref(rec.get("pos_image_path"), "pos_image_path")
    negs = _negatives(rec.get("neg_text"), rec.get("neg_image_path"))
    row["pair_id"] = explicit_id or _content_id(q_text, q_img, t_text, t_img, negs)
    row.update(
        query_text=q_text,
        query_image_path=q_img.path,
        target_text=t_text,
        target_image_path=t_img.path,
    )
    if q_text is None and not q_img.present:
        raise Bad("empty_query", "no query text and no query image")
    if t_text is None and not t_img.present:
        raise Bad("missing_target", "no target text and no target image")
    if q_text is not None and len(q_text) > max_query_chars:
        raise Bad("query_too_long", f"{len(q_text)} characters > max_query_chars={max_query_chars}")
    for side, text, img in [("qry", q_text, q_img), ("pos", t_text, t_img)] + [("neg", t, i) for t, i in negs]:
        if text is not None and IMAGE_MARKER in text and not img.present:
            raise Bad("image_marker_without_image", f"{side} text has {IMAGE_MARKER} but no image")
    return q_img, t_img, negs


def _load_images(row: dict, images: tuple, store: "_ImageStore") -> None:
    q_img, t_img, negs = images
    row["query_image"] = store.load(q_img, "query")
    row["target_image"] = store.load(t_img, "target")
    row["negatives"] = [
        {"text": t, "image_path": i.path, "image": store.load(i, "negative"), "origin": "explicit"} for t, i in negs
    ]


def _checked_str(s: str, field: str) -> str:
    try:
        s.encode("utf-8")  # lone surrogates from JSON escapes can't go into Arrow
    except UnicodeEncodeError as e:
        raise Bad("not_utf8", f"{field}: {e}") from None
    return s


def _text(value, field: str) -> Optional[str]:
    """A text field: None for absent, empty or whitespace-only."""
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise Bad("not_utf8", f"{field}: {e}") from None
    if value is None:
        return None
    if not isinstance(value, str):
        raise Bad("wrong_type", f"{field} must be a string, got {type(value).__name__}")
    return _checked_str(value, field) if value.strip() else None


def _identity(rec: dict, names: tuple[str, ...]) -> Optional[str]:
    for name in names:
        value = rec.get(name)
        if value is None or value == "":
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise Bad("wrong_type", f"{name} must be a string, got {type(value).__name__}")
        return _checked_str(str(value), name)
    return None


def _image_ref(value, field: str) -> _ImageRef:
    if value is None or value == "":
        return _NO_IMAGE
    if isinstance(value, str):
        return _ImageRef(_checked_str(value, field), None)
    if isinstance(value, (bytes, bytearray)):
        return _ImageRef(None, bytes(value))
    if isinstance(value, dict) and set(value) <= {"bytes", "path"}:
        path, data = value.get("path") or None, value.get("bytes")
        if (path is None or isinstance(path, str)) and (data is None or isinstance(data, (bytes, bytearray))):
            return _ImageRef(path and _checked_str(path, field), None if data is None else bytes(data))
    raise Bad("wrong_type", f"{field} must be a path, bytes or {{bytes, path}}, got {type(value).__name__}")


def _negatives(texts, images) -> list[tuple[Optional[str], _ImageRef]]:
    texts = texts if isinstance(texts, list) else [texts]
    images = images if isinstance(images, list) else [images]
    out = []
    for i, (t, im) in enumerate(zip_longest(texts, images)):
        t, im = _text(t, f"neg_text[{i}]"), _image_ref(im, f"neg_image_path[{i}]")
        if t is not None or im.present:
            out.append((t, im))
    return out


def _content_id(q_text, q_img, t_text, t_img, negs) -> str:
    blob = json.dumps(
        [q_text, q_img.identity(), t_text, t_img.identity(), [[t, i.identity()] for t, i in negs]],
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:PAIR_ID_CHARS]


class _ImageStore:
    """Loads and validates images for one shard, each path at most once."""

    def __init__(self, root: Path, max_pixels: int):
        self.root = root.resolve()
        self.max_pixels = max_pixels
        # No legitimate image of an allowed format is bigger than 16-bit RGBA
        # raw; the cap keeps a huge file from being read into memory at all.
        self.max_bytes = 8 * max_pixels + (1 << 20)
        self._cache: dict[str, bytes | Bad] = {}

    def load(self, ref: _ImageRef, side: str) -> Optional[bytes]:
        if ref.data is not None:
            self._check(ref.data, f"{side} image {ref.path or '(inline)'}")
            return ref.data
        if ref.path is None:
            return None
        if ref.path not in self._cache:
            try:
                self._cache[ref.path] = self._read(ref.path, side)
            except Bad as bad:
                self._cache[ref.path] = bad
        result = self._cache[ref.path]
        if isinstance(result, Bad):
            raise Bad(result.reason, result.detail)
        return result

    def _read(self, rel: str, side: str) -> bytes:
        what = f"{side} image {rel!r}"
        if PurePosixPath(rel).is_absolute() or rel.startswith("\\") or re.match(r"^[A-Za-z]:", rel):
            raise Bad("image_outside_root", f"{what}: absolute paths are not allowed")
        try:
            full = (self.root / rel).resolve()
        except (OSError, ValueError, RuntimeError) as e:
            raise Bad("image_missing", f"{what}: {e}") from None
        if not full.is_relative_to(self.root):
            raise Bad("image_outside_root", f"{what} resolves outside image_root {self.root}")
        try:
            st = full.stat()
            if not stat.S_ISREG(st.st_mode):
                raise Bad("image_missing", f"{what}: {full} is not a regular file")
            if st.st_size > self.max_bytes:
                raise Bad("image_too_large", f"{what} is {st.st_size} bytes")
            data = full.read_bytes()
        except FileNotFoundError:  # name where it was looked for: a wrong image_root shows at once
            raise Bad("image_missing", f"{what}: no file {full} (image_root {self.root})") from None
        except OSError as e:
            raise Bad("image_missing", f"{what}: {full}: {e.strerror or e}") from None
        self._check(data, what)
        return data

    def _check(self, data: bytes, what: str) -> None:
        if len(data) > self.max_bytes:
            raise Bad("image_too_large", f"{what} is {len(data)} bytes")
        try:
            decode_image(data, self.max_pixels)
        except ImageError as e:
            raise Bad(e.reason, f"{what}: {e.detail}") from None


# --------------------------------------------------------------------------- in-shard negatives


def _target_key(text: Optional[str], path: Optional[str], data: Optional[bytes]) -> tuple:
    return (text, _ImageRef(path, None if path else data).identity())


def _add_in_shard_negatives(rows: list[dict], n: int, seed: int, shard_id: int) -> None:
    """Append up to n distinct targets of other valid rows of the same subset
    (same modality and task, so the negatives are not trivially easy), never
    the row's own target nor one of its explicit negatives."""
    if n <= 0:
        return
    rng = np.random.default_rng([int(seed) % (1 << 63), shard_id])
    valid = [r for r in rows if r["quarantine_reason"] is None]
    pools: dict[str, dict[tuple, dict]] = {}  # subset -> target key -> negative, first appearance order
    for r in valid:
        key = _target_key(r["target_text"], r["target_image_path"], r["target_image"])
        pools.setdefault(r["subset"], {}).setdefault(
            key, {"text": r["target_text"], "image_path": r["target_image_path"], "image": r["target_image"]}
        )
    pool_lists = {s: (list(p.values()), {k: i for i, k in enumerate(p)}) for s, p in pools.items()}
    for r in valid:
        pool, index_of = pool_lists[r["subset"]]
        own = [_target_key(r["target_text"], r["target_image_path"], r["target_image"])]
        own += [_target_key(x["text"], x["image_path"], x["image"]) for x in r["negatives"]]
        excluded = {index_of[k] for k in own if k in index_of}
        want = min(n, len(pool) - len(excluded))
        if want <= 0:
            continue
        # draw enough that `want` remain after removing the excluded ones
        draw = rng.choice(len(pool), size=min(len(pool), want + len(excluded)), replace=False)
        picks = [int(i) for i in draw if int(i) not in excluded][:want]
        r["negatives"] = r["negatives"] + [{**pool[i], "origin": "in_shard"} for i in picks]
