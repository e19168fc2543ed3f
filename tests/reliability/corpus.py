"""A programmatic corpus of bad (and awkward-but-valid) catalog rows and image files.

Every entry is built here from PIL, raw bytes and hand-made CSV lines, so the suite needs no fixture files
and each kind says what it is. ``BAD`` kinds must end in quarantine with the given reason; ``VALID`` kinds
are odd but legitimate images that must be packed, normalised (RGB, orientation applied, bounded size) and
labelled, each with a pixel check that proves the normalisation.
"""

from __future__ import annotations

import io
import struct
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(side: int = 40_000) -> bytes:
    """A 1.6-gigapixel PNG header with a tiny body: decoding it would need GiBs; its file is < 100 bytes."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 1024))
        + png_chunk(b"IEND", b"")
    )


def alpha_png() -> bytes:
    """Left half opaque red, right half fully transparent (must become white, not black)."""
    a = np.zeros((80, 60, 4), np.uint8)
    a[:, :30] = (*RED, 255)
    a[:, 30:] = (*BLUE, 0)
    return _save(Image.fromarray(a, "RGBA"), "PNG")


def palette_png_transparent() -> bytes:
    img = Image.new("P", (60, 80), 0)
    img.putpalette([*GREEN, *BLUE] + [0] * 762)
    img.paste(1, (30, 0, 60, 80))
    return _save(img, "PNG", transparency=1)


def cmyk_jpeg() -> bytes:
    return _save(Image.new("CMYK", (60, 80), (255, 0, 0, 0)), "JPEG", quality=95)  # pure cyan


def png16() -> bytes:
    a = np.tile(np.linspace(0, 65535, 60, dtype=np.uint16), (80, 1))  # left black → right white
    return _save(Image.fromarray(a), "PNG")  # uint16 → mode I;16


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (60, 80), RED), Image.new("RGB", (60, 80), BLUE)]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def webp() -> bytes:
    return _save(Image.new("RGB", (60, 80), GREEN), "WEBP", quality=90)


def exif_rotated_jpeg() -> bytes:
    """Stored 80 wide × 60 high with a red band on its top rows; EXIF orientation 6 says "rotate 90°
    clockwise to display", so the displayed image is 60 × 80 with the band down its right side."""
    a = np.full((60, 80, 3), 255, np.uint8)
    a[:15] = RED
    img = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(img, "JPEG", quality=95, exif=exif.tobytes())


def grey_jpeg() -> bytes:
    return _save(Image.new("L", (60, 80), 128), "JPEG")


def huge_jpeg() -> bytes:
    return _save(Image.new("RGB", (3000, 4000), BLUE), "JPEG", quality=70)


def html_page() -> bytes:
    return (
        b"<!DOCTYPE html><html><head><title>503 Service Unavailable</title></head><body>Error</body></html>"
    )


# ---- checks on the normalised image (H×W×3 uint8 decoded from the shard) -------------------------------
def near(px, rgb, tol: int = 40) -> bool:
    return all(abs(int(a) - b) <= tol for a, b in zip(px, rgb, strict=True))


def check_alpha(a: np.ndarray) -> bool:
    h, w, _ = a.shape
    return near(a[h // 2, w // 8], RED) and near(a[h // 2, w - w // 8], WHITE)


def check_palette(a: np.ndarray) -> bool:
    h, w, _ = a.shape
    return near(a[h // 2, w // 8], GREEN) and near(a[h // 2, w - w // 8], WHITE)


def check_cyan(a: np.ndarray) -> bool:
    return near(a[40, 30], (0, 255, 255), tol=60)


def check_grad(a: np.ndarray) -> bool:
    h, w, _ = a.shape
    return (
        int(a[h // 2, w - 2].mean()) > 200
        and int(a[h // 2, 1].mean()) < 55
        and (a[..., 0] == a[..., 2]).all()
    )


def check_color(rgb) -> Callable[[np.ndarray], bool]:
    return lambda a: near(a[a.shape[0] // 2, a.shape[1] // 2], rgb)


def check_rotated(a: np.ndarray) -> bool:
    h, w, _ = a.shape
    return (h, w) == (80, 60) and near(a[h // 2, w - 3], RED) and near(a[h // 2, 3], WHITE)


def check_huge(a: np.ndarray) -> bool:
    return max(a.shape[:2]) <= 256 and a.shape[:2] == (256, 192) and near(a[10, 10], BLUE)


@dataclass(frozen=True)
class Valid:
    kind: str
    data: bytes
    check: Callable[[np.ndarray], bool]
    suffix: str = ".img"


VALID = [
    Valid("PNG with alpha channel", alpha_png(), check_alpha, ".png"),
    Valid("palette PNG with transparency", palette_png_transparent(), check_palette, ".png"),
    Valid("CMYK JPEG", cmyk_jpeg(), check_cyan, ".jpg"),
    Valid("16-bit greyscale PNG", png16(), check_grad, ".png"),
    Valid("animated GIF (first frame)", animated_gif(), check_color(RED), ".gif"),
    Valid("WebP", webp(), check_color(GREEN), ".webp"),
    Valid("EXIF-rotated JPEG", exif_rotated_jpeg(), check_rotated, ".jpg"),
    Valid("greyscale JPEG", grey_jpeg(), check_color((128, 128, 128)), ".jpg"),
    Valid("huge dimensions under the pixel limit (3000x4000)", huge_jpeg(), check_huge, ".jpg"),
    Valid(
        "PNG saved with a .jpg extension",
        _save(Image.new("RGB", (60, 80), BLUE), "PNG"),
        check_color(BLUE),
        ".jpg",
    ),
]


# ---- a tiny HTTP server: error pages served as images ----------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, str, bytes]] = {}

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        code, ctype, body = self.routes.get(self.path, (404, "text/html", b"<html>Not Found</html>"))
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a) -> None:  # quiet
        pass


class ImageServer:
    def __init__(self, routes: dict[str, tuple[int, str, bytes]]):
        handler = type("H", (_Handler,), {"routes": routes})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=partial(self.httpd.serve_forever, 0.1), daemon=True)

    def __enter__(self) -> ImageServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def write(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)
