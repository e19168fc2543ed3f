"""Image normalisation for shards: any input → RGB JPEG, orientation applied, longest side bounded.

Rejections raise ``ImageReject`` with a stable reason (quarantine vocabulary):
``image_empty``, ``not_an_image``, ``image_truncated``, ``image_too_large`` (pixel limit, the
decompression-bomb guard, checked from the header before any pixel is decoded), ``image_too_small``.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# We enforce our own pixel limit from the header; PIL's global one would raise mid-way with its own text.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageReject(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale the real range to 8 bits instead of clipping at 255.
        a = np.asarray(img, dtype=np.float64)
        hi = a.max() or 1.0
        img = Image.fromarray((a * (255.0 / hi)).clip(0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "RGBa"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def normalise(data: bytes, *, max_side: int, quality: int, max_pixels: int, min_side: int
              ) -> tuple[bytes, tuple[int, int], tuple[int, int]]:
    """Return (jpeg bytes, original (w, h), new (w, h)) or raise ``ImageReject``."""
    if not data:
        raise ImageReject("image_empty", "0 bytes")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as e:
        raise ImageReject("not_an_image", f"{len(data)} bytes, starts {data[:8]!r}") from e
    except Exception as e:  # noqa: BLE001 - corrupt headers raise anything
        raise ImageReject("not_an_image", str(e)[:200]) from e
    w, h = img.size
    if w * h > max_pixels:
        raise ImageReject("image_too_large", f"{w}x{h} exceeds the {max_pixels} pixel limit")
    if min(w, h) < min_side:
        raise ImageReject("image_too_small", f"{w}x{h} is below {min_side} px")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()  # first frame only for animated formats
            img = ImageOps.exif_transpose(img) or img
            img = _to_rgb(img)
    except OSError as e:
        raise ImageReject("image_truncated", str(e)[:200]) from e
    except Exception as e:  # noqa: BLE001
        raise ImageReject("not_an_image", f"decode failed: {str(e)[:200]}") from e
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.BILINEAR, reducing_gap=2.0)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), (w, h), img.size
