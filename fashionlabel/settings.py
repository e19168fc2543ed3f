"""Checks shared by the jobs' frozen configs and arguments: a bad setting fails at once, by name.

A value that would only fail deep inside a Ray task (a zero-sized shard, a batch of nothing, a date that
is not one) is refused before anything starts or is written, with the setting's name and the rule.
"""

from __future__ import annotations

import datetime as dt
from typing import Any


def check(what: str, obj: Any, checks: dict[str, bool], rules: str) -> None:
    """Raise ``ValueError`` naming every field of ``obj`` whose check is False.

    Args:
        what: the kind of settings ("training", "shard", "label"), for the message.
        checks: field name → whether its value is allowed.
        rules: the rules in words, appended to the message.
    """
    bad = [f"{k}={getattr(obj, k)!r}" for k, ok in checks.items() if not ok]
    if bad:
        raise ValueError(f"invalid {what} setting(s): " + ", ".join(bad) + f" ({rules})")


def run_date(date: str | None) -> str:
    """``date`` as YYYY-MM-DD (today in UTC when None): run folders are named after it."""
    if date is None:
        return dt.datetime.now(dt.UTC).date().isoformat()
    try:
        return dt.date.fromisoformat(str(date)).isoformat()
    except ValueError:
        raise ValueError(f"run date {date!r} is not a date (YYYY-MM-DD)") from None
