"""Images: checks and decoding, shared by the reader (which validates) and the model stages (which decode), and
image references, what travels between stages instead of the bytes.

Decoding is where untrusted bytes meet PIL, so the pixel limit is enforced here, not left to PIL's warning, and
only the plugins of the allowed formats ever parse the bytes: other formats are recognised by their magic bytes
alone (PIL's `accept` checks) to name them in the reason.

A reference (schemas IMAGE_REF) says where an image's bytes are (`size` bytes from `offset` of the file at
`path`) and their digest. The reader makes one per image (`image_ref`; inline bytes that have no file of their
own go to the content-addressed `InlineStore`, OUTPUT/_images/); the model stages load through `ImageLoader`,
which checks the digest, so a file that changed after the read quarantines its row instead of being used.
"""
from __future__ import annotations

import hashlib
import io
from collections import OrderedDict
from pathlib import Path
from typing import Optional

from PIL import Image

from stages.files import atomic_write_bytes

# The PIL plugins that may parse input bytes.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
# What they may name an image: MPO is PIL's name for a JPEG that carries more than one picture (phone photos).
DECODED_FORMATS = ALLOWED_FORMATS + ("MPO",)
# decoded images a model actor keeps (ImageLoader)
MEMORY_BYTES = 256 << 20


class ImageError(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode and fully load an RGB image, or raise ImageError(reason, detail)."""
    if not data:
        raise ImageError("image_empty", "0-byte image")
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as im:
            if im.format not in DECODED_FORMATS:
                raise ImageError("image_unsupported", f"format {im.format}")
            w, h = im.size
            # before load(): the declared size is all a decompression bomb needs to be caught
            if w * h > max_pixels:
                raise ImageError("image_too_large", f"{w}x{h} exceeds {max_pixels} pixels")
            im.load()
            return im.convert("RGB")
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError("image_too_large", str(e)) from None
    except Image.UnidentifiedImageError:
        other = sniff_format(data)
        if other is not None:
            raise ImageError("image_unsupported", f"format {other}") from None
        raise ImageError("image_corrupt", "not an image of a known format") from None
    except Exception as e:  # PIL raises many types for broken data (a truncated file: OSError)
        raise ImageError("image_corrupt", f"{type(e).__name__}: {e}") from None


def sniff_format(data: bytes) -> str | None:
    """The name of the image format whose magic bytes `data` starts with, among PIL's formats that are not
    allowed; None if none matches. Only each plugin's prefix check runs, never its parser."""
    Image.init()
    prefix = data[:16]
    for name, (_, accept) in Image.OPEN.items():
        if name in DECODED_FORMATS or accept is None:
            continue
        try:
            if accept(prefix):
                return name
        except Exception:  # a prefix check that needs more bytes than a short file has
            continue
    return None


DIGEST_PREFIX = "sha256:"
# the digest that names a path-less inline image in a pair's identity: the prefix and 16 hex digits
IDENTITY_CHARS = len(DIGEST_PREFIX) + 16


def sha256_digest(data: bytes) -> str:
    """An image's digest as references carry it: "sha256:<hex>"."""
    return DIGEST_PREFIX + hashlib.sha256(data).hexdigest()


def digest_bytes(ref: Optional[dict]) -> Optional[bytes]:
    """The raw sha256 of a referenced image (the embedding cache keys on it, stages/embed_cache.py)."""
    return None if ref is None else bytes.fromhex(ref["digest"][len(DIGEST_PREFIX):])


def image_identity(path: Optional[str], digest: Optional[str]) -> Optional[str]:
    """What names an image in a pair's identity: its path, or for a path-less inline image the start of its
    digest (so the same pair gets the same pair_id, and the same target is one target, in every format)."""
    if path is not None:
        return path
    return None if digest is None else digest[:IDENTITY_CHARS]


def image_ref(path: str, offset: int, size: int, digest: str) -> dict:
    """An IMAGE_REF (schemas/v6.py): `size` bytes from `offset` of the file at `path` (absolute), with their digest."""
    return {"path": path, "offset": offset, "size": size, "digest": digest}


# --------------------------------------------------------------------------- the reader's store of inline images



class InlineStore:
    """Inline image bytes that no file holds as they are (HF datasets, Parquet, compressed tars), stored once per
    digest as FOLDER/<ab>/<cd>/<hex>, and referenced there.

    Writes are atomic and not fsynced: the bytes are only needed while this job runs, and every load checks the
    digest. Each process writes a digest once (again if the file went since: an --overwrite between two jobs of
    one process); a shard read in a new process (a resumed run) writes its images again, so an entry torn by a
    power loss is replaced before any row refers to it. Two writers of one digest write the same bytes: the
    last rename wins."""

    _written: set = set()  # paths this process wrote, shared by its stores

    def __init__(self, folder: Optional[str]):
        self.folder = None if folder is None else Path(folder)

    def put(self, data: bytes, digest: str) -> dict:
        if self.folder is None:
            raise ValueError("inline images need a folder to be stored in (the read's images_dir)")
        hexdigest = digest[len(DIGEST_PREFIX):]
        path = (self.folder / hexdigest[:2] / hexdigest[2:4] / hexdigest).absolute()
        if str(path) not in self._written or not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, data, durable=False)
            self._written.add(str(path))
        return image_ref(str(path), 0, len(data), digest)


# --------------------------------------------------------------------------- loading in the model stages


def load_image_bytes(ref: dict) -> bytes:
    """The bytes a reference names, checked against its digest; ImageError otherwise (the file is gone, or it
    changed after the read validated it: its row is quarantined rather than labelled from other bytes)."""
    path = ref["path"]
    try:
        with open(path, "rb") as f:
            f.seek(ref["offset"])
            data = f.read(ref["size"])
    except OSError as e:
        raise ImageError("image_missing", f"{path}: {e.strerror or e} (it was there when the job read it)") from None
    if len(data) != ref["size"] or sha256_digest(data) != ref["digest"]:
        found = f"{len(data)} bytes" if len(data) != ref["size"] else sha256_digest(data)
        raise ImageError("image_corrupt", f"{path} changed after the read: bytes {ref['offset']}+{ref['size']} were "
                                          f"{ref['digest']}, now {found}; rerun the job on the new image")
    return data


class ImageLoader:
    """A model actor's images: each reference loaded (`load_image_bytes`) and decoded once, kept decoded in a
    small LRU by digest so the images shared by many pairs (a label image, a popular target) are not reread."""

    def __init__(self, max_pixels: int, memory_bytes: int = MEMORY_BYTES):
        self.max_pixels = max_pixels
        self.memory_bytes = memory_bytes
        self._images: OrderedDict[str, Image.Image] = OrderedDict()
        self._held = 0

    def image(self, ref: dict, data: Optional[bytes] = None) -> Image.Image:
        """The decoded image of `ref`; `data`: its bytes, when the caller already loaded them (not read again)."""
        digest = ref["digest"]
        image = self._images.get(digest)
        if image is not None:
            self._images.move_to_end(digest)
            return image
        image = decode_image(load_image_bytes(ref) if data is None else data, self.max_pixels)
        size = _decoded_bytes(image)
        if size <= self.memory_bytes:
            self._images[digest] = image
            self._held += size
            while self._held > self.memory_bytes:
                _, old = self._images.popitem(last=False)
                self._held -= _decoded_bytes(old)
        return image


def _decoded_bytes(image: Image.Image) -> int:
    return image.width * image.height * len(image.getbands())
