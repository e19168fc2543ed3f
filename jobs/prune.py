"""Job entry point for `fashionlabel prune` (see `fashionlabel prune --help`).

    ray job submit --address $RAY_ADDRESS --working-dir . -- \
        python -m jobs.prune --model s3://BUCKET/models/xception_se --shards s3://BUCKET/shards \
            --out s3://BUCKET/models/xception_se-pruned --blocks 3,5,7
"""

import sys

from fashionlabel.cli import run


def main(argv: list[str] | None = None) -> int:
    return run(["prune", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
