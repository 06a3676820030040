"""Image checks, decoding and identity, shared by the reader (which validates) and the
model stages (which decode). Decoding is where untrusted bytes meet PIL, so the
pixel limit is enforced here, not left to PIL's warning, and only the plugins
of the allowed formats ever parse the bytes: other formats are recognised by
their magic bytes alone (PIL's `accept` checks) to name them in the reason."""
from __future__ import annotations

import hashlib
import io

from PIL import Image

# The PIL plugins that may parse input bytes.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
# What they may name an image: MPO is PIL's name for a JPEG that carries more than one picture (phone photos).
DECODED_FORMATS = ALLOWED_FORMATS + ("MPO",)


class ImageError(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def decode_image(data: bytes, max_pixels: int = 40_000_000) -> Image.Image:
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


def image_identity(path: str | None, data: bytes | None) -> str | None:
    """What names an image in a pair's identity: its path, or for a path-less inline image a digest of its
    bytes (so the same pair gets the same pair_id, and the same target is one target, in every format)."""
    if path is not None:
        return path
    return None if data is None else "sha256:" + hashlib.sha256(data).hexdigest()[:16]
