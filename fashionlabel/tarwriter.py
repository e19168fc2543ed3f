"""A minimal, fast tar writer for shards: regular files only, fixed metadata, POSIX ustar headers.

``tarfile`` builds every header through its general machinery (PAX/GNU extension checks, per-field
encoders); for shards of small JPEGs that costs as much as the JPEG encode. A shard needs one thing: a
512-byte ustar header per member (GNU ``././@LongLink`` for names over 100 bytes, which every reader,
``tarfile`` and webdataset included, understands), the data, padding, and two zero blocks at the end.
Metadata is fixed (mode 0444, uid/gid 0, mtime 0), so the same input gives the same bytes.
"""

from __future__ import annotations

from typing import BinaryIO

BLOCK = 512


def _header(name: bytes, size: int, typeflag: bytes = b"0") -> bytes:
    h = bytearray(BLOCK)
    h[0 : len(name)] = name
    h[100:108] = b"0000444\0"
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"00000000000\0"
    h[148:156] = b"        "  # checksum is computed with this field as spaces
    h[156:157] = typeflag
    h[257:265] = b"ustar\x0000"
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


class TarWriter:
    """``with TarWriter(open(path, "wb")) as tar: tar.add("key.jpg", data)``; closes the file at exit."""

    def __init__(self, f: BinaryIO):
        self.f = f

    def add(self, name: str, data: bytes) -> None:
        raw = name.encode("utf-8")
        if len(raw) > 100:
            long = raw + b"\0"
            self.f.write(_header(b"././@LongLink", len(long), b"L") + long + b"\0" * (-len(long) % BLOCK))
            raw = raw[:100]
        self.f.write(_header(raw, len(data)))
        self.f.write(data)
        self.f.write(b"\0" * (-len(data) % BLOCK))

    def close(self) -> None:
        self.f.write(b"\0" * (2 * BLOCK))
        self.f.close()

    def __enter__(self) -> TarWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
