"""Shard images: normalised once when packed, decoded the same way wherever a model reads them.

``normalise`` turns the source bytes into the JPEG a shard stores: EXIF orientation applied,
any mode converted to 8-bit RGB (CMYK, palette, 16-bit and float greyscale; alpha composited on white, as
catalog photos are shot on white), the longest side reduced to ``max_side`` and one JPEG quality. JPEG
sources are decoded at reduced scale when they are much larger than needed (libjpeg's DCT scaling, as
img2dataset and Pillow's ``draft`` do), which is the single largest saving on big photos.

Only raster formats a catalog photo plausibly uses are opened (never EPS/PostScript, which Pillow hands to
an external interpreter). Rejections raise ``ImageReject`` with a stable reason (the quarantine
vocabulary in ``catalog.REASONS``): ``image_empty``, ``not_an_image``, ``image_truncated``,
``image_too_large`` (pixel limit, the decompression-bomb guard, checked from the header before any pixel
is decoded), ``image_too_small``.

``decode`` is the one CPU decode of a shard's JPEG into model input: training, evaluation and the labelling
read tasks all use it, so the pixels a model is measured on are those it labels (``--decode gpu`` decodes
with nvJPEG instead: ``label/predictor.py``).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# We enforce our own pixel limit from the header; PIL's global one would raise mid-way with its own text.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False
Image.init()  # register every plugin once, so the allow-list below resolves
FORMATS = tuple(f for f in ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF") if f in Image.OPEN)


class ImageReject(Exception):
    """An image ``normalise`` refuses; ``reason`` is a stable quarantine reason (``catalog.REASONS``)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode.startswith("I;16"):
        # 16-bit greyscale: the top 8 bits, as a viewer shows it (not clipped at 255, not stretched).
        a = np.asarray(img.convert("I") if img.mode != "I;16" else img, dtype=np.float32)
        img = Image.fromarray((a / 257.0).round().clip(0, 255).astype(np.uint8), "L")
    elif img.mode in ("I", "F"):
        # 32-bit int / float greyscale carries no fixed white point: scale the image's own range to 8 bits.
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        img = Image.fromarray(np.nan_to_num((a - lo) * scale).clip(0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode in ("L", "RGB") and "transparency" in img.info
    ):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _transpose(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img) or img
    except Exception:  # noqa: BLE001 - a broken EXIF block is no reason to lose the photo
        return img


def normalise(
    data: bytes, *, max_side: int, quality: int, max_pixels: int, min_side: int
) -> tuple[bytes, tuple[int, int], tuple[int, int]]:
    """Source bytes → (JPEG bytes, original (w, h), new (w, h)); raises ``ImageReject``.

    Args:
        data: the source file's bytes.
        max_side: longest side of the output, in pixels.
        quality: JPEG quality of the output.
        max_pixels: sources with more pixels are refused before decoding (decompression bombs).
        min_side: sources with a shorter side are refused (tracking pixels, icons).
    """
    if not data:
        raise ImageReject("image_empty", "0 bytes")
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError as e:
        # Never echo the bytes: a catalog may point at files whose content must not reach the outputs.
        raise ImageReject(
            "not_an_image", f"{len(data)} bytes in no supported format ({', '.join(FORMATS)})"
        ) from e
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
            if img.format in ("JPEG", "MPO") and max(w, h) >= 2 * max_side:
                # Decode at 1/2, 1/4 or 1/8 scale, never below max_side on either side (draft keeps
                # both sides >= the requested box, so rotation by EXIF does not matter).
                img.draft(img.mode, (max_side, max_side))
            img.load()  # first frame only for animated formats
    except OSError as e:
        raise ImageReject("image_truncated", str(e)[:200]) from e
    except Exception as e:  # noqa: BLE001
        raise ImageReject("not_an_image", f"decode failed: {str(e)[:200]}") from e
    try:
        img = _to_rgb(_transpose(img))
    except Exception as e:  # noqa: BLE001 - an exotic mode we cannot convert
        raise ImageReject("not_an_image", f"cannot convert mode {img.mode}: {str(e)[:160]}") from e
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.BILINEAR, reducing_gap=2.0)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), (w, h), img.size


# Shard images are normalised to a few hundred pixels a side; anything past this is not one of them.
DECODE_MAX_PIXELS = 40_000_000
# why a shard sample without an image is left out (training, evaluation) or gets an error row (labelling)
MISSING_IMAGE = "missing image: the shard has no jpg for this product"


def decode(jpg: bytes, size: tuple[int, int]) -> np.ndarray:
    """JPEG bytes → H×W×3 uint8 at ``size`` = (height, width); raises on undecodable bytes.

    The one decode of model inputs (training, evaluation, labelling read tasks), so the pixels a model is
    measured on are those it labels. Free of torch, so read tasks never import it (seconds each on a
    busy machine before their first shard).
    """
    # the same allow-list as ``normalise``: a tampered shard member in EPS would run Ghostscript
    img = Image.open(io.BytesIO(jpg), formats=FORMATS)
    # PIL's own guard is off in this module (see above): check the header before any pixel is decoded, so
    # a tampered shard member cannot take a read task's memory
    if img.size[0] * img.size[1] > DECODE_MAX_PIXELS:
        raise ValueError(f"{img.size[0]}x{img.size[1]} pixels, over {DECODE_MAX_PIXELS:,}")
    img.draft("RGB", (size[1], size[0]))  # libjpeg downscales by 2/4/8 while decoding: much faster
    img = img.convert("RGB")
    if img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)
