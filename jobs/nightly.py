"""Job entry point for `fashionlabel nightly` (see `fashionlabel nightly --help`).

    ray job submit --address $RAY_ADDRESS --working-dir . \
        --runtime-env-json '{"env_vars": {"AWS_REGION": "us-east-1"}}' -- \
        python -m jobs.nightly --catalog s3://fashionlabel-catalog/catalog/catalog.parquet \
            --model /opt/fashionlabel/model --root s3://fashionlabel-nightly/nightly --date 2026-03-01
"""

import sys

from fashionlabel.cli import run


def main(argv: list[str] | None = None) -> int:
    return run(["nightly", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
