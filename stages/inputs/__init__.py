"""The input formats (`input.format`) behind one interface, and the cutting of the input into shards.

Each format module (mmeb: JSONL/Parquet, hf: datasets save_to_disk, webdataset: tars) offers
- `count(src, per)`: the rows of one input, and where every per-th row starts if the input can be seeked;
- `records(spec, max_member_bytes)`: the `Record`s of one shard, exactly `stop - start` of them.

`plan_shards` cuts the input into fixed shards on the driver, cheaply (line counts, Parquet metadata, tar
headers; no image is opened). Shard ids depend only on the sorted input names and `rows_per_shard`, never on
Ray's block layout, so a resumed run sees the same shards, output shard N holds exactly input shard N, and
in-shard negatives can be drawn deterministically.
"""
from __future__ import annotations

import glob
from pathlib import Path
from typing import Iterator, Optional

from stages.inputs import hf, mmeb, webdataset
from stages.inputs.base import Record

SPEC_KEYS = ("shard_id", "kind", "source", "start", "stop", "offset", "subset", "image_root")
INPUT_FORMATS = ("mmeb", "hf", "webdataset")  # input.format (pipeline/config.py takes its choices from here)
# the module that reads each kind of shard
READERS = {"jsonl": mmeb, "parquet": mmeb, "hf": hf, "tar": webdataset}


def records(spec: dict, max_member_bytes: int) -> Iterator[Record]:
    """The records of one shard, whatever its format. Tar members over `max_member_bytes` are not read."""
    reader = READERS.get(spec["kind"])
    if reader is None:
        raise ValueError(f"unknown shard kind {spec['kind']!r}")
    return reader.records(spec, max_member_bytes)


# --------------------------------------------------------------------------- planning


def plan_shards(input_cfg) -> list[dict]:
    """Cut the input into fixed shards: JSON-able specs (SPEC_KEYS) numbered in the order of the sorted
    input names, then position within each input. A spec's `stop - start` is the number of rows
    `records` gives for it."""
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


def _ranges(src: Path, kind: str, per: int) -> list[tuple[int, int, Optional[int]]]:
    n, offsets = READERS[kind].count(src, per)
    return [
        (start, min(start + per, n), offsets[i] if offsets else None)
        for i, start in enumerate(range(0, n, per))
    ]


# --------------------------------------------------------------------------- finding the inputs


def _sources(path: str, fmt: str) -> list[Path]:
    if any(c in path for c in "*?["):
        found = [Path(p) for p in glob.glob(path, recursive=True)]
    else:
        found = [Path(path)] if Path(path).exists() else []
    out = set()
    for p in found:
        p = p.resolve()
        if p.is_dir() and hf.is_hf_dataset(p) and fmt != "hf":  # its .json files are not JSON Lines
            raise ValueError(f"input.format: {fmt} does not read {p}, a datasets save_to_disk folder; "
                             "input.format=hf reads it")
        if p.is_dir() and not (fmt == "hf" and hf.is_hf_dataset(p)):
            out.update(_inputs_under(p, fmt))
        else:
            out.add(p)
    return sorted(out, key=str)


def _inputs_under(folder: Path, fmt: str) -> list[Path]:
    if fmt == "hf":
        return [p.parent for p in folder.rglob("state.json")]
    suffixes = webdataset.SUFFIXES if fmt == "webdataset" else mmeb.SUFFIXES
    return [p for p in folder.rglob("*") if p.is_file() and p.name.endswith(suffixes)]


def _kind(src: Path, fmt: str) -> str:
    """What reads `src`; an input that input.format cannot read is a user error naming the key to fix."""
    if fmt == "hf":
        if not hf.is_hf_dataset(src):
            if src.is_file():
                raise ValueError(f"input.format: hf reads a datasets save_to_disk folder, but input.path {src} is "
                                 f"a file{_format_hint(src)}")
            raise ValueError(f"input.path: {src} is not a datasets save_to_disk folder (no state.json)")
        return "hf"
    if fmt == "webdataset":
        if not src.name.endswith(webdataset.SUFFIXES):
            raise ValueError(f"input.format: webdataset reads tar files ({', '.join(webdataset.SUFFIXES)}), but "
                             f"input.path {src} is not one{_format_hint(src)}")
        return "tar"
    kind = mmeb.kind_of(src)
    if kind is None:
        raise ValueError(f"input.format: mmeb reads {', '.join(mmeb.JSONL_SUFFIXES)} or .parquet files, but "
                         f"input.path {src} is not one{_format_hint(src)}")
    return kind


def _format_hint(src: Path) -> str:
    """The input.format that does read `src`, as the end of a message."""
    if src.is_dir() and hf.is_hf_dataset(src):
        fmt = "hf"
    elif src.name.endswith(webdataset.SUFFIXES):
        fmt = "webdataset"
    elif src.name.endswith(mmeb.SUFFIXES):
        fmt = "mmeb"
    else:
        return ""
    return f"; input.format={fmt} reads it"


def _stem(src: Path) -> str:
    """The default subset name of an input: its file name without the format's suffix."""
    if src.is_dir() and (src.parent / "dataset_dict.json").is_file():
        return src.parent.name  # a split folder of a DatasetDict: name it after the dict
    name = src.name
    for suffix in sorted(mmeb.SUFFIXES + webdataset.SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name
