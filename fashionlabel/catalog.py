"""Read and validate catalogs; resolve and fetch image URIs (local, file://, s3://, http(s)://).

A catalog is CSV, Parquet or JSON Lines with ``product_id`` and ``image_uri`` plus label and metadata
columns (docs/own-catalog.md "The catalog"). Reading never raises on a bad *row*: each one becomes a quarantine record with a stable
reason string (``REASONS``). It raises ``CatalogError`` only when the catalog as a whole cannot be read.

Validation is split in two so that the driver of a sharding job stays light (Amdahl): ``check_ids`` (ids,
duplicates, URIs: needs the whole catalog, cheap) runs once on the driver; ``check_labels`` (taxonomy
mining and value checks: per row, costly) runs inside the packing tasks. ``validate`` does both, for callers that hold a whole catalog in hand.
"""

from __future__ import annotations

import base64
import csv
import functools
import gzip
import hashlib
import http.client
import io
import json
import logging
import os
import re
import stat
import threading
import time
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fashionlabel import storage
from fashionlabel.taxonomy import Taxonomy

log = logging.getLogger(__name__)

# A key must be a safe tar member name and a safe file name on every filesystem (no '/', '..', spaces,
# non-ASCII); webdataset splits extensions at the first dot, so dots are out too. An id that already is
# such a name is its own key; any other id gets a derived one (``product_key``).
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
UNSAFE_RUN = re.compile(r"[^A-Za-z0-9_-]+")
# Real ids are SKUs, EANs, URLs, names with accents: any string is accepted, but not one with control
# characters (a CSV export broken across lines) or one longer than this (a description pasted as an id).
MAX_ID_CHARS = 256
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
REMOTE = re.compile(r"^(s3|https?|file)://")
ANY_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
MAX_SOURCE_BYTES = 128 * 1024 * 1024  # a larger source is refused before it is read into memory
# Label columns repeat a few values over millions of rows ("Men", "Tshirts", "2011"): each row holding
# one shared string instead of its own copy is most of the driver's catalog memory. A column with more
# distinct values than this (names, descriptions) stops being shared: its values are unique anyway.
SHARED_VALUES_PER_COLUMN = 4096
PROGRESS_EVERY = 10.0  # seconds between the progress lines of a catalog read or check (``_Progress``)
# pandas turns an integer column with one missing value into floats: the ids would read "1623.0", and match
# nothing they are joined with. Refused rather than guessed back into integers.
FLOAT_ID = (
    "so id 1623 would read '1623.0': write ids as text or integers (a pandas integer column with a missing "
    "value becomes float: use dtype 'Int64' or 'string')"
)

# The quarantine vocabulary: stable strings that dashboards and tests may rely on.
REASONS = {
    "malformed_row": "a catalog line that cannot be parsed (wrong number of fields, not a JSON object)",
    "missing_product_id": "product_id empty or whitespace",
    "invalid_product_id": f"product_id with control characters, leading/trailing spaces, > {MAX_ID_CHARS} "
    "characters, a floating-point number, or (JSON Lines, Parquet) a list, an object or true/false",
    "duplicate_product_id": "product_id seen earlier in the catalog (the first is kept)",
    "missing_image_uri": "image_uri empty",
    "label_outside_taxonomy": "a label value the taxonomy does not declare, or several for a single head",
    "image_not_found": "no file / object / HTTP 404 at image_uri",
    "image_unreadable": "image_uri cannot be read (permission, network, server error, unsupported scheme, "
    "a list or an object instead of one URI)",
    "image_empty": "the source has zero bytes",
    "not_an_image": "the bytes are not an image format we decode",
    "image_truncated": "the image ends before its data does",
    "image_too_large": "more pixels (or bytes) than the configured limit: decompression-bomb guard",
    "image_too_small": "a side shorter than the configured minimum (e.g. 1x1 tracking pixels)",
    "processing_error": "an unexpected error while packing the row; the detail names the exception",
}


class CatalogError(RuntimeError):
    """The catalog cannot be read at all (missing, unreadable, no product_id/image_uri columns)."""


class FetchError(Exception):
    """An image that cannot be fetched; ``reason`` is a stable quarantine reason.

    ``outage``: a failure that a source which is down, or credentials that are wrong, give every image
    alike (connection errors and timeouts, HTTP 5xx/429 after the retries, 401/403, S3 errors other than a
    missing key), as opposed to a fault of this one image (missing, too large, not an image).
    ``answered``: an HTTP server sent a status for this image (a 5xx, 401, 403, …): it is up and answering,
    so the failure costs no timeout (``HostGate`` does not count it; ``OutageBreaker`` does).
    """

    def __init__(
        self,
        reason: str,
        detail: str = "",
        retryable: bool = False,
        outage: bool = False,
        answered: bool = False,
    ):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.retryable, self.outage = reason, detail, retryable, outage
        self.answered = answered


class SourceUnavailable(RuntimeError):
    """Too many fetches of one unit of work failed as an outage would: the unit fails (and is re-run
    later) instead of quarantining every image of a source that is only down for now."""


class OutageBreaker:
    """Counts the outage-like fetch failures of one unit of work (a shard, a chunk of the hash pass). A few
    are quarantined like any bad image (one dead host among many); past ``max(3, share × rows)`` of them
    the unit raises :class:`SourceUnavailable`, so that nothing is quarantined or marked done because
    the source was down or the credentials wrong, and a re-run fetches again."""

    def __init__(self, rows: int, what: str, share: float = 0.1):
        self.limit, self.what, self.seen = max(3, int(share * rows)), what, 0

    def record(self, e: FetchError, uri: str) -> None:
        if not e.outage:
            return
        self.seen += 1
        if self.seen > self.limit:
            raise SourceUnavailable(
                f"cannot fetch the images of {self.what}: {self.seen} fetches failed as if the source were "
                f"down or the credentials wrong (e.g. {uri[:120]}: {e.reason}, {e.detail[:200]}). Nothing "
                "was quarantined or marked done for it: re-run the same command once the source answers"
            )


@dataclass(frozen=True)
class Rejected:
    """A catalog row that is quarantined, with its stable ``reason`` (a key of ``REASONS``)."""

    product_id: str
    image_uri: str
    reason: str
    detail: str

    def as_row(self) -> dict[str, str]:
        """The quarantine record as a plain dict, one column per field."""
        return {
            "product_id": self.product_id,
            "image_uri": self.image_uri,
            "reason": self.reason,
            "detail": self.detail,
        }


# ---- reading ------------------------------------------------------------------------------------
def _read_text(uri: str) -> str:
    data = storage.read_bytes(uri)
    if data[:2] == b"\x1f\x8b":  # gzip's magic: exports are often compressed (catalog.csv.gz)
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise CatalogError(f"catalog {uri} is gzip-compressed but does not decompress: {e}") from e
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        # UTF-16 with its BOM, as spreadsheets export "Unicode" CSV: read as UTF-8 it was refused for
        # columns such as '\x00p\x00r\x00o\x00d\x00u\x00c\x00t\x00_\x00i\x00d\x00'
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as e:
            raise CatalogError(
                f"catalog {uri} starts with a UTF-16 byte order mark but is not UTF-16: {e}"
            ) from e
    if b"\x00" in data[: data.find(b"\n")]:
        # every other byte of the header NUL: UTF-16 without its byte order mark, which cannot be told
        # from other text reliably; say so rather than list columns of NULs
        raise CatalogError(
            f"catalog {uri} has NUL bytes in its header: it looks UTF-16 encoded without a byte order mark; "
            "save it as UTF-8 (or UTF-16 with a BOM)"
        )
    data = data.removeprefix(b"\xef\xbb\xbf")  # tolerate a BOM
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        # Mixed encodings (a legacy tool appended cp1252 lines): decode line by line, so UTF-8 lines keep
        # their text and only the legacy lines fall back; keep the row, not crash.
        text, legacy = [], []
        for i, line in enumerate(data.splitlines(keepends=True)):
            try:
                text.append(line.decode("utf-8"))
            except UnicodeDecodeError:
                legacy.append(i)
                text.append(line.decode("cp1252", errors="replace"))
        # cp1252 reads any bytes, so a catalog in another legacy encoding (Shift-JIS, GBK) reads as
        # mojibake ('ƒhƒŒƒX' for ドレス) without an error: say which lines were read so
        log.warning(
            "catalog %s: %d line(s) are not UTF-8 and were read as Windows-1252 (cp1252), e.g. line %d: %r; "
            "if the file is in another encoding (Shift-JIS, GBK, …), save it as UTF-8",
            uri,
            len(legacy),
            legacy[0] + 1,
            text[legacy[0]][:80],
        )
        return "".join(text)


def _csv_records(lines: list[str], first: int) -> Any:
    """(first line, end line, fields) of each CSV record of ``lines[first:]``; line indexes from 0, the end
    exclusive, so ``lines[a:b]`` is the record's text."""
    reader = csv.reader(iter(lines[first:]))
    prev = 0
    for fields in reader:
        yield first + prev, first + reader.line_num, fields
        prev = reader.line_num


def _stray_quote(record: str) -> str | None:
    """Why a record of several lines is one only because of a stray quote, or None. A quote that never
    closes runs to the end of the file; one closed by a later quote (usually the opening quote of another
    row's field) closes in the middle of a field: both break the CSV rules that a strict read enforces."""
    try:
        for _ in csv.reader(io.StringIO(record, newline=""), strict=True):
            pass
    except csv.Error as e:
        return "is never closed" if "end of data" in str(e) else f"closes mid-field ({e})"
    return None


class _Progress:
    """A log line every ``PROGRESS_EVERY`` seconds while the driver reads or checks a large catalog: a
    1,000,000-row catalog took 20-40 s on a 2-core head with no line between "ray ready" and the plan's
    first (at 100M rows, most of an hour of silence). The clock is read every 4,096 rows only."""

    def __init__(self, what: str, total: int, unit: str) -> None:
        self.what, self.total, self.unit = what, total, unit
        self.t0 = self.last = time.monotonic()
        self.seen = 0

    def __call__(self, done: int) -> None:
        if done - self.seen < 4096:
            return
        self.seen = done
        if (now := time.monotonic()) - self.last >= PROGRESS_EVERY:
            self.last = now
            log.info("%s: %d/%d %s, %.0f s in", self.what, done, self.total, self.unit, now - self.t0)


class _SharedValues:
    """Hands out one string object per distinct value of a column (see ``SHARED_VALUES_PER_COLUMN``)."""

    def __init__(self) -> None:
        self.memo: dict[str, dict[str, str]] = {}  # column -> value -> the one string kept for it
        self.stopped: set[str] = set(ID_COLUMNS)  # ids and URIs are unique: never shared

    def row(self, row: dict[str, Any]) -> dict[str, Any]:
        for k, v in row.items():
            if k in self.stopped or not isinstance(v, str):
                continue
            memo = self.memo.setdefault(k, {})
            row[k] = memo.setdefault(v, v)  # same key, so the dict is not resized while iterating
            if len(memo) > SHARED_VALUES_PER_COLUMN:
                self.stopped.add(k)
                del self.memo[k]
        return row


def _read_csv(uri: str) -> tuple[list[dict[str, Any]], list[Rejected], list[str]]:
    rows, bad = [], []
    shared = _SharedValues()
    lines = list(io.StringIO(_read_text(uri), newline=""))  # the csv module's own line breaks
    # The whole file is in memory already: the csv module's 128 KiB per field protects nothing here, and
    # one stray quote makes the rest of the file one field (handled below) rather than a failed catalog.
    limit = csv.field_size_limit(max(csv.field_size_limit(), sum(map(len, lines)) + 1))
    try:
        # the header is the first line that is not blank (an export may begin with empty lines)
        _, start, header = next((r for r in _csv_records(lines, 0) if r[2]), (0, 0, None))
        if not header:
            raise CatalogError(f"catalog {uri} is empty")
        header = [h.strip() for h in header]
        if len(set(header)) != len(header):
            dup = sorted({h for h in header if header.count(h) > 1})
            raise CatalogError(f"catalog {uri} has duplicate columns: {dup}")
        at = {c: header.index(c) for c in ("product_id", "image_uri") if c in header}

        def ids(fields: list[str]) -> tuple[str, str]:
            pid, img = (
                fields[at[c]].strip() if at.get(c, len(fields)) < len(fields) else ""
                for c in ("product_id", "image_uri")
            )
            return pid, img

        progress = _Progress(f"catalog {uri}", len(lines), "lines read")
        while start is not None:
            resume, start = start, None
            for a, b, fields in _csv_records(lines, resume):
                progress(b)
                if b - a > 1 and (why := _stray_quote("".join(lines[a:b]))):
                    # A quote opened on line a+1 swallows the lines after it into one field of this row.
                    # Quarantine that line alone and read the lines after it as rows again.
                    bad.append(
                        Rejected(
                            *ids(next(csv.reader([lines[a]]), [])),
                            "malformed_row",
                            f"line {a + 1}: a quoted field opened on this line {why}; lines {a + 1}-{b} "
                            "would be one row",
                        )
                    )
                    start = a + 1
                    break
                if not fields:
                    continue
                if len(fields) != len(header):
                    where = f"line {b}" if b - a == 1 else f"lines {a + 1}-{b}"
                    bad.append(
                        Rejected(
                            *ids(fields),
                            "malformed_row",
                            f"{where}: {len(fields)} fields, header has {len(header)}",
                        )
                    )
                    continue
                rows.append(shared.row(dict(zip(header, fields, strict=True))))
    finally:
        csv.field_size_limit(limit)
    return rows, bad, header


def _read_jsonl(uri: str) -> tuple[list[dict[str, Any]], list[Rejected], list[str]]:
    rows, bad, columns = [], [], {}
    lines = _read_text(uri).splitlines()
    progress = _Progress(f"catalog {uri}", len(lines), "lines read")
    for lineno, line in enumerate(lines, start=1):
        progress(lineno)
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            bad.append(Rejected("", "", "malformed_row", f"line {lineno}: {e}"))
            continue
        if not isinstance(obj, dict):
            bad.append(Rejected("", "", "malformed_row", f"line {lineno}: not a JSON object"))
            continue
        if "\\u" in line and not _utf8_clean(obj):  # an escaped lone surrogate is no text at all
            bad.append(
                Rejected("", "", "malformed_row", f"line {lineno}: a \\u escape that is not a character")
            )
            continue
        rows.append(obj)
        columns.update(dict.fromkeys(obj))
    return rows, bad, list(columns)


def _utf8_clean(obj: Any) -> bool:
    """Every string in ``obj`` (keys included) encodes to UTF-8: JSON lets ``"\\udc80"`` through, and
    hashing or writing such a value later would fail the whole job instead of this one row."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_IMAGE_LIKE = re.compile(r"^(s3://|https?://|file://)|\.(jpe?g|png|webp|gif|bmp|tiff?)$", re.IGNORECASE)


def _rename_hint(columns: list[str], first: dict[str, Any]) -> str:
    """What to rename, for a catalog without ``product_id`` or ``image_uri``: the column whose first value
    looks like an image (a URL, or a name ending in .jpg, …) is named as the likely image column."""
    image = next((c for c in columns if _IMAGE_LIKE.search(str(first.get(c) or "").strip())), None)
    todo = [] if "product_id" in columns else ["id column product_id"]
    if "image_uri" not in columns:
        todo.append("image column image_uri" + (f" ({image!r} holds image paths or URLs)" if image else ""))
    return f": name the export's {' and its '.join(todo)}"


def read_catalog(uri: str | Path) -> tuple[list[dict[str, Any]], list[Rejected]]:
    """Read a catalog into row dicts (values str, list or None) plus the rejects of malformed lines.

    Args:
        uri: a ``.csv`` (default), ``.parquet`` or ``.jsonl``/``.ndjson``/``.json`` file, local or s3://;
            CSV and JSON Lines may be gzip-compressed (``catalog.csv.gz``).
    """
    uri = str(uri)
    try:
        if not storage.exists(uri):
            raise CatalogError(f"catalog not found: {uri}")
        suffix = uri.lower().removesuffix(".gz").rsplit(".", 1)[-1]  # catalog.jsonl.gz is JSON Lines
        if suffix == "parquet":
            fs, path = storage.filesystem(uri)
            table = pq.read_table(path, filesystem=fs)
            if "product_id" in table.column_names and pa.types.is_floating(
                table.schema.field("product_id").type
            ):
                kind = table.schema.field("product_id").type
                raise CatalogError(f"catalog {uri}: product_id is a {kind} column, {FLOAT_ID}")
            (rows, bad), columns = _parquet_rows(table, uri), table.column_names
        elif suffix in ("jsonl", "ndjson", "json"):
            rows, bad, columns = _read_jsonl(uri)
        else:
            rows, bad, columns = _read_csv(uri)
    except CatalogError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure means the catalog is unusable
        raise CatalogError(f"cannot read catalog {uri}: {storage.redact(e)}") from e
    if not rows and not bad:  # a header and nothing else: usually an export that failed half-way
        raise CatalogError(f"catalog {uri} has no rows")
    if not {"product_id", "image_uri"} <= set(columns):
        sep = next((c for c in ";\t|" if len(columns) == 1 and c in columns[0]), None)
        hint = f" (one column with {sep!r} in its name: write the CSV with ',' between fields)" if sep else ""
        raise CatalogError(
            f"catalog {uri} needs columns product_id and image_uri; has {sorted(columns)}"
            f"{hint or _rename_hint(columns, rows[0] if rows else {})}"
        )
    if suffix not in ("csv", "parquet"):  # CSV values are str already; Parquet's are made text as read
        rows = _plain_rows(rows, bad, _SharedValues())
    return rows, bad


def _parquet_rows(table: pa.Table, uri: str) -> tuple[list[dict[str, Any]], list[Rejected]]:
    """The rows of a Parquet catalog as text, and the rejects of those whose id or image is not one value
    (:func:`_plain_rows`), made a batch at a time: the whole table turned into Python dicts at once held
    every value as a string of its own until all were shared, 1.6 GB at the peak for a 1,000,000-row
    catalog, twice what the same catalog read as CSV holds."""
    rows: list[dict[str, Any]] = []
    bad: list[Rejected] = []
    shared = _SharedValues()
    progress = _Progress(f"catalog {uri}", table.num_rows, "rows read")
    for batch in table.to_batches(max_chunksize=16_384):
        rows += _plain_rows(batch.to_pylist(), bad, shared)
        progress(len(rows) + len(bad))
    return rows, bad


def _plain_rows(
    rows: list[dict[str, Any]], bad: list[Rejected], shared: _SharedValues
) -> list[dict[str, Any]]:
    """``rows`` of a Parquet or JSON Lines catalog, whose values may be numbers, bools or nested values, as
    the text a CSV would hold (:func:`_as_text`), repeated values shared; a row whose id or image is not
    one value goes to ``bad`` instead."""
    kept = []
    for r in rows:
        if why := _not_one_value(r):
            bad.append(Rejected(*(_shown(r.get(c)) for c in ID_COLUMNS), *why))
            continue
        for k, v in r.items():
            if v is not None and not isinstance(v, str):
                r[k] = _as_text(v)
        kept.append(shared.row(r))
    return kept


def _not_one_value(row: dict[str, Any]) -> tuple[str, str] | None:
    """(reason, detail) for a JSON Lines or Parquet row whose id or image is not one plain value: a float id
    (JSON Lines: 1623.0), a true/false, a list or an object. Read as text they became ids such as
    "['a', 'b']" or "True", and paths such as "<catalog folder>/['a.jpg']", that no export holds."""
    pid, uri = (row.get(c) for c in ID_COLUMNS)
    if isinstance(pid, float):
        return "invalid_product_id", f"a floating-point number, {FLOAT_ID}"
    for col, v, reason in (("product_id", pid, "invalid_product_id"), ("image_uri", uri, "image_unreadable")):
        kind = "a list" if isinstance(v, list | tuple) else "an object" if isinstance(v, dict) else None
        kind = "true/false" if isinstance(v, bool) else kind
        if kind:
            return (
                reason,
                f"{col} is {kind}, not one {'id' if col == 'product_id' else 'URI'}: {_shown(v)[:80]}",
            )
    return None


def _shown(v: Any) -> str:
    """A catalog value as a quarantine record names it: text as it is, anything else as JSON."""
    if v is None or isinstance(v, str):
        return v or ""
    if isinstance(v, float):
        return str(v)
    return json.dumps(_jsonable(v), ensure_ascii=False)


def _as_text(v: Any) -> Any:
    """A Parquet or JSON value as the text a CSV would hold, lists kept as lists of it: the shards carry
    metadata as JSON, so a struct becomes JSON text (not Python's repr) and bytes their UTF-8 text, or
    base64 where they are not UTF-8, rather than values ``json.dumps`` cannot write."""
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, list | tuple):
        return [_as_text(x) for x in v]
    if isinstance(v, bytes):
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError:
            return base64.b64encode(v).decode("ascii")
    if isinstance(v, dict):
        return json.dumps(_jsonable(v), ensure_ascii=False)
    return str(v)


def _jsonable(v: Any) -> Any:
    """``v`` with everything JSON has no type for (bytes, decimals, dates) as :func:`_as_text` writes it."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if v is None or isinstance(v, str | bool | int | float):
        return v
    return _as_text(v)


def resolve_uri(image_uri: str, catalog_uri: str) -> str:
    """Make ``image_uri`` absolute: relative paths are relative to the catalog's folder."""
    u = image_uri.strip()
    if m := ANY_SCHEME.match(u):
        # Schemes are case-blind (RFC 3986 3.1): exports write HTTPS://cdn/… or S3://bucket/…, which every
        # later step (fetch, storage) knows only in lower case. Unsupported schemes are kept as written,
        # so the fetch reports them instead of a wrong path.
        scheme = m.group().lower()
        return scheme + u[m.end() :] if REMOTE.match(scheme) else u
    if u.startswith("/"):
        return u
    base = str(catalog_uri)
    if storage.is_s3(base):
        return _s3_join(base.rsplit("/", 1)[0], u)
    return _local_join(base.removeprefix("file://"), u)


def _local_join(catalog_path: str, rel: str) -> str:
    """``str(Path(catalog_path).absolute().parent / rel)``, with the folder part of ``rel`` resolved once
    per catalog and folder: a catalog's images share a few folders, and pathlib per row was three
    quarters of ``check_ids`` (10 of 13.6 s for 200,000 rows)."""
    folder, _, name = rel.rpartition("/")
    if name in ("", ".", ".."):  # pathlib drops a trailing "/" or ".": let it decide
        return str(Path(catalog_path).absolute().parent / rel)
    return os.path.join(_local_folder(catalog_path, folder, os.getcwd()), name)


@functools.lru_cache(maxsize=1024)
def _local_folder(catalog_path: str, folder: str, cwd: str) -> str:
    """The folder resolved; ``cwd`` is part of the cache key: a relative catalog path means another folder
    once the process has changed directory."""
    return str(Path(catalog_path).absolute().parent / folder)


def _s3_join(folder: str, rel: str) -> str:
    """``folder/rel`` with ``.`` and ``..`` segments resolved as a file system would: S3 keys have no
    folders, so ``exports/../img/a.jpg`` is another key than ``img/a.jpg``, one that holds no image. A
    path that climbs above the bucket is kept as written (its fetch fails, naming it)."""
    bucket, _, prefix = folder[len("s3://") :].partition("/")
    parts = prefix.split("/") if prefix else []
    for seg in rel.split("/"):
        if seg == "..":
            if not parts:
                return f"{folder}/{rel}"
            parts.pop()
        elif seg != ".":
            parts.append(seg)
    return f"s3://{bucket}/" + "/".join(parts)


# ---- validation ---------------------------------------------------------------------------------
ID_COLUMNS = ("product_id", "image_uri")


# slots: a million rows sit on the driver while it plans, and a per-object __dict__ is a third of a row
@dataclass(frozen=True, slots=True)
class CatalogRow:
    """A row whose id and URI passed ``check_ids``. ``raw`` is the row as read (shared with the caller,
    not copied), so it still holds the unresolved ``product_id`` and ``image_uri`` (``ID_COLUMNS``)."""

    product_id: str
    key: str
    image_uri: str  # resolved
    raw: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ValidRow:
    """A row that passed every check that needs no image: its labels by head and its other columns."""

    product_id: str
    key: str
    image_uri: str  # resolved
    labels: dict[str, Any]  # head name -> value, list of values (multi heads) or None
    meta: dict[str, Any]  # every column that is not a label column
    # heads whose catalog value the taxonomy lacks, left without a label (``check_labels(keep_outside=True)``)
    blanked: tuple[str, ...] = ()


def id_problem(pid: str) -> str | None:
    """Why a non-empty ``product_id`` is refused, or None."""
    if len(pid) > MAX_ID_CHARS:
        return f"{len(pid)} characters; at most {MAX_ID_CHARS}"
    if CONTROL.search(pid):
        return "contains control characters (newline, tab, NUL, …)"
    if pid != pid.strip():
        return "leading or trailing spaces (would be a different product than the trimmed id)"
    return None


def product_key(pid: str) -> str:
    """The product's WebDataset key (tar member stem): the id itself when it already is a safe name
    (``SAFE_ID``), else a readable ASCII stem of it and a hash of the whole id, e.g. ``SKU.12/A`` →
    ``SKU_12_A--3f1c…``. Deterministic, so a product keeps its key from night to night."""
    if SAFE_ID.match(pid):
        return pid
    ascii_ = unicodedata.normalize("NFKD", pid).encode("ascii", "ignore").decode()
    stem = UNSAFE_RUN.sub("_", ascii_).strip("_-")[:48] or "id"
    return f"{stem}--{hashlib.sha256(pid.encode()).hexdigest()[:16]}"


def _first_occurrence(first: tuple[str, str]) -> str:
    """A duplicate's detail: which row of its id is used. The labels and the image of the kept row are
    checked later (per shard), so it may still be quarantined for its own reason: the detail names its
    image instead of promising a packed product (with two images under one id, which one is used)."""
    why, uri = first
    if why != "kept":
        return f"first occurrence was {why}"
    return (
        f"first occurrence kept (image_uri {uri[:120]!r}; packed from it, or quarantined for its own reason)"
    )


def check_ids(rows: list[dict[str, Any]], catalog_uri: str) -> tuple[list[CatalogRow], list[Rejected]]:
    """Id, duplicate and URI checks (need the whole catalog; cheap). Keeps catalog order."""
    ok: list[CatalogRow] = []
    bad: list[Rejected] = []
    seen: dict[str, tuple[str, str]] = {}  # product id -> its first row's ("kept", image_uri) or (reason, "")
    keys: dict[str, str] = {}
    progress = _Progress(f"catalog {catalog_uri}", len(rows), "rows checked (ids, duplicates, image URIs)")
    for i, r in enumerate(rows):
        progress(i)
        raw_id, raw_uri = r.get("product_id"), r.get("image_uri")
        pid = "" if raw_id is None else str(raw_id)
        uri = "" if raw_uri is None else str(raw_uri)
        if not pid.strip():
            bad.append(Rejected(pid, uri, "missing_product_id", "product_id is empty"))
        elif why := id_problem(pid):
            bad.append(Rejected(pid, uri, "invalid_product_id", why))
        elif pid in seen:
            bad.append(Rejected(pid, uri, "duplicate_product_id", _first_occurrence(seen[pid])))
        elif (key := product_key(pid)) in keys:  # needs a 64-bit hash collision or an id crafted to hit one
            bad.append(Rejected(pid, uri, "duplicate_product_id", f"its shard key is taken by {keys[key]!r}"))
        elif not uri.strip():
            seen[pid] = ("missing_image_uri", "")
            bad.append(Rejected(pid, uri, "missing_image_uri", "image_uri is empty"))
        else:
            seen[pid] = ("kept", uri.strip())
            keys[key] = pid
            ok.append(CatalogRow(pid, key, resolve_uri(uri, catalog_uri), r))
    return ok, bad


def check_labels(row: CatalogRow, taxonomy: Taxonomy, keep_outside: bool = False) -> ValidRow | Rejected:
    """Labels of one row from the taxonomy's columns; a value outside the taxonomy rejects the row, or with
    ``keep_outside`` (a night: labelling reads no label column) leaves that head without a label."""
    labels = taxonomy.labels_from_row(row.raw)
    blanked: tuple[str, ...] = ()
    why = taxonomy.invalid_label(labels)
    if why and not keep_outside:
        return Rejected(row.product_id, row.image_uri, "label_outside_taxonomy", why)
    if why:
        blanked = tuple(taxonomy.outside_heads(labels))
        labels = {k: None if k in blanked else v for k, v in labels.items()}
    skip = {*taxonomy.columns, *ID_COLUMNS}
    meta = {k: v for k, v in row.raw.items() if k not in skip}
    return ValidRow(row.product_id, row.key, row.image_uri, labels, meta, blanked)


def validate(
    rows: list[dict[str, Any]], catalog_uri: str, taxonomy: Taxonomy
) -> tuple[list[ValidRow], list[Rejected]]:
    """Every row-level check that needs no image: ids, duplicates, URIs, labels. Keeps catalog order."""
    ok, bad = check_ids(rows, catalog_uri)
    valid = []
    for r in ok:
        v = check_labels(r, taxonomy)
        (bad if isinstance(v, Rejected) else valid).append(v)
    return valid, bad


# ---- fetching -----------------------------------------------------------------------------------
def _http_url(uri: str) -> str:
    """``uri`` as a request carries it: path and query percent-encoded (a space, non-ASCII), as a browser
    sends them. A URL with no host or a port that is no number is this row's fault: ``FetchError``, never
    retried nor counted as the source being down."""
    try:
        parts = urllib.parse.urlsplit(uri)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as e:
        raise FetchError("image_unreadable", f"malformed URL: {e}") from e
    if not parts.hostname:
        raise FetchError("image_unreadable", f"malformed URL: no host in {uri[:80]}")
    path = urllib.parse.quote(parts.path, safe="/%:@!$&'()*+,;=~")
    query = urllib.parse.quote(parts.query, safe="/%:@!$&'()*+,;=~?")
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, query, ""))


def _http_get(uri: str, timeout: float, max_bytes: int, deadline: float) -> bytes:
    req = urllib.request.Request(_http_url(uri), headers={"User-Agent": "fashionlabel"})
    end = time.monotonic() + deadline
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        ctype = resp.headers.get("Content-Type", "") or ""
        if ctype.startswith("text/"):
            raise FetchError("not_an_image", f"server sent {ctype}")
        declared = resp.headers.get("Content-Length")
        chunks, size = [], 0
        # read1: at most one socket read per call, so a server that trickles bytes (never idle for
        # ``timeout``) meets the deadline of the whole download instead of holding the task for hours
        while chunk := resp.read1(1 << 16):
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                raise FetchError("image_too_large", f"more than {max_bytes} bytes")
            if time.monotonic() > end:
                raise FetchError(
                    "image_unreadable",
                    f"download past its {deadline:g} s deadline ({size} bytes received)",
                    outage=True,
                )
    if declared and declared.isdigit() and size < int(declared):
        # a connection cut mid-body: the transfer failed, the image may be fine
        raise FetchError(
            "image_unreadable",
            f"connection closed after {size} of {declared} bytes",
            retryable=True,
            outage=True,
        )
    return b"".join(chunks)


def fetch(
    uri: str,
    timeout: float = 20.0,
    retries: int = 2,
    max_bytes: int = MAX_SOURCE_BYTES,
    deadline: float = 120.0,
) -> bytes:
    """Bytes of an image at a local path, file://, s3:// or http(s):// URI; ``FetchError`` otherwise.

    Transient HTTP failures (5xx, 429, connection errors) are retried with back-off; S3 retries are in
    the pyarrow filesystem (storage.py). ``timeout`` bounds each network wait, ``deadline`` the seconds
    of one HTTP download's body.
    """
    for attempt in range(retries + 1):
        try:
            return _fetch_once(uri, timeout, max_bytes, deadline)
        except FetchError as e:
            if not e.retryable or attempt == retries:
                raise
            time.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")


class HostGate:
    """``fetch`` for one unit of work (a shard, a chunk of the hash pass) that stops asking a source which
    has stopped answering. A host that never answers costs a minute per image (the timeout, twice retried);
    with thousands of its images in a shard, the ``OutageBreaker`` would reach its verdict only after
    hours. After ``after`` outage-like failures in a row from one source (an HTTP host, an S3 bucket) that
    got no answer (a timeout, a refused or cut connection; an HTTP status is an answer), its next fetches
    fail at once with an outage ``FetchError`` for ``cooldown`` seconds, then it is asked
    again (and trusted again at its first answer). So a dead source fails the shard once the fetches
    already under way have timed out (about two minutes for 1,000 images and 8 in flight, against about 13
    without it), and a dead host among many has its few images quarantined at the pace of other bad
    images. Thread-safe: the fetch threads of one task share it."""

    def __init__(self, after: int = 3, cooldown: float = 30.0, **fetch_kwargs: Any):
        self.after, self.cooldown, self.fetch_kwargs = after, cooldown, fetch_kwargs
        self._lock = threading.Lock()
        self._failures: dict[str, int] = {}
        self._shut_until: dict[str, float] = {}

    @staticmethod
    def source(uri: str) -> str | None:
        if uri.startswith(("http://", "https://")):
            parts = urllib.parse.urlsplit(uri)
            return f"{parts.scheme}://{parts.netloc}"
        if storage.is_s3(uri):
            return "s3://" + uri[len("s3://") :].split("/", 1)[0]
        return None  # local files answer or fail at once

    def fetch(self, uri: str) -> bytes:
        src = self.source(uri)
        if src is None:
            return fetch(uri, **self.fetch_kwargs)
        with self._lock:
            shut = self._shut_until.get(src, 0.0) > time.monotonic()
            failures = self._failures.get(src, 0)
        if shut:
            raise FetchError(
                "image_unreadable",
                f"{src[:80]} failed its last {failures} fetches: not asked again for {self.cooldown:g} s",
                outage=True,
            )
        try:
            data = fetch(uri, **self.fetch_kwargs)
        except FetchError as e:
            # A status the server sent is an answer (a 500 or a 403 for one missing image, as CDNs in
            # front of a bucket give): it took no timeout, and the host serves its other images. Counted,
            # three such images in a row shut a live host, and its good images failed the shard on every
            # re-run. The OutageBreaker still counts them: a host answering 503 to all fails the shard.
            if e.answered:
                self._answered(src)
            elif e.outage:
                with self._lock:
                    n = self._failures[src] = self._failures.get(src, 0) + 1
                    if n >= self.after:
                        self._shut_until[src] = time.monotonic() + self.cooldown
            raise
        self._answered(src)
        return data

    def _answered(self, src: str) -> None:
        """The source answered (an image, or a status for this one): trusted again, its count restarts."""
        with self._lock:
            self._failures.pop(src, None)
            self._shut_until.pop(src, None)


def _local_path(uri: str) -> str:
    """The file a local path or ``file:`` URI names. A ``file://`` URI is read as RFC 8089 says: its path
    percent-decoded, its host empty or ``localhost``; any other host (``file://img/a.jpg`` is host ``img``)
    is refused rather than read relative to whichever folder the worker runs in."""
    if not uri.startswith("file://"):
        return uri
    parts = urllib.parse.urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise FetchError(
            "image_unreadable",
            f"file URI with host {parts.netloc[:60]!r}: only local files are read (file:///absolute/path)",
        )
    return urllib.parse.unquote(parts.path)


def _s3_object(uri: str) -> None:
    """Refuse, from its form alone, an s3:// URI that names no object (no bucket, no key, a folder)."""
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise FetchError("image_unreadable", f"no bucket in {uri[:80]}")
    if not key or key.endswith("/"):
        raise FetchError("image_not_found", f"a bucket or folder, not an object: {uri[:80]}")


_BUCKETS_SEEN: set[str] = set()  # buckets known to exist, per worker process


def bucket_exists(uri: str) -> bool:
    """Whether the bucket of an s3:// URI exists. Asked only after a "not found", and remembered only
    when it does exist: one extra request per bucket, not per missing image, and a bucket created later
    is seen at the next miss."""
    bucket = uri[len("s3://") :].split("/", 1)[0]
    if bucket in _BUCKETS_SEEN:
        return True
    fs, _ = storage.filesystem(uri)
    try:
        found = fs.get_file_info(bucket).type != pafs.FileType.NotFound
    except OSError:  # cannot tell (no rights to list it): leave the verdict to the object's own error
        return True
    if found:
        _BUCKETS_SEEN.add(bucket)
    return found


def _not_found(uri: str, msg: str) -> FetchError:
    # pyarrow says "does not exist" alike for a missing key and a missing bucket; a missing bucket (a
    # typo, the wrong endpoint or account) is every image's fault, not this one's: an outage
    if storage.is_s3(uri) and not bucket_exists(uri):
        return FetchError("image_unreadable", f"no such bucket: {msg}", outage=True)
    return FetchError("image_not_found", msg)


def _fetch_once(uri: str, timeout: float, max_bytes: int, deadline: float) -> bytes:
    try:
        if uri.startswith(("http://", "https://")):
            return _http_get(uri, timeout, max_bytes, deadline)
        if storage.is_s3(uri):
            _s3_object(uri)
            fs, path = storage.filesystem(uri)
            with fs.open_input_file(path) as f:
                if f.size() > max_bytes:
                    raise FetchError("image_too_large", f"{f.size()} bytes, limit {max_bytes}")
                return f.read()
        if ANY_SCHEME.match(uri) and not REMOTE.match(uri):
            raise FetchError("image_unreadable", f"unsupported URI scheme in {uri[:80]}")
        # One open + fstat: this runs per image. Non-blocking, so a FIFO cannot hang the task; only regular
        # files are read (a device like /dev/zero has size 0 and never ends), and never past the limit.
        # The descriptor is checked before it is wrapped, and closed on every path: a folder would
        # otherwise leave it open (the wrapper refuses it without closing it).
        fd = os.open(_local_path(uri), os.O_RDONLY | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise FetchError("image_not_found", "a folder, not a file")
            if not stat.S_ISREG(st.st_mode):
                raise FetchError("image_unreadable", "not a regular file")
            if st.st_size > max_bytes:
                raise FetchError("image_too_large", f"{st.st_size} bytes, limit {max_bytes}")
            f = open(fd, "rb")  # noqa: SIM115 - closed below, with the descriptor it now owns
        except BaseException:
            os.close(fd)
            raise
        with f:
            data = f.read(max_bytes + 1)
            if len(data) > max_bytes:  # grew since fstat
                raise FetchError("image_too_large", f"over {max_bytes} bytes")
            return data
    except FetchError:
        raise
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        raise _not_found(uri, storage.redact(e)[:300]) from e
    except http.client.InvalidURL as e:  # a URL no server could be asked for: this row's fault
        raise FetchError("image_unreadable", f"malformed URL: {storage.redact(e)[:200]}") from e
    except urllib.error.HTTPError as e:
        if e.code in (404, 410):
            raise FetchError("image_not_found", f"HTTP {e.code}") from e
        transient = e.code >= 500 or e.code == 429
        raise FetchError(
            "image_unreadable",
            f"HTTP {e.code}",
            retryable=transient,
            outage=transient or e.code in (401, 403),
            answered=True,
        ) from e
    except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException) as e:
        raise FetchError("image_unreadable", storage.redact(e)[:300], retryable=True, outage=True) from e
    except (OSError, ValueError) as e:
        msg = storage.redact(e)[:300]
        if "NoSuchKey" in msg or "does not exist" in msg or "NOT_FOUND" in msg.upper():
            raise _not_found(uri, msg) from e
        # on S3 the rest is the store (network, throttling, access): pyarrow has retried it already
        raise FetchError("image_unreadable", msg, outage=storage.is_s3(uri)) from e
