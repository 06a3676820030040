"""Image checks and decoding, shared by the reader (which validates) and the
model stages (which decode). Decoding is where untrusted bytes meet PIL, so the
pixel limit is enforced here, not left to PIL's warning."""
from __future__ import annotations

import io

from PIL import Image

ALLOWED_FORMATS = {"JPEG", "PNG", "WEBP", "GIF", "BMP"}


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
        with Image.open(io.BytesIO(data)) as im:
            if im.format not in ALLOWED_FORMATS:
                raise ImageError("image_unsupported", f"format {im.format}")
            w, h = im.size
            if w * h > max_pixels:
                raise ImageError("image_too_large", f"{w}x{h} exceeds {max_pixels} pixels")
            im.load()
            return im.convert("RGB")
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError("image_too_large", str(e)) from None
    except Exception as e:  # PIL raises many types for broken data
        raise ImageError("image_corrupt", f"{type(e).__name__}: {e}") from None
