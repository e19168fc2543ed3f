"""Checks shared by the jobs' frozen configs and arguments: a bad setting fails at once, by name.

A value that would only fail deep inside a Ray task (a zero-sized shard, a batch of nothing, a date that
is not one) is refused before anything starts or is written, with the setting's name and the rule.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any


class SettingsError(ValueError):
    """Settings out of their range. ``bad`` maps each field to its value, so that the command line can
    name them as the flags the user typed (``--batch-size 0``) where the library names fields."""

    def __init__(self, what: str, bad: dict[str, Any], rules: str):
        self.what, self.bad, self.rules = what, bad, rules
        super().__init__(self.render())

    def render(self, flag: Callable[[str], str | None] = lambda field: None) -> str:
        """The message; ``flag(field)`` gives the option that sets a field (None: name the field)."""
        named = [f"{flag(k)} {_shown(v)}" if flag(k) else f"{k}={v!r}" for k, v in self.bad.items()]
        return f"invalid {self.what} setting(s): " + ", ".join(named) + f" ({self.rules})"


def _shown(v: Any) -> Any:
    """A value as typed after its flag; quoted where it is blank, or it would not show at all."""
    return repr(v) if isinstance(v, str) and not v.strip() else v


def check(what: str, obj: Any, checks: dict[str, bool], rules: str) -> None:
    """Raise ``SettingsError`` (a ``ValueError``) naming every field of ``obj`` whose check is False.

    Args:
        what: the kind of settings ("training", "shard", "label"), for the message.
        checks: field name → whether its value is allowed.
        rules: the rules in words, appended to the message.
    """
    bad = {k: getattr(obj, k) for k, ok in checks.items() if not ok}
    if bad:
        raise SettingsError(what, bad, rules)


def run_date(date: str | None) -> str:
    """``date`` as YYYY-MM-DD (today in UTC when None): run folders are named after it."""
    if date is None:
        return dt.datetime.now(dt.UTC).date().isoformat()
    try:
        return dt.date.fromisoformat(str(date)).isoformat()
    except ValueError:
        raise ValueError(f"run date {date!r} is not a date (YYYY-MM-DD)") from None


def is_date(text: str) -> bool:
    """Whether ``text`` is a date written YYYY-MM-DD, as run and night folders are named after one."""
    try:
        return dt.date.fromisoformat(text).isoformat() == text
    except ValueError:
        return False
