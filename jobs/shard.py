"""Job entry point for `fashionlabel shard` (see `fashionlabel shard --help`).

    ray job submit --address $RAY_ADDRESS --working-dir . -- \
        python -m jobs.shard --catalog s3://BUCKET/catalog.csv --out s3://BUCKET/shards
"""

import sys

from fashionlabel.cli import run


def main(argv: list[str] | None = None) -> int:
    return run(["shard", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
