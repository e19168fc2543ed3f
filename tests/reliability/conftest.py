"""The reliability suite's ledger: every test records the faults it injected and survived, the bad-input
kinds it tried and saw handled, products lost or duplicated, and peak memory under load. At the end of the
session the table is printed and written as Markdown (``$FASHIONLABEL_RELIABILITY_REPORT``, default
``tests/reliability/last-run.md``) — docs/reliability.md quotes a real run of it.

A fault counts as *survived* only when every assertion after it passed (the ``with`` block exited cleanly),
so the table cannot claim more than the tests proved.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

REPORT = Path(os.environ.get("FASHIONLABEL_RELIABILITY_REPORT", Path(__file__).parent / "last-run.md"))


@dataclass
class Ledger:
    faults: dict[str, bool] = field(default_factory=dict)  # fault → survived
    bad_inputs: dict[str, str | None] = field(default_factory=dict)  # kind → outcome (None: not handled)
    checked: int = 0  # product sets compared against the expected set
    lost: int = 0
    duplicated: int = 0
    peak_rss: dict[str, int] = field(default_factory=dict)  # what → bytes

    @contextlib.contextmanager
    def fault(self, name: str) -> Iterator[None]:
        """Record ``name`` as injected; survived only if the block (the re-run and its checks) passes."""
        self.faults[name] = False
        yield
        self.faults[name] = True

    def bad_input(self, kind: str, outcome: str | None) -> None:
        self.bad_inputs[kind] = outcome

    def products(self, expected: Iterable[str], got: Iterable[str]) -> tuple[int, int]:
        """Compare the product ids an output holds (one entry per row) with the expected set."""
        exp, got = set(expected), list(got)
        lost, dup = len(exp - set(got)), len(got) - len(set(got))
        self.checked += 1
        self.lost += lost
        self.duplicated += dup
        return lost, dup

    def memory(self, what: str, peak: int) -> None:
        self.peak_rss[what] = max(peak, self.peak_rss.get(what, 0))

    def table(self) -> str:
        survived = sum(self.faults.values())
        handled = sum(v is not None for v in self.bad_inputs.values())
        lines = [
            "| measure | value |",
            "|---|---|",
            f"| faults injected / survived | {len(self.faults)} / {survived} |",
            f"| bad-input kinds tried / handled | {len(self.bad_inputs)} / {handled} |",
            f"| product sets checked | {self.checked} |",
            f"| products lost | {self.lost} |",
            f"| products duplicated | {self.duplicated} |",
        ]
        for what, b in sorted(self.peak_rss.items()):
            lines.append(f"| peak RSS, {what} | {b / 2**30:.2f} GiB |")
        lines += ["", "| fault | survived |", "|---|---|"]
        lines += [f"| {k} | {'yes' if v else 'NO'} |" for k, v in self.faults.items()]
        lines += ["", "| bad input | outcome |", "|---|---|"]
        lines += [f"| {k} | {v or 'NOT HANDLED'} |" for k, v in self.bad_inputs.items()]
        return "\n".join(lines) + "\n"

    def empty(self) -> bool:
        return not (self.faults or self.bad_inputs or self.checked or self.peak_rss)


LEDGER = Ledger()


@pytest.fixture(scope="session")
def ledger() -> Ledger:
    return LEDGER


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ARG001 - pytest hook signature
    if LEDGER.empty():
        return
    terminalreporter.section("reliability")
    terminalreporter.write(LEDGER.table())
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text("# Reliability suite: last run\n\n" + LEDGER.table())
    terminalreporter.write_line(f"(written to {REPORT})")
