"""What a shard set is made of: the packing settings, the index and quarantine schemas, shard names, and
the job's one error (a task that found the image source down becomes it, with the task's own message).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from fashionlabel.catalog import SourceUnavailable
from fashionlabel.settings import check
from fashionlabel.storage import NotOnThisNodeError
from fashionlabel.taxonomy import Taxonomy

QUARANTINE_SCHEMA = pa.schema(
    [
        ("product_id", pa.string()),
        ("image_uri", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)


@dataclass(frozen=True)
class ShardConfig:
    """Packing settings of a shard job. All but ``max_failure_rate`` and ``fetches_in_flight`` are part of
    the saved plan's fingerprint: a re-run into the same folder with other settings is refused."""

    samples_per_shard: int = 1000
    max_side: int = 256  # longest side of a stored image, in pixels
    jpeg_quality: int = 90
    max_pixels: int = 40_000_000  # larger sources are quarantined before decoding (decompression bombs)
    min_side: int = 8  # sources with a shorter side are quarantined
    max_failure_rate: float = 0.5  # the job fails when a larger share of its rows is quarantined
    # image fetches a shard task (and a task of the --incremental hash pass) keeps going at once: network waits
    # overlap (fewer for a rate-limited host)
    fetches_in_flight: int = 8
    # a label the taxonomy lacks leaves that head unlabelled instead of quarantining the product: a night
    # labels its catalog with the model's taxonomy and reads no label column (a value new to the catalog)
    keep_outside_labels: bool = False

    def __post_init__(self) -> None:
        check(
            "shard",
            self,
            {
                "samples_per_shard": self.samples_per_shard >= 1,
                "max_side": self.max_side >= self.min_side,
                "jpeg_quality": 1 <= self.jpeg_quality <= 100,
                "max_pixels": self.max_pixels >= 1,
                "min_side": self.min_side >= 1,
                "max_failure_rate": 0 <= self.max_failure_rate <= 1,
                "fetches_in_flight": self.fetches_in_flight >= 1,
            },
            "samples per shard, min side, fetches in flight ≥ 1; max side ≥ min side; JPEG quality 1–100; "
            "0 ≤ max failure rate ≤ 1",
        )


class ShardJobError(RuntimeError):
    """The shard job cannot proceed or failed past its allowed failure rate."""


class ShardWriteError(OSError):
    """A shard task could not write its shard into the output (a full disk, a folder turned read-only, a
    file where ``_tmp`` or ``_parts`` should be). An OSError still, so that Ray retries the task."""


class PlanMismatchError(ShardJobError):
    """The output holds the saved plan of another catalog, other settings or another taxonomy; ``what``
    says which, as far as the saved plan tells."""

    def __init__(self, out: str, what: str):
        super().__init__(f"{out} holds shards of {what}; use a new --out")
        self.what = what


def shard_name(i: int) -> str:
    """The name of shard ``i`` without extension: ``shard-000042``."""
    return f"shard-{i:06d}"


def index_schema(taxonomy: Taxonomy) -> pa.Schema:
    """The schema of a shard set's ``index.parquet``: one row per packed product (key, shard, source URI,
    sha256 and size of the source bytes, original and stored pixel size), then one column per head."""
    fields = [
        ("key", pa.string()),
        ("product_id", pa.string()),
        ("shard", pa.string()),
        ("image_uri", pa.string()),
        ("sha256", pa.string()),
        ("bytes", pa.int64()),
        ("orig_width", pa.int32()),
        ("orig_height", pa.int32()),
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
    for h in taxonomy.heads:
        fields.append((h.name, pa.string() if h.kind == "single" else pa.list_(pa.string())))
    return pa.schema(fields)


def ray_get(refs: list) -> list:
    """``ray.get``; a task that found the image source down, or the output not on its node, fails the job
    with its own message."""
    import ray

    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, (SourceUnavailable, NotOnThisNodeError)):
            raise ShardJobError(str(e.cause)) from None
        if isinstance(e.cause, ShardWriteError):  # its own line, not Ray's traceback of the task
            raise ShardJobError(
                f"{e.cause.strerror}; once the cause is removed, the same command resumes (shards already "
                "packed are kept)"
            ) from None
        raise
