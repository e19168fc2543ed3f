"""Job entry point for `fashionlabel label` (see `fashionlabel label --help`).

    ray job submit --address $RAY_ADDRESS --working-dir . -- \
        python -m jobs.label --shards s3://BUCKET/shards --model s3://BUCKET/models/fl_small \
            --out s3://BUCKET/labels --run-date 2026-03-01
"""

import sys

from fashionlabel.cli import run


def main(argv: list[str] | None = None) -> int:
    return run(["label", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
