"""One measurement in a fresh Python process, for the memory benches.

A peak resident size is only comparable between runs that start from the same state: each measurement runs
``child`` (Python source that prints one JSON object as its last line) in a new interpreter, with the
project on its path and no other environment, so no run inherits the allocations of one before it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def in_fresh_process(child: str, *args: str) -> dict[str, float]:
    """The JSON object that ``child`` run with ``args`` printed last."""
    out = subprocess.run(
        [sys.executable, "-c", child, *args],
        check=True,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])
