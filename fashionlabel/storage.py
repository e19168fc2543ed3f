"""One place for paths and URIs: local folders and ``s3://`` through pyarrow's filesystems.

Every output that readers may see is *published atomically*: written under a temporary name beside its
destination and renamed (local), or uploaded in one PUT / completed multipart upload (S3, where an object
appears only once complete). Readers therefore never see a half-written shard, Parquet file or manifest.

S3 endpoint and credentials come from the standard AWS environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``) plus ``AWS_ENDPOINT_URL`` for S3-compatible servers. Error
messages never include credentials.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import json
import os
import re
import time
import uuid
from functools import cache
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


class StorageError(RuntimeError):
    """An output or input location that cannot be used (no access, no bucket, bad path)."""


class NotOnThisNodeError(StorageError):
    """A local folder the driver sees is not there on the node where a Ray task or actor runs."""


def require_on_this_node(folder: str | Path, marker: str, what: str) -> None:
    """In a Ray task: fail by name when ``folder/marker``, which the driver sees, is not on this node.
    ``what`` names the folder in the message (``output folder``, ``shard set``).

    On a cluster a local path is each node's own disk unless every node mounts it: a shard task there
    published its tar where no one would read it (the job failed after packing, naming a missing index
    part), and a labelling actor died on a missing tar with a traceback through Ray Data. ``s3://`` is
    the same everywhere: nothing to check."""
    if is_s3(folder) or Path(join(folder, marker).removeprefix("file://")).exists():
        return
    import ray

    raise NotOnThisNodeError(
        f"{what} {folder} is not on node {ray.util.get_node_ip_address()}, where a Ray task runs ({marker} "
        "missing there): on a cluster a local folder must be one every node mounts; use an s3:// location"
    )


def task_error(e: BaseException) -> BaseException:
    """The :class:`NotOnThisNodeError` that a Ray task or actor raised, when ``e`` (as the driver got it)
    carries one; else ``e``. Ray wraps it with the remote traceback in its text, and Ray Data passes on
    only that text (its ``UserCodeException`` has no cause on the driver), so it is found by its line."""
    x: BaseException | None = e
    while x is not None:
        if isinstance(x, NotOnThisNodeError) and not isinstance(getattr(x, "cause", None), BaseException):
            return x
        x = getattr(x, "cause", None) or x.__cause__
    found = re.search(rf"^(?:[\w.]+\.)?{NotOnThisNodeError.__name__}: (.+)$", str(e), re.MULTILINE)
    return NotOnThisNodeError(found.group(1)) if found else e


def is_s3(uri: str | Path) -> bool:
    """Whether ``uri`` is an ``s3://`` URI."""
    return str(uri).startswith("s3://")


def absolute(uri: str | Path) -> str:
    """Local paths made absolute (Ray workers run in other folders); URIs unchanged."""
    uri = str(uri)
    return uri if is_s3(uri) else str(Path(uri.removeprefix("file://")).absolute())


def join(base: str | Path, *parts: str) -> str:
    """``parts`` appended to ``base`` with ``/``: an ``s3://`` URI, or an absolute local path."""
    base = str(base)
    if is_s3(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(absolute(base), *parts))


@cache
def _s3fs(endpoint: str | None, region: str | None, _creds: tuple[str | None, ...]) -> pafs.S3FileSystem:
    # ``_creds`` only keys the cache: rotated or changed credentials get a new filesystem.
    kw: dict[str, Any] = {"region": region or "us-east-1"}
    if endpoint:
        kw["endpoint_override"] = endpoint
        kw["scheme"] = "https" if endpoint.startswith("https") else "http"
    # Bounded retries with back-off: a flapping object store is retried, a dead one fails the unit.
    kw["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=5)
    kw["connect_timeout"] = 5
    kw["request_timeout"] = 30
    return pafs.S3FileSystem(**kw)


def filesystem(uri: str | Path) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path within it) for a local path or an s3:// URI."""
    uri = str(uri)
    if is_s3(uri):
        creds = tuple(
            os.environ.get(k)
            for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
        )
        fs = _s3fs(os.environ.get("AWS_ENDPOINT_URL"), os.environ.get("AWS_REGION"), creds)
        return fs, uri[len("s3://") :]
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return pafs.LocalFileSystem(), str(Path(uri).absolute())


def exists(uri: str | Path) -> bool:
    """Whether a file or folder (an S3 object or prefix) is at ``uri``."""
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(uri: str | Path) -> None:
    """Create a local folder and its parents; nothing to do on S3, which has no folders."""
    if not is_s3(uri):
        Path(str(uri).removeprefix("file://")).mkdir(parents=True, exist_ok=True)


def _entries(uri: str | Path) -> list[pafs.FileInfo]:
    fs, path = filesystem(uri)
    try:
        return fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as e:
        raise StorageError(f"cannot list {uri}: {redact(e)}") from e


def listdir(uri: str | Path, suffix: str = "") -> list[str]:
    """Names (not paths) of the files directly under ``uri`` ending with ``suffix``; [] if absent."""
    found = _entries(uri)
    return sorted(i.base_name for i in found if i.type == pafs.FileType.File and i.base_name.endswith(suffix))


def listdirs(uri: str | Path, prefix: str = "") -> list[str]:
    """Names of the folders (S3: common prefixes) directly under ``uri`` starting with ``prefix``; [] if absent."""
    found = _entries(uri)
    return sorted(
        i.base_name for i in found if i.type == pafs.FileType.Directory and i.base_name.startswith(prefix)
    )


def read_bytes(uri: str | Path) -> bytes:
    """The whole content of the file or object at ``uri``."""
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str | Path, data: bytes) -> None:
    """Publish ``data`` at ``uri`` atomically."""
    uri = str(uri)
    if is_s3(uri):
        fs, path = filesystem(uri)
        try:
            with fs.open_output_stream(path) as f:
                f.write(data)
        except OSError as e:
            raise StorageError(f"cannot write {uri}: {redact(e)}") from e
        return
    dest = Path(uri.removeprefix("file://"))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException as e:  # a full disk, a kill signal: leave nothing half-written behind
        # on a read-only folder the temporary was never made, and unlinking it fails as EROFS: that error
        # named the temporary in place of the one that matters
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):  # named as the file being published, not as its temporary or as none
            raise OSError(e.errno, e.strerror or str(e), str(dest)) from e
        raise


def check_writable(uri: str | Path) -> None:
    """Write and delete a probe object beside ``uri``: a missing bucket or credentials without write access
    fail here, by name, before a job starts its workers.

    Beside, not under: deleting an object's last sibling leaves an empty folder marker on S3, and a marker
    under ``uri`` would make a new output look already started."""
    probe = f"{str(uri).rstrip('/')}.write-probe"
    try:
        write_bytes(probe, b"")
        delete(probe)
    except (OSError, StorageError) as e:
        raise StorageError(f"{uri} is not writable: {redact(e)}") from None


def exchange(a: str | Path, b: str | Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported.

    Replacing a folder otherwise takes two renames, between which nothing is at the destination: a kill
    there would leave a reader (tonight's labelling job) with no model at all.
    """
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not glibc ≥ 2.28 / not Linux
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # the filesystem cannot swap
        return False
    raise OSError(err, os.strerror(err), str(b))


def publish_file(local: str | Path, uri: str | Path) -> None:
    """Publish a finished local file at ``uri`` (rename locally, single upload to S3), then drop it."""
    uri = str(uri)
    local = Path(local)
    if is_s3(uri):
        fs, path = filesystem(uri)
        try:
            pafs.copy_files(str(local), path, destination_filesystem=fs)
        except OSError as e:
            raise StorageError(f"cannot upload to {uri}: {redact(e)}") from e
        local.unlink(missing_ok=True)
        return
    dest = Path(uri.removeprefix("file://"))
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(local, dest)


STALE_STAGING_S = 24 * 3600


def staging_dir(out: str | Path) -> Path:
    """A local folder for files in progress: beside the output when local (so rename is atomic)."""
    if is_s3(out):
        d = Path(os.environ.get("FASHIONLABEL_TMP", "/tmp")) / "fashionlabel-staging"
        d.mkdir(parents=True, exist_ok=True)
        # Shared by every job on the node: files of killed tasks are dropped once surely abandoned (a shard
        # takes minutes), never those of a task that may still be writing.
        for f in d.glob("*.tmp"):
            with contextlib.suppress(OSError):
                if time.time() - f.stat().st_mtime > STALE_STAGING_S:
                    f.unlink()
        return d
    d = Path(str(out).removeprefix("file://")) / "_tmp"
    d.mkdir(parents=True, exist_ok=True)
    return d


def clean_staging(out: str | Path) -> None:
    """Drop staging files left by killed attempts of this output (local outputs; the node-wide staging
    folder of S3 outputs drops abandoned files in ``staging_dir``)."""
    if not is_s3(out):
        d = Path(str(out).removeprefix("file://")) / "_tmp"
        if d.is_dir():
            for f in d.glob("*.tmp"):
                f.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                d.rmdir()


def drop_temporaries(folder: str | Path) -> int:
    """Remove the ``.<name>.<id>.tmp`` files that :func:`write_bytes` leaves directly in a local ``folder``
    when a kill lands mid-write (its own cleanup never runs on ``kill -9``); return how many. Only for a
    caller that holds the folder's lease: another writer's file in progress has the same shape. Nothing to
    do on S3, where an object appears only once complete."""
    if is_s3(folder):
        return 0
    d = Path(str(folder).removeprefix("file://"))
    gone = 0
    for f in d.glob(".*.tmp") if d.is_dir() else ():
        f.unlink(missing_ok=True)
        gone += 1
    return gone


def delete(uri: str | Path) -> None:
    """Remove one file; absent is fine."""
    fs, path = filesystem(uri)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(path)


def delete_tree(uri: str | Path) -> None:
    """Remove a folder (an S3 prefix) and everything under it; absent is fine."""
    fs, path = filesystem(uri)
    # An object store may still list a prefix whose objects were just deleted (SeaweedFS drops empty
    # folders lazily), or another attempt may delete it first: gone by the time we delete is absent too.
    with contextlib.suppress(FileNotFoundError):
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)


def write_json(uri: str | Path, obj: Any) -> None:
    """Publish ``obj`` as indented JSON with sorted keys, atomically; other values are written as ``str``."""
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def read_json(uri: str | Path) -> Any:
    """The parsed JSON file at ``uri``."""
    return json.loads(read_bytes(uri))


def write_parquet(table: pa.Table, uri: str | Path) -> None:
    """Publish ``table`` as one zstd-compressed Parquet file, atomically."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_bytes(uri, buf.getvalue())


def read_parquet(uri: str | Path, **kw: Any) -> pa.Table:
    """The Parquet file at ``uri`` as a table; ``kw`` go to ``pyarrow.parquet.read_table``."""
    fs, path = filesystem(uri)
    return pq.read_table(path, filesystem=fs, **kw)


def read_parquet_schema(uri: str | Path) -> pa.Schema:
    """The schema of the Parquet file at ``uri``, read from its footer alone."""
    fs, path = filesystem(uri)
    return pq.read_schema(path, filesystem=fs)


def redact(e: BaseException) -> str:
    """An error message safe to log: never echo credentials that the SDK may embed."""
    msg = str(e)
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        secret = os.environ.get(var)
        if secret:
            msg = msg.replace(secret, "***")
    return msg
