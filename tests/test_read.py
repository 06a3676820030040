"""The reader: every input format, shard planning, quarantine reason codes,
in-shard negatives, the demo data, and the reader's contract (tests/test_read_source.py: the read in Ray)."""
import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import schemas
from scripts.make_demo_data import make as make_demo
from stages.images import load_image_bytes
from schemas.reasons import REASONS
from stages.inputs import plan_shards
from stages.read import ReadSpec, read_shard

REPO = Path(__file__).resolve().parent.parent


def png(size=(32, 32), color=(200, 30, 30), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def input_cfg(path, fmt="mmeb", root=None, **kw) -> dict:
    cfg = {"path": str(path), "format": fmt, "image_root": str(root) if root else None, "subset": None,
           "rows_per_shard": 4, "max_query_chars": 20000, "max_image_pixels": 40_000_000}
    cfg.update(kw)
    return cfg


def shards(cfg) -> list[dict]:
    """The shard specs of an input, their inline images stored beside it (a job's go to OUTPUT/_images)."""
    return [{**spec, "images_dir": str(Path(str(cfg["path"])).parent / "_images")} for spec in plan_shards(cfg)]


def read_all(cfg, negatives=2, seed=0) -> list[dict]:
    return [row for spec in shards(cfg) for row in read_shard(spec, ReadSpec.from_input(cfg, negatives, seed))]


def without(rows, *keys):
    return [{k: v for k, v in r.items() if k not in keys} for r in rows]


@pytest.fixture
def image_root(tmp_path) -> Path:
    root = tmp_path / "root"
    (root / "images").mkdir(parents=True)
    for i in range(6):
        (root / "images" / f"img{i}.png").write_bytes(png(color=(40 * i, 100, 200)))
    (root / "images" / "photo.jpg").write_bytes(png(color=(1, 2, 3), fmt="JPEG"))
    return root


# Ten MMEB-train records: image->label, text->image, image->caption with
# hard negatives, a text-only pair; every field a string, as in MMEB-train.
def mmeb_records() -> list[dict]:
    out = []
    for i in range(10):
        rec = {"qry": "", "qry_image_path": "", "pos_text": "", "pos_image_path": "", "neg_text": "", "neg_image_path": ""}
        if i % 4 == 0:
            rec.update(qry="<|image_1|>\nRepresent the given image for classification",
                       qry_image_path=f"images/img{i % 6}.png", pos_text=["cat", "dog"][i % 8 // 4])
        elif i % 4 == 1:
            rec.update(qry=f"Find me an everyday image that matches the given caption: scene {i}",
                       pos_text="<|image_1|>\nRepresent the given image.", pos_image_path=f"images/img{i % 6}.png",
                       neg_text="<|image_1|>\nRepresent the given image.", neg_image_path="images/photo.jpg")
        elif i % 4 == 2:
            rec.update(qry="<|image_1|>\nFind an image caption describing the given everyday image.",
                       qry_image_path="images/photo.jpg" if i == 2 else "images/../images/img5.png",
                       pos_text=f"caption {i}", neg_text=f"wrong caption {i}")
        else:
            rec.update(qry=f"Given a question, retrieve passages that answer the question: q{i}", pos_text=f"passage {i}")
        out.append(rec)
    return out


def write_jsonl(path: Path, records) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def write_parquet(path: Path, records) -> Path:
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=3)  # shards cross row groups
    return path


def write_hf(path: Path, records) -> Path:
    import datasets

    datasets.Dataset.from_list(records).save_to_disk(str(path))
    return path


def write_wds(path: Path, samples) -> Path:
    import webdataset as wds

    with wds.TarWriter(str(path)) as sink:
        for i, sample in enumerate(samples):
            sink.write({"__key__": f"s{i:04d}", **sample})
    return path


# --------------------------------------------------------------------------- formats


def test_every_format_reads_the_same_records(tmp_path, image_root):
    records = mmeb_records()
    inputs = {
        "mmeb": [write_jsonl(tmp_path / "pairs.jsonl", records), write_parquet(tmp_path / "pairs.parquet", records)],
        "hf": [write_hf(tmp_path / "hf" / "pairs", records)],
        "webdataset": [write_wds(tmp_path / "pairs.tar", [{"json": r} for r in records])],
    }
    results = [
        read_all(input_cfg(path, fmt, image_root))
        for fmt, paths in inputs.items()
        for path in paths
    ]
    reference = results[0]
    assert len(reference) == 10 and all(r["quarantine_reason"] is None for r in reference)
    assert [r["shard_id"] for r in reference] == [0] * 4 + [1] * 4 + [2] * 2
    assert {r["subset"] for r in reference} == {"pairs"}  # the file stem
    for other in results[1:]:
        assert without(other, "source") == without(reference, "source")
    first = reference[0]
    # a file image is referenced where it is: the whole file, resolved, with the digest of its bytes
    img0 = image_root / "images/img0.png"
    assert first["query_image"] == {"path": str(img0.resolve()), "offset": 0, "size": img0.stat().st_size,
                                    "digest": "sha256:" + hashlib.sha256(img0.read_bytes()).hexdigest()}
    assert load_image_bytes(first["query_image"]) == img0.read_bytes()
    assert first["query_text"].startswith("<|image_1|>") and first["target_text"] == "cat"
    neg = reference[1]["negatives"][0]
    assert {k: neg[k] for k in ("text", "image_path", "origin")} == {
        "text": "<|image_1|>\nRepresent the given image.", "image_path": "images/photo.jpg", "origin": "explicit"}
    assert load_image_bytes(neg["image"]) == (image_root / "images/photo.jpg").read_bytes()
    assert reference[6]["query_image_path"] == "images/../images/img5.png"  # `..` that stays inside is fine
    assert len({r["pair_id"] for r in reference}) == 10


def test_pair_id_comes_from_content_or_from_the_record(tmp_path, image_root):
    records = mmeb_records()[:3]
    a = read_all(input_cfg(write_jsonl(tmp_path / "a.jsonl", records), root=image_root))
    # same content in another file, another order and another subset: same ids
    b = read_all(input_cfg(write_jsonl(tmp_path / "b.jsonl", records[::-1]), root=image_root, subset="x"))
    assert [r["pair_id"] for r in a] == [r["pair_id"] for r in b][::-1]
    changed = read_all(input_cfg(write_jsonl(tmp_path / "c.jsonl", [{**records[0], "pos_text": "dog"}]), root=image_root))
    assert changed[0]["pair_id"] != a[0]["pair_id"]
    explicit = [{**records[0], "id": 17, "subset": "ImageNet_1K"}, {**records[1], "pair_id": "p-1", "dataset": "MSCOCO"}]
    rows = read_all(input_cfg(write_jsonl(tmp_path / "d.jsonl", explicit), root=image_root))
    assert [(r["pair_id"], r["subset"]) for r in rows] == [("17", "ImageNet_1K"), ("p-1", "MSCOCO")]


def test_webdataset_member_images_and_texts(tmp_path, image_root):
    q, t, n = png(color=(1, 1, 1)), png(color=(2, 2, 2), fmt="JPEG"), png(color=(3, 3, 3))
    samples = [
        {"qry.txt": "<|image_1|>\nWhat is shown?", "qry.png": q, "pos.txt": "a square"},
        {"qry.txt": "find the picture", "pos.jpg": t, "neg.png": n, "neg1.txt": "other text",
         "json": {"id": "w1", "subset": "wds", "pos_text": "from the json", "qry": "overridden"}},
    ]
    rows = read_all(input_cfg(write_wds(tmp_path / "shard.tar", samples), "webdataset", image_root))
    assert [r["quarantine_reason"] for r in rows] == [None, None]
    # members of an uncompressed tar are referenced in place: the tar, at the member's data
    assert rows[0]["query_image"]["path"] == str((tmp_path / "shard.tar").resolve())
    assert load_image_bytes(rows[0]["query_image"]) == q and rows[0]["query_image_path"] == "s0000.qry.png"
    assert rows[0]["target_text"] == "a square" and rows[0]["subset"] == "shard"
    assert rows[1]["pair_id"] == "w1" and rows[1]["subset"] == "wds"
    assert rows[1]["query_text"] == "find the picture"  # the member wins over the json
    assert load_image_bytes(rows[1]["target_image"]) == t and rows[1]["target_text"] == "from the json"
    assert [(x["text"], x["image_path"], x["image"] and load_image_bytes(x["image"])) for x in rows[1]["negatives"]] == [
        (None, "s0001.neg.png", n), ("other text", None, None)]
    assert not (tmp_path / "_images").exists()  # nothing copied


def test_hf_image_features_become_bytes(tmp_path):
    import datasets

    images = [png(color=(9, i, 9)) for i in range(3)]
    features = datasets.Features({"qry": datasets.Value("string"), "qry_image_path": datasets.Image(),
                                  "pos_text": datasets.Value("string")})
    ds = datasets.Dataset.from_dict(
        {"qry": ["<|image_1|>\nlabel it"] * 3,
         "qry_image_path": [{"bytes": b, "path": f"img{i}.png"} for i, b in enumerate(images)],
         "pos_text": ["a", "b", "c"]},
        features=features)
    ds.save_to_disk(str(tmp_path / "ds"))
    rows = read_all(input_cfg(tmp_path / "ds", "hf"))
    assert [load_image_bytes(r["query_image"]) for r in rows] == images
    # Arrow-held bytes have no file of their own: stored under the spec's images_dir, one file per digest
    store = tmp_path / "_images"
    assert sorted(Path(r["query_image"]["path"]).parent.parent.parent for r in rows) == [store] * 3
    assert [r["query_image_path"] for r in rows] == ["img0.png", "img1.png", "img2.png"]
    assert all(r["quarantine_reason"] is None for r in rows)


def test_list_negatives_pair_texts_with_images(tmp_path, image_root):
    rec = {"qry": "q", "pos_text": "t", "neg_text": ["n0", "", "n2"],
           "neg_image_path": ["images/img1.png", "images/img2.png"]}
    (row,) = read_all(input_cfg(write_jsonl(tmp_path / "l.jsonl", [rec]), root=image_root), negatives=0)
    assert [(n["text"], n["image_path"]) for n in row["negatives"]] == [
        ("n0", "images/img1.png"), (None, "images/img2.png"), ("n2", None)]


# --------------------------------------------------------------------------- planning


def test_planning_is_deterministic_sorted_and_cheap_to_seek(tmp_path, image_root):
    records = mmeb_records()
    folder = tmp_path / "in"
    folder.mkdir()
    write_jsonl(folder / "b.jsonl", records[:5])
    write_parquet(folder / "a.parquet", records[5:])
    (folder / "notes.txt").write_text("not input")
    lines = [json.dumps(r) for r in records[:7]]
    with gzip.open(folder / "c.jsonl.gz", "wt") as f:
        f.write("\n\n".join(lines) + "\n")  # blank lines are not rows
    cfg = input_cfg(folder, root=image_root, rows_per_shard=3)
    specs = plan_shards(cfg)
    assert specs == plan_shards(cfg) == json.loads(json.dumps(specs))
    assert [(Path(s["source"]).name, s["start"], s["stop"]) for s in specs] == [
        ("a.parquet", 0, 3), ("a.parquet", 3, 5), ("b.jsonl", 0, 3), ("b.jsonl", 3, 5),
        ("c.jsonl.gz", 0, 3), ("c.jsonl.gz", 3, 6), ("c.jsonl.gz", 6, 7)]
    assert [s["shard_id"] for s in specs] == list(range(7))
    assert [s["subset"] for s in specs[::2]] == ["a", "b", "c", "c"]
    assert specs[3]["offset"] == sum(len(json.dumps(r)) + 1 for r in records[:3])  # seek, don't rescan
    assert specs[4]["offset"] is None  # gzip can't seek
    for spec in specs:
        rows = read_shard(spec, ReadSpec.from_input(cfg, 0, 0))
        assert [r["row_index"] for r in rows] == list(range(spec["stop"] - spec["start"]))
        assert {r["shard_size"] for r in rows} == {spec["stop"] - spec["start"]}
    # the plain and the gzipped file give the same rows
    by_file = {}
    for row in read_all(cfg, negatives=0):
        by_file.setdefault(Path(row["source"]).name, []).append(row)
    plain_rows = read_all(input_cfg(write_jsonl(tmp_path / "c.jsonl", records[:7]), root=image_root,
                                    rows_per_shard=3), negatives=0)
    assert without(by_file["c.jsonl.gz"], "source", "shard_id") == without(plain_rows, "source", "shard_id")
    # a glob selects the same way
    glob_specs = plan_shards(input_cfg(str(folder / "*.jsonl*"), root=image_root, rows_per_shard=3))
    assert [s["source"] for s in glob_specs] == [s["source"] for s in specs[2:]]
    with pytest.raises(FileNotFoundError):
        plan_shards(input_cfg(tmp_path / "nothing-here"))


def test_tar_shards_within_a_tar_seek_or_scan_alike(tmp_path, image_root):
    samples = [{"json": r} for r in mmeb_records()]
    tar = write_wds(tmp_path / "a.tar", samples)
    (tmp_path / "gz").mkdir()
    with open(tar, "rb") as src, gzip.open(tmp_path / "gz" / "a.tar.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    plain = plan_shards(input_cfg(tar, "webdataset", image_root, rows_per_shard=4))
    packed = plan_shards(input_cfg(tmp_path / "gz" / "a.tar.gz", "webdataset", image_root, rows_per_shard=4))
    assert [(s["start"], s["stop"]) for s in plain] == [(0, 4), (4, 8), (8, 10)]
    assert plain[1]["offset"] > 0 and packed[1]["offset"] is None
    cfg = input_cfg(tar, "webdataset", image_root)
    for a, b in zip(plain, packed):
        read = ReadSpec.from_input(cfg, 1, 0)
        assert without(read_shard(a, read), "source") == without(read_shard(b, read), "source")


# --------------------------------------------------------------------------- quarantine

VALID = [
    {"qry": "<|image_1|>\nclassify", "qry_image_path": "images/img0.png", "pos_text": "red"},
    {"qry": "find it", "pos_text": "<|image_1|>\nimage", "pos_image_path": "images/img1.png", "id": "dup"},
    {"qry": "text only", "pos_text": "answer", "neg_text": "wrong answer"},
    {"qry": "<|image_1|>", "qry_image_path": "images/../images/img2.png", "pos_text": "blue"},
]


def _bad_lines(tmp_path: Path, root: Path) -> list[tuple[str, str]]:
    """(JSONL line, expected reason) for every reason a JSONL line can have."""
    imgs = root / "images"
    (imgs / "empty.png").write_bytes(b"")
    (imgs / "corrupt.png").write_bytes(png()[:40])
    (imgs / "big.png").write_bytes(png(size=(200, 200)))
    (imgs / "img.tiff").write_bytes(png(fmt="TIFF"))
    (tmp_path / "outside.png").write_bytes(png())
    os.symlink(tmp_path / "outside.png", imgs / "link.png")
    (imgs / "folder.png").mkdir()

    def q(path, **kw):
        return json.dumps({"qry": "<|image_1|>\nq", "qry_image_path": path, "pos_text": "t", **kw})

    return [
        (q("images/nope.png"), "image_missing"),
        (q("images/folder.png"), "image_missing"),
        (q("images/empty.png"), "image_empty"),
        (q("images/corrupt.png"), "image_corrupt"),
        (q("images/big.png"), "image_too_large"),
        (q("images/img.tiff"), "image_unsupported"),
        (q("../outside.png"), "image_outside_root"),
        (q(str(imgs / "img0.png")), "image_outside_root"),  # absolute, even though inside
        (q("images/link.png"), "image_outside_root"),
        (q("images/img0.png", neg_image_path="images/gone.png"), "image_missing"),  # a bad negative
        (json.dumps({"qry": "<|image_1|>\nwhat is it?", "pos_text": "t"}), "image_marker_without_image"),
        (json.dumps({"qry": "  ", "qry_image_path": "", "pos_text": "t"}), "empty_query"),
        (json.dumps({"qry": "q", "pos_text": "", "pos_image_path": ""}), "missing_target"),
        (json.dumps({"qry": 123, "pos_text": "t"}), "wrong_type"),
        (json.dumps({"qry": "q", "pos_text": "t", "neg_text": {"a": 1}}), "wrong_type"),
        (json.dumps({"qry": "q", "pos_text": "t", "id": [1]}), "wrong_type"),
        ("{not json", "malformed_record"),
        ("[1, 2]", "malformed_record"),
        ('{"qry": "\xff", "pos_text": "t"}', "not_utf8"),  # written as latin-1 below
        ('{"qry": "\\ud800 lone surrogate", "pos_text": "t"}', "not_utf8"),
        (json.dumps({"qry": "x" * 301, "pos_text": "t"}), "query_too_long"),
        (json.dumps({"qry": "another", "pos_text": "t", "id": "dup"}), "duplicate_pair_id"),
    ]


def test_each_reason_code_quarantines_only_its_row(tmp_path, image_root):
    bad = _bad_lines(tmp_path, image_root)
    lines, expected = [], []
    for i, (line, reason) in enumerate(bad):  # valid rows in between and around the bad ones
        valid = {**VALID[i % len(VALID)], "qry": VALID[i % len(VALID)]["qry"] + f" #{i}"}
        if i != 1:
            valid.pop("id", None)  # one "dup" to be duplicated by the last bad line
        lines.append(json.dumps(valid)), expected.append(None)
        lines.append(line), expected.append(reason)
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"".join(s.encode("latin-1" if "\xff" in s else "utf-8") + b"\n" for s in lines))
    cfg = dict(root=image_root, subset="s", rows_per_shard=1000, max_query_chars=300, max_image_pixels=100 * 100)
    rows = read_all(input_cfg(path, **cfg), negatives=0)
    assert [r["quarantine_reason"] for r in rows] == expected
    assert {r for r in expected if r} <= set(REASONS)
    for row, line in zip(rows, lines):
        if row["quarantine_reason"] is None:
            assert row["raw"] is None and row["quarantine_detail"] is None
        else:
            assert row["quarantine_detail"] and row["raw"]
            assert row["query_image"] is None and row["target_image"] is None and row["negatives"] == []
            assert row["source"] == str(path) and row["shard_id"] == 0
    assert rows[1]["raw"] == lines[1] and rows[1]["pair_id"]  # identity recovered where the record parsed
    assert rows[1]["query_image_path"] == "images/nope.png"
    # the valid rows are exactly what a file of only them gives (the first "dup" wins)
    clean = read_all(input_cfg(write_jsonl(tmp_path / "clean.jsonl", lines[::2]), **cfg), negatives=0)
    assert without(rows[::2], "source", "row_index", "shard_size") == without(clean, "source", "row_index", "shard_size")
    # a long raw record is truncated
    write_jsonl(tmp_path / "long.jsonl", [json.dumps({"qry": "q" * 50_000, "pos_text": "t"})])
    (long_row,) = read_all(input_cfg(tmp_path / "long.jsonl", **cfg))
    assert long_row["quarantine_reason"] == "query_too_long" and len(long_row["raw"]) < 10_100


def test_a_pair_id_is_kept_once_across_shards(tmp_path, image_root):
    from stages.duplicates import find_duplicates, index_pair_ids

    a = {"qry": "the same pair", "pos_text": "t"}
    records = [
        a, {"qry": "<|image_1|>", "qry_image_path": "images/gone.png", "pos_text": "t", "id": "x"},  # shard 0
        {"qry": "valid, but x is taken", "pos_text": "t", "id": "x"}, {"qry": "d", "pos_text": "t"},  # shard 1
        "{broken", a,  # shard 2: a broken line holds no pair_id
    ]
    cfg = input_cfg(write_jsonl(tmp_path / "p.jsonl", records), root=image_root, rows_per_shard=2)
    specs = plan_shards(cfg)
    keys = tmp_path / "keys"
    keys.mkdir()
    assert index_pair_ids(specs, ReadSpec.from_input(cfg, 0, 0), str(keys)) == 3
    assert find_duplicates(str(keys), str(tmp_path / "dups.parquet")) == 2
    read = ReadSpec.from_input(cfg, 0, 0)
    rows = [r for spec in specs for r in read_shard({**spec, "duplicates": str(tmp_path / "dups.parquet")}, read)]
    # the first row of a pair_id keeps it, even one quarantined for its image: image checks don't decide owners
    assert [r["quarantine_reason"] for r in rows] == [
        None, "image_missing", "duplicate_pair_id", None, "malformed_record", "duplicate_pair_id"]
    assert rows[2]["quarantine_detail"] == "same pair_id as row 1 of shard 0"
    assert rows[5]["quarantine_detail"] == "same pair_id as row 0 of shard 0"
    assert rows[5]["pair_id"] == rows[0]["pair_id"]
    # a shard read on its own sees only its own rows: the index is what finds the others
    assert [r["quarantine_reason"] for r in read_shard(specs[2], read)] == ["malformed_record", None]


def test_columnar_wrong_types_are_quarantined(tmp_path, image_root):
    table = pa.table({"qry": [1, 2], "pos_text": ["a", "b"]})
    pq.write_table(table, tmp_path / "ints.parquet")
    rows = read_all(input_cfg(tmp_path / "ints.parquet", root=image_root))
    assert [r["quarantine_reason"] for r in rows] == ["wrong_type", "wrong_type"]
    assert json.loads(rows[0]["raw"]) == {"qry": 1, "pos_text": "a"}


def test_unsafe_tar_members_are_quarantined(tmp_path, image_root):
    def add(tf, name, data=b"", **kw):
        info = tarfile.TarInfo(name)
        for k, v in kw.items():
            setattr(info, k, v)
        info.size = len(data) if info.isreg() else 0
        tf.addfile(info, io.BytesIO(data) if info.isreg() else None)

    good = json.dumps({"qry": "q", "pos_text": "t"}).encode()
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tf:
        add(tf, "a.json", good)
        add(tf, "../escape.json", good)
        add(tf, "b.json", json.dumps({"qry": "q2", "pos_text": "t2"}).encode())
        add(tf, "/abs/c.json", good)
        add(tf, "d.qry.txt", b"question")
        add(tf, "d.pos.png", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        add(tf, "e.json", b"[1]")
        add(tf, "f.qry.txt", b"\xff\xfe")
        add(tf, "f.pos.txt", b"t")
        add(tf, "g.readme", b"nothing we know")
    rows = read_all(input_cfg(path, "webdataset", image_root, rows_per_shard=100))
    assert [r["quarantine_reason"] for r in rows] == [
        None, "unsafe_member_name", None, "unsafe_member_name", "unsafe_member_type",
        "malformed_record", "not_utf8", "malformed_record"]
    assert "/etc/passwd" in rows[4]["quarantine_detail"]
    assert "../escape.json" in rows[1]["raw"]


# --------------------------------------------------------------------------- in-shard negatives


def test_in_shard_negatives_are_deterministic_and_never_the_own_target(tmp_path, image_root):
    records = [{"qry": f"q{i}", "pos_text": f"label {i % 5}", "subset": "cls"} for i in range(20)]
    records += [{"qry": f"find {i}", "pos_text": "<|image_1|>", "pos_image_path": f"images/img{i}.png",
                 "subset": "t2i", "neg_text": "<|image_1|>", "neg_image_path": f"images/img{(i + 1) % 6}.png"}
                for i in range(6)]
    cfg = input_cfg(write_jsonl(tmp_path / "n.jsonl", records), root=image_root, rows_per_shard=100)
    a, again, other = read_all(cfg, 3, seed=0), read_all(cfg, 3, seed=0), read_all(cfg, 3, seed=1)
    assert a == again
    assert [r["negatives"] for r in a] != [r["negatives"] for r in other]
    for row in a:
        origins = [n["origin"] for n in row["negatives"]]
        assert origins == sorted(origins)  # "explicit" before "in_shard"
        keys = [(n["text"], n["image_path"]) for n in row["negatives"]]
        assert (row["target_text"], row["target_image_path"]) not in keys
        assert len(set(keys)) == len(keys)
        drawn = [n for n in row["negatives"] if n["origin"] == "in_shard"]
        assert len(drawn) == 3
        if row["subset"] == "cls":
            assert all(n["text"].startswith("label ") for n in drawn)  # from its own subset
        else:
            # a drawn negative is the other pair's target: the same reference
            targets = {r["target_image_path"]: r["target_image"] for r in a}
            assert all(n["image"] == targets[n["image_path"]] for n in drawn)
            assert all(load_image_bytes(n["image"]) == (image_root / n["image_path"]).read_bytes() for n in drawn)
    # a class with only one other target gets only that one
    (x, y) = read_all(input_cfg(write_jsonl(tmp_path / "two.jsonl", records[:2]), root=image_root), 3)
    assert [n["text"] for n in x["negatives"]] == ["label 1"] and [n["text"] for n in y["negatives"]] == ["label 0"]
    assert all(n["origin"] == "explicit" for r in read_all(cfg, 0) for n in r["negatives"])


# --------------------------------------------------------------------------- demo data


def test_demo_data_builds_and_reads_valid(tmp_path):
    jsonl = make_demo(tmp_path / "demo", n_pairs=200)
    mtime = jsonl.stat().st_mtime_ns
    assert make_demo(tmp_path / "demo", n_pairs=200) == jsonl and jsonl.stat().st_mtime_ns == mtime  # idempotent
    cfg = input_cfg(jsonl, root=tmp_path / "demo", rows_per_shard=50)
    rows = read_all(cfg, negatives=3)
    assert len(rows) == 200 and all(r["quarantine_reason"] is None for r in rows)
    assert len({r["pair_id"] for r in rows}) == 200
    subsets = {r["subset"] for r in rows}
    assert len(subsets) == 5
    explicit = [r for r in rows if any(n["origin"] == "explicit" for n in r["negatives"])]
    assert 40 < len(explicit) < 120
    assert any(n["image"] for r in explicit for n in r["negatives"])
    assert sum(r["query_image"] is not None for r in rows) >= 120 and any(r["target_image"] for r in rows)
    assert any("<|image_1|>" in r["query_text"] for r in rows)
    labels = [r["target_text"] for r in rows if r["subset"] == "shapes_cls"]
    assert len(set(labels)) < len(labels) / 4  # classification: few labels, many queries
    assert (tmp_path / "demo" / "pairs.jsonl").read_bytes() == make_demo(tmp_path / "again", 200).read_bytes()
    bigger = read_all(input_cfg(make_demo(tmp_path / "x2", n_pairs=200, scale=2), root=tmp_path / "x2",
                                rows_per_shard=100), negatives=0)
    assert len({r["pair_id"] for r in bigger}) == 400 and all(r["quarantine_reason"] is None for r in bigger)


# --------------------------------------------------------------------------- the reader's contract


def test_read_shard_table_is_work_schema_with_only_the_pair_columns(tmp_path):
    """What a read task hands on (pipeline/read_source.py runs it in Ray): the rows of read_shard as one
    WORK_SCHEMA table, checked against the reader's CONTRACT, which refuses a row with a later stage's column."""
    from stages.contract import ContractError
    from stages.read import CONTRACT, read_shard_table

    jsonl = make_demo(tmp_path / "demo", n_pairs=40)
    with open(jsonl, "a") as f:
        f.write("{broken\n")
    cfg = input_cfg(jsonl, root=tmp_path / "demo", rows_per_shard=30)
    specs = plan_shards(cfg)
    tables = [read_shard_table(s, ReadSpec.from_input(cfg, 2, 7)) for s in specs]
    assert all(t.schema == schemas.WORK_SCHEMA for t in tables)
    direct = [r for s in specs for r in read_shard(s, ReadSpec.from_input(cfg, 2, 7))]
    assert pa.concat_tables(tables).to_pylist() == schemas.conform(direct, schemas.WORK_SCHEMA).to_pylist()
    assert [r["quarantine_reason"] for r in direct].count("malformed_record") == 1
    assert set(CONTRACT.writes) == set(schemas.PAIR_COLUMNS) and not CONTRACT.reads
    with pytest.raises(ContractError, match="s_direct"):
        CONTRACT.check_source(schemas.conform([{**direct[0], "s_direct": 0.5}], schemas.WORK_SCHEMA))
