"""Job entry point for `fashionlabel query` (see `fashionlabel query --help`).

    ray job submit --address $RAY_ADDRESS --working-dir . -- \
        python -m jobs.query --labels s3://fashionlabel-nightly/nightly/labels --csv "SELECT ..."
"""

import sys

from fashionlabel.cli import run


def main(argv: list[str] | None = None) -> int:
    return run(["query", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
