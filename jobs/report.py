"""Job entry point for `fashionlabel report` (see `fashionlabel report --help`).

    ray job submit --address $RAY_ADDRESS --working-dir . -- \
        python -m jobs.report --labels s3://BUCKET/labels --out /mnt/shared/reports/labels.html
"""

import sys

from fashionlabel.cli import run


def main(argv: list[str] | None = None) -> int:
    return run(["report", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
