"""Normalisation of every image kind a catalog sends: modes, orientation, size, and the reject reasons."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, UnidentifiedImageError

from fashionlabel.images import ImageReject, decode, normalise

KW = {"max_side": 64, "quality": 85, "max_pixels": 4_000_000, "min_side": 8}


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def decoded(jpg: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(jpg))
    assert img.format == "JPEG" and img.mode == "RGB"
    return img


def reason(data: bytes, **kw) -> str:
    with pytest.raises(ImageReject) as e:
        normalise(data, **(KW | kw))
    return e.value.reason


def test_exif_orientation_is_applied():
    # 40x20 landscape, left half red; EXIF orientation 6 = "rotate 90° clockwise to display"
    img = Image.new("RGB", (40, 20), "blue")
    img.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    jpg, orig, size = normalise(encode(img, "JPEG", exif=exif.tobytes()), **KW)
    out = decoded(jpg)
    assert orig == (40, 20) and size == out.size == (20, 40)
    top, bottom = out.getpixel((10, 5)), out.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # the red half is on top after rotating clockwise
    assert bottom[2] > 200 and bottom[0] < 60


@pytest.mark.parametrize(
    "mode,fmt,expect",
    [
        ("CMYK", "JPEG", (255, 255, 0)),  # yellow in CMYK
        ("L", "PNG", (128, 128, 128)),
        ("1", "PNG", (255, 255, 255)),
        ("RGB", "WEBP", (10, 200, 30)),
        ("RGB", "BMP", (10, 200, 30)),
        ("RGB", "TIFF", (10, 200, 30)),
    ],
)
def test_any_mode_becomes_rgb(mode, fmt, expect):
    colour = {"CMYK": (0, 0, 255, 0), "L": 128, "1": 1, "RGB": (10, 200, 30)}[mode]
    jpg, _, _ = normalise(encode(Image.new(mode, (32, 24), colour), fmt), **KW)
    px = decoded(jpg).getpixel((16, 12))
    assert all(abs(a - b) <= 12 for a, b in zip(px, expect, strict=True)), px


def test_alpha_and_palette_transparency_go_on_white():
    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 0))  # fully transparent red
    rgba.paste((0, 0, 255, 255), (0, 0, 16, 32))  # opaque blue left half
    out = decoded(normalise(encode(rgba, "PNG"), **KW)[0])
    assert out.getpixel((24, 16)) >= (245, 245, 245) and out.getpixel((4, 16))[2] > 230
    la = decoded(normalise(encode(Image.new("LA", (32, 32), (0, 0)), "PNG"), **KW)[0])
    assert la.getpixel((16, 16)) >= (245, 245, 245)
    pal = Image.new("P", (32, 32), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    gif = encode(pal, "GIF", transparency=1)
    assert decoded(normalise(gif, **KW)[0]).getpixel((16, 16)) >= (245, 245, 245)
    pal_png = decoded(normalise(encode(pal, "PNG"), **KW)[0])  # palette without transparency: green
    assert pal_png.getpixel((16, 16))[1] > 230


def test_sixteen_bit_and_float_greyscale():
    a16 = np.full((24, 32), 40000, dtype=np.uint16)
    png16 = encode(Image.fromarray(a16), "PNG")
    assert Image.open(io.BytesIO(png16)).mode.startswith("I")
    px = decoded(normalise(png16, **KW)[0]).getpixel((16, 12))
    assert abs(px[0] - round(40000 / 257)) <= 3  # top 8 bits, neither clipped to 255 nor stretched
    f = np.linspace(0.0, 1.0, 32 * 24, dtype=np.float32).reshape(24, 32)
    tif = encode(Image.fromarray(f, "F"), "TIFF")
    out = decoded(normalise(tif, **KW)[0])
    assert out.getpixel((0, 0))[0] < 20 and out.getpixel((31, 23))[0] > 235


def test_longest_side_bounded_orig_size_kept_one_quality():
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (900, 1200, 3), dtype=np.uint8))
    jpg, orig, size = normalise(encode(big, "JPEG", quality=95), **KW)
    assert orig == (1200, 900) and size == decoded(jpg).size == (64, 48)
    small = Image.new("RGB", (30, 20), "red")
    jpg2, orig2, size2 = normalise(encode(small, "PNG"), **KW)
    assert orig2 == size2 == (30, 20)  # never upscaled
    # the same pixels at two source qualities give the same output size class: one quality setting
    q = [len(normalise(encode(big, "JPEG", quality=sq), **KW)[0]) for sq in (60, 98)]
    assert abs(q[0] - q[1]) / max(q) < 0.2


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (20, 20), c) for c in ("red", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    px = decoded(normalise(buf.getvalue(), **KW)[0]).getpixel((10, 10))
    assert px[0] > 200 and px[2] < 60


def _png_header_only(w: int, h: int) -> bytes:
    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_reject_reasons():
    jpg = encode(
        Image.fromarray(np.random.default_rng(1).integers(0, 255, (200, 300, 3), dtype=np.uint8)), "JPEG"
    )
    png = encode(
        Image.fromarray(np.random.default_rng(2).integers(0, 255, (200, 300, 3), dtype=np.uint8)), "PNG"
    )
    assert reason(b"") == "image_empty"
    assert reason(b"<html><body>404</body></html>") == "not_an_image"
    assert reason(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n") == "not_an_image"  # never run gs
    assert reason(jpg[: len(jpg) // 2]) == "image_truncated"
    assert reason(png[: len(png) // 2]) == "image_truncated"
    assert reason(jpg[:200]) in ("image_truncated", "not_an_image")
    assert reason(_png_header_only(100_000, 100_000)) == "image_too_large"  # refused from the header alone
    assert reason(encode(Image.new("RGB", (1, 1)), "PNG")) == "image_too_small"
    assert reason(encode(Image.new("RGB", (1, 1)), "GIF")) == "image_too_small"
    assert reason(jpg, max_pixels=1000) == "image_too_large"


def test_decode_of_a_shard_member_opens_only_raster_formats():
    # a shard holds JPEGs; a tampered member in EPS is refused when opened, before Ghostscript could run
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto 10 10 lineto stroke\nshowpage\n"
    with pytest.raises(UnidentifiedImageError):
        decode(eps, (8, 6))
    jpg = encode(Image.new("RGB", (30, 40), (200, 10, 10)), "JPEG")
    assert decode(jpg, (8, 6)).shape == (8, 6, 3)
