"""``fashionlabel/ARCHITECTURE.md``, the map a newcomer reads first, names every module of the library."""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fashionlabel"


def test_architecture_names_every_module():
    """A module the map leaves out is one a reader does not know to look for: ``lease.py`` (which every
    shard, label and nightly job holds) and ``shards/spec.py`` were in no line of it."""
    text = (PACKAGE / "ARCHITECTURE.md").read_text()
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "__init__.py":
            continue
        # by file name; a model family file may be named by its family (``one file per family (small, …)``)
        family = path.parent.name == "models" and re.search(rf"\b{path.stem}\b", text)
        if path.name not in text and not family:
            missing.append(path.relative_to(PACKAGE).as_posix())
    assert not missing, f"ARCHITECTURE.md does not name {missing}"
