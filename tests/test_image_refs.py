"""Images by reference: after the read only a small reference travels (no binary column), inline
bytes are kept in one place (a tar member where it is, other inline bytes once per digest in OUTPUT/_images), a
model stage that finds an image changed since the read quarantines its row, and inline or file images give the
same similarities (the embedding cache keys on the digest, as it did on the bytes)."""
import hashlib
import io
import tarfile
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from pipeline import config
from schemas import IMAGE_REF, WORK_SCHEMA, conform
from stages.embed import EmbedderSpec, EmbedSpec
from stages.embed_cache import image_digest
from stages.images import ImageLoader, digest_bytes, load_image_bytes
from stages.inputs import plan_shards
from stages.read import ReadSpec, read_shard, read_shard_table


def png(color, size=(24, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


COLORS = [(200, 10, 10), (10, 200, 10), (10, 10, 200)]


def input_cfg(path, fmt, root=None, per=3) -> dict:
    return {"path": str(path), "format": fmt, "image_root": str(root) if root else None, "subset": None,
            "rows_per_shard": per, "max_query_chars": 20000, "max_image_pixels": 40_000_000}


def read(cfg, images_dir, negatives=0) -> list[dict]:
    return [r for spec in plan_shards(cfg)
            for r in read_shard({**spec, "images_dir": str(images_dir)}, ReadSpec.from_input(cfg, negatives, 0))]


def binary_types(t: pa.DataType) -> list:
    """Every binary type inside `t`, however deep."""
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return [t]
    if pa.types.is_struct(t):
        return [b for f in t for b in binary_types(f.type)]
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return binary_types(t.value_type)
    return []


def hf_pairs(path: Path, n=6) -> Path:
    """n pairs, image query -> text label, whose query images repeat: COLORS[i % 3], as datasets.Image."""
    import datasets

    features = datasets.Features({"qry": datasets.Value("string"), "qry_image_path": datasets.Image(),
                                  "pos_text": datasets.Value("string")})
    datasets.Dataset.from_dict(
        {"qry": [f"<|image_1|>\nwhat colour? #{i}" for i in range(n)],
         "qry_image_path": [{"bytes": png(COLORS[i % 3]), "path": None} for i in range(n)],
         "pos_text": [("red", "green", "blue")[i % 3] for i in range(n)]},
        features=features).save_to_disk(str(path))
    return path


def test_only_a_reference_travels_after_the_read(tmp_path):
    assert not [f.name for f in WORK_SCHEMA if binary_types(f.type)]
    assert WORK_SCHEMA.field("query_image").type == IMAGE_REF == WORK_SCHEMA.field("target_image").type
    cfg = input_cfg(hf_pairs(tmp_path / "ds"), "hf")
    table = read_shard_table({**plan_shards(cfg)[0], "images_dir": str(tmp_path / "_images")},
                             ReadSpec.from_input(cfg, 0, 0))
    assert table.schema == WORK_SCHEMA and table.num_rows == 3
    refs = table["query_image"].to_pylist()
    # a reference is small: a path, a range and a digest, whatever the image's size
    assert all(set(r) == {"path", "offset", "size", "digest"} for r in refs)
    assert [load_image_bytes(r) for r in refs] == [png(c) for c in COLORS]


def test_inline_images_are_stored_once_per_digest(tmp_path):
    store = tmp_path / "_images"
    rows = read(input_cfg(hf_pairs(tmp_path / "ds"), "hf"), store)  # 6 rows, 2 shards, 3 distinct images
    assert [r["quarantine_reason"] for r in rows] == [None] * 6
    files = sorted(p for p in store.rglob("*") if p.is_file())
    assert len(files) == 3
    for row, color in zip(rows, COLORS * 2):
        data = png(color)
        ref = row["query_image"]
        assert ref["digest"] == "sha256:" + hashlib.sha256(data).hexdigest()
        assert Path(ref["path"]) == store / ref["digest"][7:9] / ref["digest"][9:11] / ref["digest"][7:]
        assert (ref["offset"], ref["size"]) == (0, len(data)) and Path(ref["path"]).read_bytes() == data
    # read again (a resumed run): the same references, still one file per digest
    assert read(input_cfg(tmp_path / "ds", "hf"), store) == rows
    assert sorted(p for p in store.rglob("*") if p.is_file()) == files


def _tar(path: Path, compressed: bool) -> Path:
    with tarfile.open(path, "w:gz" if compressed else "w") as tf:
        for i in range(4):
            for name, data in [(f"s{i}.qry.txt", b"<|image_1|>\nwhat colour?"), (f"s{i}.qry.png", png(COLORS[i % 3])),
                               (f"s{i}.pos.txt", ("red", "green", "blue")[i % 3].encode())]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def test_tar_members_are_referenced_in_place_unless_compressed(tmp_path):
    plain, packed = _tar(tmp_path / "a.tar", False), _tar(tmp_path / "b.tar.gz", True)
    in_place = read(input_cfg(plain, "webdataset"), tmp_path / "plain-store")
    stored = read(input_cfg(packed, "webdataset"), tmp_path / "packed-store")
    assert not (tmp_path / "plain-store").exists()
    blob = plain.read_bytes()
    for row, color in zip(in_place, COLORS + COLORS[:1]):
        ref = row["query_image"]
        assert ref["path"] == str(plain.resolve()) and ref["offset"] > 0
        assert blob[ref["offset"]:ref["offset"] + ref["size"]] == png(color) == load_image_bytes(ref)
    assert len([p for p in (tmp_path / "packed-store").rglob("*") if p.is_file()]) == 3
    # the same bytes, the same digest: the embedding cache and the labels see one image either way
    assert [r["query_image"]["digest"] for r in stored] == [r["query_image"]["digest"] for r in in_place]
    assert [load_image_bytes(r["query_image"]) for r in stored] == [png(c) for c in COLORS + COLORS[:1]]


@pytest.fixture(scope="module")
def embedder(tiny_models):
    # the demo's embedder settings; its input (data/demo) need not exist: only the embedder is used
    cfg = config.load("configs/demo.yaml", [f"embedder.model={tiny_models['embedder']}", "input.image_root=null"])
    return config.to_dict(cfg)["embedder"]


def _file_pairs(tmp_path: Path) -> tuple[dict, list[dict]]:
    import json

    root = tmp_path / "root"
    root.mkdir()
    for i, color in enumerate(COLORS):
        (root / f"c{i}.png").write_bytes(png(color))
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"qry": f"<|image_1|>\nwhat colour? #{i}", "qry_image_path": f"c{i % 3}.png",
                                        "pos_text": ("red", "green", "blue")[i % 3]}) + "\n" for i in range(6)))
    cfg = input_cfg(path, "mmeb", root, per=6)
    return cfg, read(cfg, tmp_path / "_images", negatives=2)


def test_a_changed_or_missing_image_quarantines_its_rows(tmp_path, embedder):
    """The read validated c0.png and c1.png; then c0.png is rewritten (another valid picture) and c1.png deleted.
    The real Embed stage must not label from the new bytes: rows whose query is c0 are image_corrupt, c1
    image_missing, each with a detail that says so; the rows of c2 are embedded."""
    cfg, rows = _file_pairs(tmp_path)
    root = Path(cfg["image_root"])
    (root / "c0.png").write_bytes(png((1, 2, 3)))
    (root / "c1.png").unlink()
    # in-shard negatives are other pairs' targets (texts here), so only the queries' images matter
    out = EmbedSpec(embedder=EmbedderSpec.from_config(embedder), max_image_pixels=40_000_000).build()(conform(rows, WORK_SCHEMA)).to_pylist()
    reasons = [(r["query_image_path"], r["quarantine_reason"]) for r in out]
    assert reasons == [("c0.png", "image_corrupt"), ("c1.png", "image_missing"), ("c2.png", None)] * 2
    assert all("changed after the read" in r["quarantine_detail"] for r in out if r["query_image_path"] == "c0.png")
    assert all(str(root / "c1.png") in r["quarantine_detail"] for r in out if r["query_image_path"] == "c1.png")
    assert all(r["s_direct"] is not None for r in out if r["quarantine_reason"] is None)
    with pytest.raises(Exception, match="changed after the read"):
        ImageLoader(40_000_000).image(rows[0]["query_image"])


def test_inline_and_file_images_give_the_same_similarities(tmp_path, embedder):
    """The same pairs with their images as files (JSONL) or inline (a datasets folder): the same digests, so
    the same embedding keys and the same similarities, bit for bit."""
    _, from_files = _file_pairs(tmp_path)
    inline = read(input_cfg(hf_pairs(tmp_path / "ds"), "hf", per=6), tmp_path / "_images", negatives=2)
    assert [digest_bytes(r["query_image"]) for r in inline] == [image_digest(png(COLORS[i % 3])) for i in range(6)]
    assert [digest_bytes(r["query_image"]) for r in from_files] == [digest_bytes(r["query_image"]) for r in inline]

    def sims(rows):
        out = EmbedSpec(embedder=EmbedderSpec.from_config(embedder), max_image_pixels=40_000_000).build()(conform(rows, WORK_SCHEMA)).to_pylist()
        return [(r["s_direct"], r["s_direct_neg"]) for r in out]

    assert sims(inline) == sims(from_files)
