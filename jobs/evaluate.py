"""Job entry point for `fashionlabel evaluate` (see `fashionlabel evaluate --help`).

    ray job submit --address $RAY_ADDRESS --working-dir . -- \
        python -m jobs.evaluate --model s3://BUCKET/models/fl_small --shards s3://BUCKET/shards --split test
"""

import sys

from fashionlabel.cli import run


def main(argv: list[str] | None = None) -> int:
    return run(["evaluate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
