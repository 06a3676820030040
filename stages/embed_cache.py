"""A disk cache of embeddings, keyed by (embedder identity, content), shared by every Embed actor of a job and
by later jobs.

Layout: ROOT/<embedder id>/<ab>/<cd>/<key>.emb, one file per vector, `key` = sha256 hex of the content (see
`content_key`), fanned out on its first two bytes so that no folder grows huge. An entry is

    b"PSE1" | dim: uint32 LE | crc32 of the payload: uint32 LE | payload: dim float32 LE

Safety without locks, on a local disk or a shared file system:
- a writer writes a temporary file (a dot name that no reader opens) and renames it into place
  (stages/files.py:atomic_write_bytes; os.replace is atomic): a reader sees no entry or a whole one, never a
  half-written one;
- two writers of one key write the same vector and the last rename wins, so a race costs a forward, not
  correctness;
- every read checks magic, length and checksum, so an entry torn by a power loss (the rename reached disk
  before the data; no fsync here) reads as a miss and is rewritten.

A crash leaves at most some dot-named temporary files, which reads never open.

Each cache also keeps recently used vectors in memory (`MEMORY_BYTES`), so the few inputs that repeat
thousands of times (a label shared by a whole classification subset) are not read from disk every batch.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import numpy as np

from stages.files import atomic_write_bytes

log = logging.getLogger(__name__)

MAGIC = b"PSE1"
HEADER = struct.Struct("<4sII")  # magic, dim, crc32
MEMORY_BYTES = 256 << 20
# Files up to this size are hashed whole for the model fingerprint; larger ones (weights) by head and tail.
_WHOLE_FILE_BYTES = 4 << 20
_EDGE_BYTES = 1 << 20


def model_fingerprint(model: str) -> str:
    """What identifies a model's weights. A local folder: its file names and sizes, small files (config,
    tokenizer) whole and large ones (weights) by their first and last MiB, so a rebuilt or fine-tuned model
    gets new keys while a copy of the same folder on another node gets the same ones. Anything else (a hub
    id) is taken as it is."""
    folder = Path(model).expanduser()
    if not folder.is_dir():
        return f"id:{model}"
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        size = path.stat().st_size
        h.update(f"{path.relative_to(folder).as_posix()}|{size}|".encode())
        with open(path, "rb") as f:
            if size <= _WHOLE_FILE_BYTES:
                h.update(f.read())
            else:
                h.update(f.read(_EDGE_BYTES))
                f.seek(size - _EDGE_BYTES)
                h.update(f.read(_EDGE_BYTES))
    return f"dir:{h.hexdigest()}"


def embedder_identity(embedder: dict) -> str:
    """A short hex id of everything that decides an embedder's vectors: backend, weights, pooling, max_length,
    options (all of them: device, dtype and even batch shapes can move the last bits) and `vector_settings`, what
    the backend decided where the options are silent (a GPU's defaults are not a CPU's). Instructions are not part
    of it: they are in the text that `content_key` hashes."""
    spec = {
        "backend": embedder["backend"],
        "model": model_fingerprint(embedder["model"]),
        "pooling": embedder["pooling"],
        "max_length": embedder["max_length"],
        "options": embedder.get("options") or {},
        "vector_settings": embedder.get("vector_settings") or {},
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def image_digest(data: Optional[bytes]) -> Optional[bytes]:
    """The sha256 of an image's bytes, as keys take it: the same as stages/images.py:digest_bytes of the image's
    reference, which Embed uses (the read hashed the bytes once), so keys did not change when images became
    references."""
    return None if data is None else hashlib.sha256(data).digest()


def content_key(identity: str, text: str, image_sha256: Optional[bytes]) -> str:
    """The key of one embedder input: embedder identity, instruction-filled text and the image's digest."""
    h = hashlib.sha256()
    h.update(identity.encode())
    h.update(b"\x00")
    h.update(text.encode("utf-8", "surrogatepass"))
    h.update(b"\x00")
    h.update(image_sha256 or b"-")  # a digest is 32 bytes, so "-" cannot collide with one
    return h.hexdigest()


def encode_entry(vector: np.ndarray) -> bytes:
    payload = np.ascontiguousarray(vector, dtype="<f4").tobytes()
    return HEADER.pack(MAGIC, len(payload) // 4, zlib.crc32(payload)) + payload


def decode_entry(blob: bytes) -> Optional[np.ndarray]:
    """The vector of an entry, or None if the bytes are not one whole, intact entry."""
    if len(blob) < HEADER.size:
        return None
    magic, dim, crc = HEADER.unpack_from(blob)
    payload = blob[HEADER.size:]
    if magic != MAGIC or len(payload) != 4 * dim or zlib.crc32(payload) != crc:
        return None
    return np.frombuffer(payload, dtype="<f4").astype(np.float32)


class EmbeddingCache:
    """get_many / put_many over one embedder's entries. root=None keeps vectors in memory only (this
    process, this job)."""

    def __init__(self, root: Optional[str | os.PathLike], identity: str, memory_bytes: int = MEMORY_BYTES):
        self.folder = None if root is None else Path(root) / identity
        self.identity = identity
        self.memory: OrderedDict[str, np.ndarray] = OrderedDict()
        self.memory_bytes = memory_bytes
        self._held = 0
        self.stats = {"memory_hits": 0, "disk_hits": 0, "misses": 0, "corrupt": 0, "writes": 0, "io_errors": 0}

    def key(self, text: str, image_sha256: Optional[bytes]) -> str:
        return content_key(self.identity, text, image_sha256)

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / key[2:4] / f"{key}.emb"

    def get_many(self, keys: list[str]) -> list[Optional[np.ndarray]]:
        return [self._get(k) for k in keys]

    def put_many(self, keys: list[str], vectors: np.ndarray) -> None:
        for key, vector in zip(keys, vectors):
            self._remember(key, np.asarray(vector, dtype=np.float32))
            if self.folder is not None:
                self._write(key, vector)

    def _get(self, key: str) -> Optional[np.ndarray]:
        vector = self.memory.get(key)
        if vector is not None:
            self.memory.move_to_end(key)
            self.stats["memory_hits"] += 1
            return vector
        if self.folder is not None:
            try:
                blob = self.path(key).read_bytes()
            except FileNotFoundError:
                blob = None
            except OSError as e:
                blob = None
                self._io_error("read", e)
            if blob is not None:
                vector = decode_entry(blob)
                if vector is not None:
                    self.stats["disk_hits"] += 1
                    self._remember(key, vector)
                    return vector
                self.stats["corrupt"] += 1
        self.stats["misses"] += 1
        return None

    def _write(self, key: str, vector: np.ndarray) -> None:
        """Best effort: a cache that cannot be written (full, read-only, deleted under us) costs forwards
        later, never the rows of this batch."""
        final = self.path(key)
        blob = encode_entry(vector)
        try:
            try:
                atomic_write_bytes(final, blob, durable=False)  # entries are checked on read: see above
            except FileNotFoundError:  # first entry of its folder
                final.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(final, blob, durable=False)
            self.stats["writes"] += 1
        except OSError as e:
            self._io_error("write", e)

    def _io_error(self, what: str, e: OSError) -> None:
        self.stats["io_errors"] += 1
        if self.stats["io_errors"] == 1:  # once per actor; the count is in the stage's stats
            log.warning("embedding cache %s under %s failed (%s); going on without it", what, self.folder, e)

    def _remember(self, key: str, vector: np.ndarray) -> None:
        if key in self.memory:
            self.memory.move_to_end(key)
            return
        self.memory[key] = vector
        self._held += vector.nbytes
        while self._held > self.memory_bytes and self.memory:
            _, old = self.memory.popitem(last=False)
            self._held -= old.nbytes
