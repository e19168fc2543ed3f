"""Read and validate catalogs; resolve and fetch image URIs (local, file://, s3://, http(s)://).

A catalog is CSV, Parquet or JSON Lines with ``product_id`` and ``image_uri`` plus label and metadata
columns (design.md). Reading never raises on a bad *row*: each one becomes a quarantine record with a stable
reason string. It raises ``CatalogError`` only when the catalog as a whole cannot be read.
"""

from __future__ import annotations

import csv
import io
import json
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from fashionlabel import storage
from fashionlabel.taxonomy import Taxonomy

# A key must be a safe tar member name and a safe file name on every filesystem; webdataset splits
# extensions at the first dot, so dots are out too.
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")


class CatalogError(RuntimeError):
    """The catalog cannot be read at all (missing, unreadable, no product_id/image_uri columns)."""


class FetchError(Exception):
    """An image that cannot be fetched; ``reason`` is a stable quarantine reason."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Rejected:
    product_id: str
    image_uri: str
    reason: str
    detail: str

    def as_row(self) -> dict[str, str]:
        return {"product_id": self.product_id, "image_uri": self.image_uri, "reason": self.reason,
                "detail": self.detail}


def _read_text(uri: str) -> str:
    data = storage.read_bytes(uri).removeprefix(b"\xef\xbb\xbf")  # tolerate a BOM
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        # Mixed encodings (a legacy tool appended cp1252 lines): decode line by line, so UTF-8 lines keep
        # their text and only the legacy lines fall back; keep the row, not crash.
        return "".join(_decode_line(line) for line in data.splitlines(keepends=True))


def _decode_line(line: bytes) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        return line.decode("cp1252", errors="replace")


def _read_csv(uri: str) -> tuple[list[dict[str, Any]], list[Rejected]]:
    rows, bad = [], []
    reader = csv.reader(io.StringIO(_read_text(uri), newline=""))
    header = next(reader, None)
    if not header:
        raise CatalogError(f"catalog {uri} is empty")
    header = [h.strip() for h in header]
    if len(set(header)) != len(header):
        dup = sorted({h for h in header if header.count(h) > 1})
        raise CatalogError(f"catalog {uri} has duplicate columns: {dup}")
    for lineno, fields in enumerate(reader, start=2):
        if not fields:
            continue
        if len(fields) != len(header):
            pid = fields[0].strip() if fields else ""
            bad.append(Rejected(pid, "", "malformed_row",
                                f"line {lineno}: {len(fields)} fields, header has {len(header)}"))
            continue
        rows.append(dict(zip(header, fields, strict=True)))
    return rows, bad


def read_catalog(uri: str | Path) -> tuple[list[dict[str, Any]], list[Rejected]]:
    """Read a catalog into a list of row dicts (all values str or None) plus malformed-row rejects."""
    uri = str(uri)
    if not storage.exists(uri):
        raise CatalogError(f"catalog not found: {uri}")
    suffix = uri.lower().rsplit(".", 1)[-1]
    try:
        if suffix == "parquet":
            fs, path = storage.filesystem(uri)
            df = pq.read_table(path, filesystem=fs).to_pandas()
            rows, bad = df.astype(object).where(df.notna(), None).to_dict("records"), []
        elif suffix in ("jsonl", "ndjson", "json"):
            rows, bad = [], []
            for lineno, line in enumerate(_read_text(uri).splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    if not isinstance(obj, dict):
                        raise ValueError("not an object")
                    rows.append(obj)
                except ValueError as e:
                    bad.append(Rejected("", "", "malformed_row", f"line {lineno}: {e}"))
        else:
            rows, bad = _read_csv(uri)
    except CatalogError:
        raise
    except Exception as e:  # noqa: BLE001 - any parser failure means the catalog is unusable
        raise CatalogError(f"cannot read catalog {uri}: {storage._clean(e)}") from e
    if rows and not {"product_id", "image_uri"} <= set(rows[0]):
        raise CatalogError(f"catalog {uri} needs columns product_id and image_uri; has {sorted(rows[0])}")
    for r in rows:
        for k, v in r.items():
            if v is not None and not isinstance(v, str | list):
                r[k] = str(v)
    return rows, bad


def resolve_uri(image_uri: str, catalog_uri: str) -> str:
    """Make ``image_uri`` absolute: relative paths are relative to the catalog's folder."""
    u = image_uri.strip()
    if re.match(r"^(s3|https?|file)://", u) or u.startswith("/"):
        return u
    base = str(catalog_uri)
    if storage.is_s3(base):
        return base.rsplit("/", 1)[0] + "/" + u
    return str(Path(base.removeprefix("file://")).absolute().parent / u)


@dataclass(frozen=True)
class ValidRow:
    product_id: str
    key: str
    image_uri: str  # resolved
    labels: dict[str, Any]
    meta: dict[str, Any]


def validate(rows: list[dict[str, Any]], catalog_uri: str, taxonomy: Taxonomy
             ) -> tuple[list[ValidRow], list[Rejected]]:
    """Row-level checks that need no image: ids, duplicates, URIs, labels. Keeps catalog order."""
    valid: list[ValidRow] = []
    bad: list[Rejected] = []
    seen: set[str] = set()
    label_cols = taxonomy.columns
    for r in rows:
        raw_id = r.get("product_id")
        pid = "" if raw_id is None else str(raw_id)
        uri = "" if r.get("image_uri") is None else str(r["image_uri"])
        if not pid.strip():
            bad.append(Rejected(pid, uri, "missing_product_id", "product_id is empty"))
        elif not SAFE_ID.match(pid):
            bad.append(Rejected(pid, uri, "invalid_product_id",
                                "ids are 1-128 ASCII letters, digits, '_' or '-' (safe tar/file names)"))
        elif pid in seen:
            bad.append(Rejected(pid, uri, "duplicate_product_id", "first occurrence kept"))
        elif not uri.strip():
            seen.add(pid)
            bad.append(Rejected(pid, uri, "missing_image_uri", "image_uri is empty"))
        else:
            seen.add(pid)
            labels = taxonomy.labels_from_row(r)
            why = taxonomy.invalid_label(labels)
            if why:
                bad.append(Rejected(pid, uri, "label_outside_taxonomy", why))
                continue
            meta = {k: v for k, v in r.items() if k not in ("product_id", "image_uri") and k not in label_cols}
            valid.append(ValidRow(pid, pid, resolve_uri(uri, catalog_uri), labels, meta))
    return valid, bad


def fetch(uri: str, timeout: float = 20.0) -> bytes:
    """Bytes of an image at a local path, file://, s3:// or http(s):// URI; ``FetchError`` otherwise."""
    try:
        if uri.startswith(("http://", "https://")):
            req = urllib.request.Request(uri, headers={"User-Agent": "fashionlabel"})
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                ctype = resp.headers.get("Content-Type", "")
                data = resp.read()
            if ctype.startswith("text/"):
                raise FetchError("not_an_image", f"server sent {ctype}")
            return data
        if storage.is_s3(uri):
            return storage.read_bytes(uri)
        path = Path(uri.removeprefix("file://"))
        if not path.is_file():
            raise FetchError("image_not_found", str(path))
        return path.read_bytes()
    except FetchError:
        raise
    except urllib.error.HTTPError as e:
        raise FetchError("image_not_found" if e.code == 404 else "image_unreadable", f"HTTP {e.code}") from e
    except FileNotFoundError as e:
        raise FetchError("image_not_found", storage._clean(e)) from e
    except (OSError, urllib.error.URLError, ValueError) as e:
        raise FetchError("image_unreadable", storage._clean(e)[:300]) from e


def to_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(rows, dtype=object)
