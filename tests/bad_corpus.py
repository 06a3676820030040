"""A corpus of bad inputs, built in code into a folder, next to clean demo pairs.

`build(root, clean_jsonl)` writes, under `root`:
  bad/...              the bad images: corrupt bytes, a truncated PNG, a 0-byte file, a decompression bomb (a
                       PNG that declares 100000x100000 pixels in a few hundred bytes), a TIFF, a symlink out of
                       the image root
  ../outside.png       an image just outside the image root (`root` is the image root)
  zz_bad.jsonl         one MMEB record per bad input, each expected to be quarantined with BAD_JSONL's reason;
                       named to sort after the clean file, so that the clean file's shards are the same with or
                       without it
  zz_bad.tar           the clean records as webdataset samples, then one sample with a member named `../...`

and returns where they are and what each should become. Nothing binary is committed to the repo.
"""
from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

from PIL import Image

MB_QUERY_CHARS = 1_000_000


def png(size=(32, 32), color=(200, 30, 30), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header that declares width x height pixels, with almost no data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1024))
            + chunk(b"IEND", b""))


def _query(image_path: str, **extra) -> dict:
    return {"qry": "<|image_1|>\nRepresent the given image for classification", "qry_image_path": image_path,
            "pos_text": "circle", **extra}


def _bad_records(root: Path, first_clean_line: str) -> list[tuple[bytes, str]]:
    """(JSONL line as bytes, expected reason), one per kind of bad input the reader must quarantine."""
    line = lambda rec: json.dumps(rec).encode()  # noqa: E731
    return [
        (line(_query("bad/corrupt.png")), "image_corrupt"),
        (line(_query("bad/truncated.png")), "image_corrupt"),
        (line(_query("bad/empty.png")), "image_empty"),
        (line(_query("bad/missing.png")), "image_missing"),
        (line(_query("../outside.png")), "image_outside_root"),
        (line(_query(str(root / "images" / "shapes_cls" / "00000.png"))), "image_outside_root"),  # absolute
        (line(_query("bad/link-out.png")), "image_outside_root"),  # a symlink that leaves the root
        (line(_query("bad/bomb.png")), "image_too_large"),
        (line(_query("bad/picture.tiff")), "image_unsupported"),
        # a target image that is bad quarantines the row just the same
        (line({"qry": "Find the picture of a red square", "pos_text": "<|image_1|>",
               "pos_image_path": "bad/corrupt.png"}), "image_corrupt"),
        (b'{"qry": "caf\xe9 au lait", "pos_text": "latin-1, not UTF-8"}', "not_utf8"),
        (line({"qry": "  ", "pos_text": "an empty query"}), "empty_query"),
        (line({"qry": "q" * MB_QUERY_CHARS, "pos_text": "a 1 MB query"}), "query_too_long"),
        (line({"qry": 12345, "pos_text": "a number for a query"}), "wrong_type"),
        (line({"qry": "a list for a target", "pos_text": ["a", "b"]}), "wrong_type"),
        (line({"qry": "an object for an id", "pos_text": "t", "id": {"x": 1}}), "wrong_type"),
        (b'{"qry": "a line cut short", "pos_text": ', "malformed_record"),
        (b"[1, 2, 3]", "malformed_record"),
        # the same pair as the clean file's first line: that one (shard 0) keeps the pair_id
        (first_clean_line.encode(), "duplicate_pair_id"),
        # within this file: the first row holds the id though its image is missing, the second is a duplicate
        (line(_query("bad/missing-too.png", id="twice")), "image_missing"),
        (line({"qry": "a valid record with a taken id", "pos_text": "t", "id": "twice"}), "duplicate_pair_id"),
    ]


def build(root: Path, clean_jsonl: Path) -> dict:
    root, clean_jsonl = Path(root), Path(clean_jsonl)
    bad = root / "bad"
    bad.mkdir(parents=True, exist_ok=True)
    good = png()
    (bad / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))  # a PNG signature, then noise
    (bad / "truncated.png").write_bytes(png(size=(64, 64))[:-40])
    (bad / "empty.png").write_bytes(b"")
    (bad / "bomb.png").write_bytes(png_bomb())
    (bad / "picture.tiff").write_bytes(png(fmt="TIFF"))
    outside = root.parent / "outside.png"
    outside.write_bytes(good)
    link = bad / "link-out.png"
    if not link.is_symlink():
        link.symlink_to(outside)

    clean_lines = [x for x in clean_jsonl.read_bytes().splitlines() if x.strip()]
    records = _bad_records(root, clean_lines[0].decode())
    jsonl = clean_jsonl.parent / "zz_bad.jsonl"
    jsonl.write_bytes(b"".join(line + b"\n" for line, _ in records))

    tar = clean_jsonl.parent / "zz_bad.tar"
    _write_tar(tar, clean_lines)
    return {
        "jsonl": jsonl,
        "jsonl_reasons": [reason for _, reason in records],
        "tar": tar,
        "tar_clean_rows": len(clean_lines),
        "tar_reasons": ["unsafe_member_name"],
    }


def _write_tar(path: Path, clean_lines: list[bytes]) -> None:
    """The clean records as `KEY.json` samples (image paths stay relative to the image root), then a sample
    whose member climbs out with `../`."""

    def add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))

    with tarfile.open(path, "w") as tf:
        for i, line in enumerate(clean_lines):
            add(tf, f"s{i:05d}.json", line)
        add(tf, "../escape.json", json.dumps({"qry": "out of the tar", "pos_text": "t"}).encode())
