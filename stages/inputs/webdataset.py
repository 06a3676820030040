"""webdataset input: tar files.

Members are grouped into samples by key as webdataset does (key = name up to the first dot of the base name;
consecutive members with one key form a sample). A sample may carry `KEY.json` (an object with the MMEB
fields, image paths relative to image_root) and/or members named by field: `KEY.qry.txt`, `KEY.pos.txt`,
`KEY.neg.txt`, `KEY.neg1.txt`, ... for text and `KEY.qry.<ext>`, `KEY.pos.<ext>`, `KEY.neg.<ext>`, ... (ext
jpg, png, ...) for inline images; members override the json's fields. Read with `tarfile`, not webdataset's
iterators, because those silently skip links and do not flag unsafe names, and because planning needs header
offsets.
"""
from __future__ import annotations

import functools
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator, Optional

from stages.inputs.base import RAW_MAX_CHARS, Bad, InlineImage, Record, dump

SUFFIXES = (".tar", ".tar.gz", ".tgz")

_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's key/extension split
_FIELD_RE = re.compile(r"^(qry|pos|neg\d*)\.([^.]+)$")


def _sample_key(name: str) -> tuple[str, str]:
    m = _KEY_RE.match(name)
    return (m.group(1), m.group(2)) if m else (name, "")


def count(src: Path, per: int) -> tuple[int, Optional[list[int]]]:
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


def records(spec: dict, max_member_bytes: int) -> Iterator[Record]:
    """The shard's samples; a member over `max_member_bytes` is not read (its sample is quarantined)."""
    start, stop, offset = spec["start"], spec["stop"], spec["offset"]
    index = start if offset is not None else 0
    key, members = None, []
    # in an uncompressed tar a member's bytes can be read again in place: their offset in the file is where the
    # stream began plus the member's offset in the stream
    base = (offset or 0) if _plain_tar(spec["source"]) else None
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
                at = None if base is None or info.issparse() else (spec["source"], base + info.offset_data)
                members.append((info, _Member(tf.extractfile(info).read(), at) if wanted else None))
    if members and start <= index < stop:
        yield _tar_record(key, members)


@dataclass(frozen=True)
class _Member:
    data: bytes
    at: Optional[tuple[str, int]]  # where the data lies in the tar file, if it is read as it is


@functools.lru_cache(maxsize=64)
def _plain_tar(path: str) -> bool:
    """Whether the file is an uncompressed tar (the stream is opened with r|*, which also reads compressed ones,
    whatever their name): not one of the compressions tarfile reads, by their magic bytes."""
    with open(path, "rb") as f:
        head = f.read(6)
    return not head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00"))


def _tar_record(key: str, members: list) -> Record:
    raw = functools.partial(dump, {"key": key, "members": {i.name: _preview(i, d) for i, d in members}})
    try:
        return Record(_sample_fields(members), None, raw)
    except Bad as bad:
        return Record(None, bad, raw)


def _preview(info: tarfile.TarInfo, member: Optional[_Member]):
    if member is None:
        return f"<{info.size} bytes, not read>"
    if info.name.endswith((".json", ".txt")) and len(member.data) <= RAW_MAX_CHARS:
        return member.data.decode("utf-8", "replace")
    return member.data


def _sample_fields(members: list) -> dict:
    """A sample's members -> the MMEB fields; raises Bad for an unsafe member or a sample with no pair in it."""
    for info, _ in members:
        parts = PurePosixPath(info.name).parts
        if info.name.startswith(("/", "\\")) or ".." in parts or ".." in info.name.split("\\"):
            raise Bad("unsafe_member_name", f"tar member {info.name!r}")
        if not info.isreg():
            target = f" -> {info.linkname}" if info.issym() or info.islnk() else ""
            raise Bad("unsafe_member_type", f"tar member {info.name!r} is not a regular file{target}")
    fields, negs, known = {}, {}, False
    for info, member in members:
        ext = _sample_key(info.name)[1]
        if member is None:  # regular but over the size cap, so it was not read
            reason = "malformed_record" if ext.endswith(("txt", "json")) else "image_too_large"
            raise Bad(reason, f"tar member {info.name!r} is {info.size} bytes")
        if ext == "json":
            known = True
            try:
                obj = json.loads(member.data.decode("utf-8"))
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
        value = member.data if what == "txt" else InlineImage(member.data, info.name, member.at)
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
