"""Hugging Face input: a folder written by `datasets.save_to_disk` (one split), with the MMEB columns."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Iterator, Optional

from stages.inputs.base import Record, table_records


def is_hf_dataset(folder: Path) -> bool:
    return (folder / "state.json").is_file()


def count(src: Path, per: int) -> tuple[int, Optional[list[int]]]:
    return len(load_hf(str(src))), None  # Arrow rows are addressed by index: no offsets needed


def records(spec: dict, max_member_bytes: int) -> Iterator[Record]:
    return table_records(load_hf(spec["source"]).with_format("arrow")[spec["start"] : spec["stop"]])


@functools.lru_cache(maxsize=8)  # planning and each shard of one task reopen the same folder
def load_hf(path: str):
    import datasets  # heavy; only for hf input

    ds = datasets.load_from_disk(path)
    if not isinstance(ds, datasets.Dataset):
        raise ValueError(f"input.path: {path} holds a {type(ds).__name__}; point at one split's folder")
    return ds
