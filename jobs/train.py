"""Job entry point for `fashionlabel train` (see `fashionlabel train --help`).

ray job submit --address $RAY_ADDRESS --working-dir . -- python -m jobs.train ARGS...
"""

import sys

from fashionlabel.cli import run


def main(argv: list[str] | None = None) -> int:
    return run(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
