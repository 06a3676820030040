"""Is a record a usable pair? Parse one input record into the pair columns of a row, or raise `Bad` with
its reason code (schemas/reasons.py) at the first problem.

A record is checked in two steps so that pair_id ownership (stages/duplicates.py) is known without opening
an image: `parse_row` checks fields, types and texts and fixes the pair_id, then `check_images` reads and
decodes each image once and records its reference.

An image field may hold a path (relative to image_root), raw bytes, a `{"bytes", "path"}` struct (how
`datasets.Image` stores images), or a tar member (stages/inputs/base.py:InlineImage); inline bytes are used as
they are. Paths must stay inside image_root after resolving `..` and symlinks; absolute paths are refused. Each
image is decoded once, by `stages.images.decode_image`, to validate it; the row keeps a reference to the bytes
(schemas IMAGE_REF), never the bytes: the resolved file, the member's data range in an uncompressed tar, or for
other inline bytes their copy in the job's content-addressed store (stages/images.py:InlineStore).

pair_id, when the record has none, is a sha256 over the normalized query, target and explicit negatives
(texts, and image paths or, for path-less inline images, a digest of the bytes); subset is not part of it,
so the same pair gets the same id in every format.
"""
from __future__ import annotations

import hashlib
import json
import re
import stat
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path, PurePosixPath
from typing import Optional

import schemas  # the current version (schemas/__init__.py re-exports it)
from stages.backends.base import IMAGE_MARKER
from stages.images import ImageError, InlineStore, decode_image, image_identity, image_ref, sha256_digest
from stages.inputs.base import Bad, InlineImage

PAIR_ID_CHARS = 20


def blank_row(spec: dict, row_index: int) -> dict:
    """The row of one record before it is parsed: identity from the shard, every pair column empty."""
    row = dict.fromkeys(schemas.PAIR_COLUMNS)
    row.update(
        subset=spec["subset"],
        source=spec["source"],
        shard_id=int(spec["shard_id"]),
        row_index=row_index,
        negatives=[],
    )
    return row


# --------------------------------------------------------------------------- fields


@dataclass(frozen=True)
class ImageField:
    """An image field of a record, parsed: a path under image_root, or inline bytes (with the name they came
    under, if any, and where they can be read again as they are)."""

    path: Optional[str]
    data: Optional[bytes]  # inline bytes; None: load `path` from image_root
    at: Optional[tuple[str, int]] = None  # (file, offset) holding `data` as it is: a member of an uncompressed tar

    @property
    def present(self) -> bool:
        return self.path is not None or self.data is not None

    def identity(self) -> Optional[str]:
        if self.path is not None or self.data is None:
            return image_identity(self.path, None)
        return image_identity(None, sha256_digest(self.data))


_NO_IMAGE = ImageField(None, None)


def parse_row(row: dict, rec: dict, max_query_chars: int) -> tuple:
    """Parse and check one record into `row`, all but its images; raises Bad at
    the first problem, after filling the identity fields it could. Returns the
    image references for `load_images`."""
    subset = _identity(rec, ("subset", "dataset"))
    if subset:
        row["subset"] = subset
    explicit_id = _identity(rec, ("pair_id", "id"))
    row["pair_id"] = explicit_id
    q_text, q_img = _text(rec.get("qry"), "qry"), _image_field(rec.get("qry_image_path"), "qry_image_path")
    t_text, t_img = _text(rec.get("pos_text"), "pos_text"), _image_field(rec.get("pos_image_path"), "pos_image_path")
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


def _image_field(value, field: str) -> ImageField:
    if value is None or value == "":
        return _NO_IMAGE
    if isinstance(value, str):
        return ImageField(_checked_str(value, field), None)
    if isinstance(value, (bytes, bytearray)):
        return ImageField(None, bytes(value))
    if isinstance(value, InlineImage):
        return ImageField(_checked_str(value.name, field), value.data, value.at)
    if isinstance(value, dict) and set(value) <= {"bytes", "path"}:
        path, data = value.get("path") or None, value.get("bytes")
        if (path is None or isinstance(path, str)) and (data is None or isinstance(data, (bytes, bytearray))):
            return ImageField(path and _checked_str(path, field), None if data is None else bytes(data))
    raise Bad("wrong_type", f"{field} must be a path, bytes or {{bytes, path}}, got {type(value).__name__}")


def _negatives(texts, images) -> list[tuple[Optional[str], ImageField]]:
    texts = texts if isinstance(texts, list) else [texts]
    images = images if isinstance(images, list) else [images]
    out = []
    for i, (t, im) in enumerate(zip_longest(texts, images)):
        t, im = _text(t, f"neg_text[{i}]"), _image_field(im, f"neg_image_path[{i}]")
        if t is not None or im.present:
            out.append((t, im))
    return out


def _content_id(q_text, q_img, t_text, t_img, negs) -> str:
    blob = json.dumps(
        [q_text, q_img.identity(), t_text, t_img.identity(), [[t, i.identity()] for t, i in negs]],
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:PAIR_ID_CHARS]


# --------------------------------------------------------------------------- images


def check_images(row: dict, images: tuple, checker: "ImageChecker") -> None:
    """Read and validate the images that `parse_row` found, and put their references in `row`; raises Bad for
    the first bad one."""
    q_img, t_img, negs = images
    row["query_image"] = checker.check(q_img, "query")
    row["target_image"] = checker.check(t_img, "target")
    row["negatives"] = [
        {"text": t, "image_path": i.path, "image": checker.check(i, "negative"), "origin": "explicit"} for t, i in negs
    ]


class ImageChecker:
    """Validates one shard's images, each file and each inline image at most once, and makes their references.
    `store`: where inline bytes that no file holds as they are go (None: an input that has none)."""

    def __init__(self, root: Path, max_pixels: int, store: Optional[InlineStore] = None):
        self.root = root.resolve()
        self.max_pixels = max_pixels
        self.store = store
        # No legitimate image of an allowed format is bigger than 16-bit RGBA
        # raw; the cap keeps a huge file from being read into memory at all.
        self.max_bytes = 8 * max_pixels + (1 << 20)
        self._files: dict[str, dict | Bad] = {}  # path as written -> reference or problem
        self._valid_inline: set[str] = set()  # digests of inline images found valid

    def check(self, field: ImageField, side: str) -> Optional[dict]:
        if field.data is not None:
            return self._check_inline(field, side)
        if field.path is None:
            return None
        if field.path not in self._files:
            try:
                self._files[field.path] = self._read(field.path, side)
            except Bad as bad:
                self._files[field.path] = bad
        result = self._files[field.path]
        if isinstance(result, Bad):
            raise Bad(result.reason, result.detail)
        return result

    def _check_inline(self, field: ImageField, side: str) -> dict:
        digest = sha256_digest(field.data)
        if digest not in self._valid_inline:  # a bad one is checked again, for a detail that names this field
            self._check(field.data, f"{side} image {field.path or '(inline)'}")
            self._valid_inline.add(digest)
        if field.at is not None:  # the input holds the bytes as they are: point there
            return image_ref(field.at[0], field.at[1], len(field.data), digest)
        if self.store is None:
            raise ValueError("inline images need an InlineStore (the read's images_dir)")
        return self.store.put(field.data, digest)

    def _read(self, rel: str, side: str) -> dict:
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
        return image_ref(str(full), 0, len(data), sha256_digest(data))

    def _check(self, data: bytes, what: str) -> None:
        if len(data) > self.max_bytes:
            raise Bad("image_too_large", f"{what} is {len(data)} bytes")
        try:
            decode_image(data, self.max_pixels)
        except ImageError as e:
            raise Bad(e.reason, f"{what}: {e.detail}") from None

