"""Job entry point for `fashionlabel calibrate` (see `fashionlabel calibrate --help`).

    ray job submit --address $RAY_ADDRESS --working-dir . -- \
        python -m jobs.calibrate --model s3://BUCKET/models/fl_small --shards s3://BUCKET/shards \
            --out s3://BUCKET/models/fl_small-review30 --review-share 0.3
"""

import sys

from fashionlabel.cli import run


def main(argv: list[str] | None = None) -> int:
    return run(["calibrate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
