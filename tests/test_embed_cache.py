"""The embedding disk cache: exact round trips, keys, torn and stray files, concurrent writers."""
import multiprocessing
import shutil
from pathlib import Path

import numpy as np

from stages.embed_cache import (EmbeddingCache, content_key, decode_entry, embedder_identity, encode_entry,
                                image_digest, model_fingerprint)

DIM = 48


def vector(i: int) -> np.ndarray:
    return np.random.default_rng(i).standard_normal(DIM).astype(np.float32)


def test_a_hit_returns_the_stored_vector_bit_for_bit(tmp_path):
    keys = [f"{i:064x}" for i in range(20)]
    vectors = np.stack([vector(i) for i in range(20)])
    EmbeddingCache(tmp_path, "emb").put_many(keys, vectors)

    fresh = EmbeddingCache(tmp_path, "emb")  # another actor: nothing in its memory
    got = fresh.get_many(keys + ["f" * 64])
    assert got[-1] is None
    for want, have in zip(vectors, got[:-1]):
        assert have.dtype == np.float32 and have.tobytes() == want.tobytes()
    assert fresh.stats["disk_hits"] == 20 and fresh.stats["misses"] == 1
    fresh.get_many(keys[:3])  # now held in memory
    assert fresh.stats["memory_hits"] == 3
    assert EmbeddingCache(tmp_path, "other-embedder").get_many(keys[:1]) == [None]


def test_keys_cover_identity_text_and_image_bytes():
    img_a, img_b = image_digest(b"png-a"), image_digest(b"png-b")
    base = content_key("id1", "Query: a cat", img_a)
    assert base == content_key("id1", "Query: a cat", image_digest(b"png-a"))
    others = {content_key("id2", "Query: a cat", img_a), content_key("id1", "Query: a cat ", img_a),
              content_key("id1", "Query: a cat", img_b), content_key("id1", "Query: a cat", None)}
    assert base not in others and len(others) == 4


def test_embedder_identity_follows_weights_pooling_options_and_machine_settings(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 8}')
    (model / "model.safetensors").write_bytes(b"\x01" * (6 << 20))  # large: hashed by head and tail
    cfg = {"backend": "transformers", "model": str(model), "pooling": "last", "max_length": 512, "options": {}}
    ident = embedder_identity(cfg)

    copy = tmp_path / "copy-on-another-node"
    shutil.copytree(model, copy)
    assert embedder_identity({**cfg, "model": str(copy)}) == ident
    assert embedder_identity({**cfg, "pooling": "mean"}) != ident
    assert embedder_identity({**cfg, "max_length": 256}) != ident
    assert embedder_identity({**cfg, "options": {"dtype": "bfloat16"}}) != ident
    # the same config where a GPU decides the defaults (device, dtype, batching) it leaves unset
    cpu = {"device": "cpu", "dtype": "torch.float32", "batching": "exact"}
    gpu = {"device": "cuda", "dtype": "torch.bfloat16", "batching": "sorted"}
    assert embedder_identity({**cfg, "vector_settings": cpu}) != embedder_identity({**cfg, "vector_settings": gpu})

    blob = bytearray((model / "model.safetensors").read_bytes())
    blob[-5] = 2  # retrained weights: only the tail differs
    (model / "model.safetensors").write_bytes(bytes(blob))
    assert embedder_identity(cfg) != ident
    assert model_fingerprint("org/some-hub-model") == "id:org/some-hub-model"


def test_torn_entries_and_stray_temp_files_read_as_misses(tmp_path):
    cache = EmbeddingCache(tmp_path, "emb")
    key = "ab" * 32
    path = cache.path(key)
    path.parent.mkdir(parents=True)
    # a writer that died mid-write leaves its temp file, which no reader opens
    (path.parent / f".{key}.dead.tmp").write_bytes(encode_entry(vector(1))[:30])
    assert cache.get_many([key]) == [None]

    whole = encode_entry(vector(1))
    for torn in (whole[:7], whole[:-4], whole[:20] + b"\x00" * (len(whole) - 20), b""):
        path.write_bytes(torn)  # e.g. the rename reached the disk before the data did
        assert decode_entry(torn) is None
        assert EmbeddingCache(tmp_path, "emb").get_many([key]) == [None]
    corrupt = EmbeddingCache(tmp_path, "emb")
    corrupt.get_many([key])
    assert corrupt.stats["corrupt"] == 1

    corrupt.put_many([key], vector(1)[None])  # a miss is recomputed and rewritten whole
    assert EmbeddingCache(tmp_path, "emb").get_many([key])[0].tobytes() == vector(1).tobytes()
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp") and "dead" not in p.name]


def test_memory_layer_is_bounded(tmp_path):
    cache = EmbeddingCache(None, "emb", memory_bytes=10 * DIM * 4)
    keys = [f"{i:064x}" for i in range(25)]
    cache.put_many(keys, np.stack([vector(i) for i in range(25)]))
    assert len(cache.memory) == 10
    assert all(v is not None for v in cache.get_many(keys[-10:]))
    assert cache.get_many(keys[:1]) == [None]  # evicted, and there is no disk behind it


def _writer(root: str, worker: int, n: int) -> None:
    cache = EmbeddingCache(root, "emb")
    for i in range(n):
        # both workers write every key: the same content, so the same vector
        cache.put_many([f"{i:064x}"], vector(i)[None])
        if i % 7 == worker:
            cache.get_many([f"{(i * 3) % n:064x}"])


def test_concurrent_writers_never_expose_a_partial_entry(tmp_path):
    n = 1500
    ctx = multiprocessing.get_context("spawn")
    writers = [ctx.Process(target=_writer, args=(str(tmp_path), w, n)) for w in range(2)]
    for p in writers:
        p.start()
    reader = EmbeddingCache(tmp_path, "emb", memory_bytes=0)  # always from disk
    seen = 0
    while any(p.is_alive() for p in writers):
        for i in range(0, n, 13):
            got = reader.get_many([f"{i:064x}"])[0]
            if got is not None:
                seen += 1
                assert got.tobytes() == vector(i).tobytes()
    for p in writers:
        p.join()
        assert p.exitcode == 0
    assert reader.stats["corrupt"] == 0
    final = EmbeddingCache(tmp_path, "emb").get_many([f"{i:064x}" for i in range(n)])
    assert all(v is not None and v.tobytes() == vector(i).tobytes() for i, v in enumerate(final))
    leftovers = [p for p in Path(tmp_path).rglob("*") if p.is_file() and not p.name.endswith(".emb")]
    assert leftovers == [] and seen > 0


def test_a_cache_that_cannot_be_written_costs_forwards_not_rows(tmp_path):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder should be")
    cache = EmbeddingCache(blocked, "emb")
    cache.put_many(["ab" * 32], vector(3)[None])  # no exception: the batch goes on
    assert cache.stats["io_errors"] == 1 and cache.stats["writes"] == 0
    assert EmbeddingCache(blocked, "emb").get_many(["ab" * 32]) == [None]
    assert cache.get_many(["ab" * 32])[0].tobytes() == vector(3).tobytes()  # still held in memory
