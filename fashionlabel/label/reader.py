"""The read stage of labelling: one shard → one Arrow-ready batch of samples, with one sequential read.

Why not ``ray.data.read_webdataset``: it walks each tar with ``tarfile`` member by member (a seek and a
Python object per member) and caps near 12.7k samples/s on 16 cores, below what one GPU labels. Here a
shard is read whole (one ``read()`` locally, one GET on S3), the 512-byte ustar headers are parsed straight
from the buffer, and the per-sample JSON is parsed in one ``json.loads`` call for the whole shard.

Decode placement (``decode``): ``"cpu"`` decodes and resizes here with PIL (libjpeg DCT scaling), so the
actor receives N×H×W×3 uint8; ``"gpu"`` hands the raw JPEG bytes on, and the predictor actor decodes them
in one batched call on its device (nvJPEG), which is cheaper than CPU decode on a GPU machine; ``"split"``
decodes a share of each shard here and hands the rest on raw, so that the read tasks' cores take part of
the decoding off an accelerator that is busy with the forward passes too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from fashionlabel import storage
from fashionlabel.images import MISSING_IMAGE, decode

_BLOCK = 512


class TarFormatError(ValueError):
    """A shard that is not a readable tar (truncated or corrupt)."""


def read_tar(data: bytes) -> Iterator[tuple[str, bytes]]:
    """(member name, payload) of every regular file of a tar held in memory, in archive order.

    Handles ustar prefixes, pax ``path`` records and GNU long names; other member types are skipped.
    """
    pos, n, long_name = 0, len(data), None
    while pos + _BLOCK <= n:
        hdr = data[pos : pos + _BLOCK]
        if hdr[0] == 0 and not hdr.strip(b"\0"):
            return  # end-of-archive marker
        # The header checksum catches a damaged header before its size field sends the walk astray.
        try:
            declared = int(hdr[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
            raw_size = hdr[124:136]
            size = (
                int.from_bytes(raw_size[1:], "big")
                if raw_size[0] & 0x80
                else int(raw_size.split(b"\0", 1)[0].strip() or b"0", 8)
            )
        except ValueError:
            declared, size = -1, 0
        unsigned = sum(hdr[:148]) + 256 + sum(hdr[156:])
        if declared != unsigned and declared != unsigned - 256 * sum(b > 127 for b in hdr[:148] + hdr[156:]):
            raise TarFormatError(f"corrupt tar: bad header at byte {pos}")  # (some tars sum signed bytes)
        kind = hdr[156:157]
        name = hdr[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if hdr[257:262] == b"ustar" and hdr[345] != 0:
            name = hdr[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
        start = pos + _BLOCK
        end = start + size
        if end > n:
            raise TarFormatError(f"truncated tar: member {name!r} needs {end} bytes, file has {n}")
        pos = start + -(-size // _BLOCK) * _BLOCK
        if kind == b"x":
            long_name = _pax_path(data[start:end]) or long_name
        elif kind == b"L":
            long_name = data[start:end].rstrip(b"\0").decode("utf-8", "replace")
        elif kind in (b"0", b"\0", b"7"):
            yield long_name or name, data[start:end]
            long_name = None
        else:
            long_name = None
    # Every tar ends with zero blocks. Without them the file was cut short at a member boundary or inside
    # a header (a copy or upload that stopped, a zero-byte file): the products after the cut are lost,
    # which must be reported as damage, not read as a complete shard with fewer products.
    raise TarFormatError(f"truncated tar: no end-of-archive marker, the file ends at byte {n}")


def _pax_path(records: bytes) -> str | None:
    path = None
    for line in records.split(b"\n"):
        _, _, kv = line.partition(b" ")
        key, _, value = kv.partition(b"=")
        if key == b"path":
            path = value.decode("utf-8", "replace")
    return path


def read_shard_bytes(uri: str) -> bytes:
    """The whole shard: one sequential read locally, a single GET on S3."""
    return storage.read_bytes(uri) if storage.is_s3(uri) else Path(uri.removeprefix("file://")).read_bytes()


def shard_samples(uri: str) -> tuple[list[str], list[str | None], list[bytes | None]]:
    """(product_ids, image_sha256s, jpg bytes or None) of one shard, grouped by WebDataset key.

    Raises :class:`TarFormatError` for a damaged shard (a sidecar that is not a JSON object included);
    :func:`salvage_shard` reads what it can of one."""
    ids, shas, jpgs, bad = _samples(read_tar(read_shard_bytes(uri)))
    if bad:
        raise TarFormatError(bad)
    return ids, shas, jpgs


def salvage_shard(uri: str) -> tuple[list[str], list[str | None], list[bytes | None], str | None]:
    """Like :func:`shard_samples`, but a damaged shard gives the samples before the damage and its reason;
    a sample whose sidecar is not a JSON object is left out, as lost, and named in the reason."""
    members: list[tuple[str, bytes]] = []
    try:
        for m in read_tar(read_shard_bytes(uri)):
            members.append(m)
    except TarFormatError as e:
        # The damage may have cut the last sample short: kept only with both its image and its sidecar.
        last = members[-1][0].partition(".")[0] if members else None
        exts = {n.partition(".")[2] for n, _ in members if n.partition(".")[0] == last}
        if last is not None and not ("json" in exts and exts & {"jpg", "jpeg"}):
            members = [m for m in members if m[0].partition(".")[0] != last]
        ids, shas, jpgs, bad = _samples(iter(members))
        return ids, shas, jpgs, "; ".join(x for x in (bad, str(e)) if x)
    ids, shas, jpgs, bad = _samples(iter(members))
    return ids, shas, jpgs, bad or None


def _samples(
    members: Iterator[tuple[str, bytes]],
) -> tuple[list[str], list[str | None], list[bytes | None], str]:
    """(product_ids, sha256s, jpgs) of the samples of ``members``, and the damage of those left out: a
    sidecar that is not a JSON object ("" when none). Its product is not known from the shard: read under
    its key, it was labelled as a product of that name (``SKU_12_A--3f1c…`` for ``SKU.12/A``), with no error,
    and ``SKU.12/A`` never; left out, it is a lost product that the index names (``lost_products``)."""
    keys: list[str] = []
    jsons: list[bytes | None] = []
    jpgs: list[bytes | None] = []
    for name, payload in members:
        key, _, ext = name.partition(".")
        if not keys or keys[-1] != key:
            keys.append(key)
            jsons.append(None)
            jpgs.append(None)
        if ext == "json":
            jsons[-1] = payload
        elif ext in ("jpg", "jpeg"):
            jpgs[-1] = payload
    given = [j for j in jsons if j is not None]
    try:
        parsed: list[Any] = json.loads(b"[" + b",".join(given) + b"]") if given else []
    except ValueError:  # one sidecar is not JSON: parse them one by one to find which
        parsed = []
    if len(parsed) != len(given):  # or a damaged one reads as two values ('1, 2'): one by one, in step
        parsed = [_json_or_none(j) for j in given]
    # a sample without a sidecar keeps its key as its id, as before; one whose sidecar is damaged does not
    found = iter(parsed)
    metas = [{} if j is None else next(found) for j in jsons]
    bad = [k for k, m in zip(keys, metas, strict=True) if not isinstance(m, dict)]
    if bad:
        keep = [i for i, m in enumerate(metas) if isinstance(m, dict)]
        keys, metas, jpgs = [keys[i] for i in keep], [metas[i] for i in keep], [jpgs[i] for i in keep]
    ids = [str(m.get("product_id", k)) for m, k in zip(metas, keys, strict=True)]
    shas = [m.get("sha256") for m in metas]
    damage = f"the sidecar of {len(bad)} sample(s) is not a JSON object (member {bad[0]}.json)" if bad else ""
    return ids, shas, jpgs, damage


def _json_or_none(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return None


def lost_products(uri: str, found: list[str]) -> tuple[list[str], list[str | None]]:
    """(product_ids, sha256s) that the shard set's ``index.parquet`` places in shard ``uri`` but that are
    not among ``found``: the products a damaged shard lost. Empty when the shards have no index."""
    import pyarrow.compute as pc

    folder, _, name = uri.rstrip("/").rpartition("/")
    index = storage.join(folder, "index.parquet")
    if not storage.exists(index):
        return [], []
    t = storage.read_parquet(index, columns=["product_id", "sha256", "shard"])
    t = t.filter(pc.equal(t["shard"], name.removesuffix(".tar")))
    have = set(found)
    rows = [
        (p, s)
        for p, s in zip(t["product_id"].to_pylist(), t["sha256"].to_pylist(), strict=True)
        if p not in have
    ]
    return [p for p, _ in rows], [s for _, s in rows]


def skip_keys(product_ids: list[str], shas: list[str | None]) -> pa.Array:
    """Join keys ``product_id \\x1f image_sha256`` used to match already-labelled products."""
    import pyarrow.compute as pc

    return pc.binary_join_element_wise(
        pa.array(product_ids, pa.string()), pa.array([s or "" for s in shas], pa.string()), "\x1f"
    )


def read_shards(
    batch: dict[str, np.ndarray],
    decode_on: str,
    size: tuple[int, int],
    skip: pa.Array | None = None,
    cpu_share: float = 0.5,
) -> dict[str, np.ndarray]:
    """Ray Data UDF (tasks): shard URIs → one row per product to label.

    Columns: product_id, image_sha256, error (null or reason), ``image`` (N×H×W×3 uint8, decode "cpu") or
    ``jpg`` (bytes, decode "gpu"; with "split" also ``pixels``: H×W×3 uint8 bytes of the rows decoded here,
    a ``cpu_share`` of each shard's rows evenly interleaved, and their ``jpg`` empty), and per row its
    shard, the shard's row count and skipped count, so the writer on the driver knows when a shard is
    complete. A shard with nothing to label yields one ``marker`` row, so its (empty) part file is still
    written and a re-run knows it is done.
    """
    cols: dict[str, list] = {
        k: []
        for k in (
            "product_id",
            "image_sha256",
            "error",
            "payload",
            "shard",
            "shard_rows",
            "shard_skipped",
            "marker",
            "shard_damage",
        )
    }
    for uri in batch["shard"]:
        uri = str(uri)
        if not storage.is_s3(uri) and not Path(uri.removeprefix("file://")).exists():
            storage.require_on_this_node(uri.rpartition("/")[0], "index.parquet", "shard set")
        ids, shas, jpgs, damage = salvage_shard(uri)
        readable = len(ids)
        if damage:  # the products the index places in this shard but the damage took get error rows
            lost_ids, lost_shas = lost_products(uri, ids)
            ids, shas, jpgs = ids + lost_ids, shas + lost_shas, jpgs + [None] * len(lost_ids)
        keep = np.ones(len(ids), dtype=bool)
        if skip is not None and len(skip) and ids:
            import pyarrow.compute as pc

            keep = ~pc.is_in(skip_keys(ids, shas), value_set=skip).to_numpy(zero_copy_only=False)
        idx = np.flatnonzero(keep)
        skipped = len(ids) - len(idx)
        n_rows = len(idx)
        for j, i in enumerate(idx):
            err, payload = None, jpgs[i]
            if i >= readable:
                err = f"unreadable shard: {damage}"
            elif payload is None:
                err = MISSING_IMAGE
            elif decode_on == "cpu" or (
                decode_on == "split" and int((j + 1) * cpu_share) > int(j * cpu_share)
            ):
                try:
                    payload = decode(payload, size)
                except Exception as e:  # noqa: BLE001 - a corrupt image gets an error row, not a crash
                    err, payload = f"undecodable image: {str(e)[:160]}", None
            _append(cols, ids[i], shas[i], err, payload, uri, n_rows, skipped, False, damage)
        if n_rows == 0:
            _append(cols, None, None, None, None, uri, 0, skipped, True, damage)
    return _to_batch(cols, decode_on, size)


def _append(
    cols: dict[str, list],
    pid: str | None,
    sha: str | None,
    err: str | None,
    payload: Any,
    shard: str,
    rows: int,
    skipped: int,
    marker: bool,
    damage: str | None,
) -> None:
    for k, v in zip(cols, (pid, sha, err, payload, shard, rows, skipped, marker, damage), strict=True):
        cols[k].append(v)


def _to_batch(cols: dict[str, list], decode_on: str, size: tuple[int, int]) -> dict[str, np.ndarray]:
    payload = cols.pop("payload")
    out = {
        k: np.array(v, dtype=object)
        for k, v in cols.items()
        if k not in ("shard_rows", "shard_skipped", "marker")
    }
    out["shard_rows"] = np.array(cols["shard_rows"], dtype=np.int64)
    out["shard_skipped"] = np.array(cols["shard_skipped"], dtype=np.int64)
    out["marker"] = np.array(cols["marker"], dtype=bool)
    if decode_on == "cpu":
        blank = np.zeros((*size, 3), np.uint8)
        out["image"] = (
            np.stack([blank if p is None else p for p in payload])
            if payload
            else np.zeros((0, *size, 3), np.uint8)
        )
    else:  # decoded rows (split) carry pixels, the others their JPEG; each leaves the other column empty
        out["jpg"] = np.array([p if isinstance(p, bytes) else b"" for p in payload], dtype=object)
        if decode_on == "split":
            out["pixels"] = np.array(
                [p.tobytes() if isinstance(p, np.ndarray) else b"" for p in payload], dtype=object
            )
    return out
