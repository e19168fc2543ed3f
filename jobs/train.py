"""Job entry point for `fashionlabel train` (see `fashionlabel train --help`).

    ray job submit --address $RAY_ADDRESS --working-dir . -- \
        python -m jobs.train --shards s3://BUCKET/shards --out s3://BUCKET/models/fl_small --workers 4 --gpu
"""

import sys

from fashionlabel.cli import run


def main(argv: list[str] | None = None) -> int:
    return run(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
