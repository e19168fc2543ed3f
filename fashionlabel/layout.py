"""Where a nightly ROOT keeps everything, in one place for the night, the report and the commands.

ROOT/shards/night=D/          the night's shards (new and changed products only)
ROOT/labels/history/run_date=D/, ROOT/labels/latest/
ROOT/work/relabel-D/          labels of a relabel, before they join the night's history
ROOT/work/_nightly.lease      held by the nightly job running on this root
ROOT/work/map-before-D.parquet   the map of the nights before D: night D's previous index, until D completes
ROOT/work/map-through-D.parquet  the product map of the nights up to D, the last complete one
ROOT/manifests/D.json, ROOT/reports/D.html
"""

from __future__ import annotations

from dataclasses import dataclass

from fashionlabel import settings, storage


@dataclass(frozen=True)
class Layout:
    """Where a nightly ROOT keeps everything (README "Nightly")."""

    root: str

    def night_shards(self, date: str) -> str:
        return storage.join(self.root, "shards", f"night={date}")

    @property
    def labels(self) -> str:
        return storage.join(self.root, "labels")

    def history(self, date: str) -> str:
        return storage.join(self.labels, "history", f"run_date={date}")

    def relabel_dir(self, date: str) -> str:
        """Night ``date``'s relabel labels, one folder per night whose shards they are read from."""
        return storage.join(self.root, "work", f"relabel-{date}")

    def relabel_work(self, date: str, night: str) -> str:
        return storage.join(self.relabel_dir(date), f"night={night}")

    def map_before(self, date: str) -> str:
        """The product map of the nights before ``date``, saved as one index for the night's shard job."""
        return storage.join(self.root, "work", f"map-before-{date}.parquet")

    def map_through(self, date: str) -> str:
        """The product map of the nights up to ``date``, saved once night ``date`` is complete (the next night
        starts from it instead of reading every earlier night's index)."""
        return storage.join(self.root, "work", f"map-through-{date}.parquet")

    def saved_maps(self) -> list[str]:
        """Dates of the saved product maps (:meth:`map_through`), oldest first."""
        names = storage.listdir(storage.join(self.root, "work"), ".parquet")
        return sorted(
            n[len("map-through-") : -len(".parquet")] for n in names if n.startswith("map-through-")
        )

    @property
    def lease(self) -> str:
        """Held by the nightly job running on this root (:mod:`fashionlabel.lease`)."""
        return storage.join(self.root, "work", "_nightly.lease")

    def manifest(self, date: str) -> str:
        return storage.join(self.root, "manifests", f"{date}.json")

    def report(self, date: str) -> str:
        return storage.join(self.root, "reports", f"{date}.html")

    def nights(self) -> list[str]:
        """Dates of every night folder under ``shards/``, oldest first. A folder whose name is no date (a copy,
        ``night=2026-05-01.bak``) is refused by name, as ``query`` refuses one under ``history/``: taken for
        a night, it sorted after its own, and every later night stopped on it as "started but not
        complete", to be re-run with a ``--date`` that is not one."""
        nights = storage.listdirs(storage.join(self.root, "shards"), "night=")
        if odd := [n for n in nights if not settings.is_date(n.removeprefix("night="))]:
            raise ValueError(
                f"{storage.join(self.root, 'shards', odd[0])} is not a night folder (shards/night=YYYY-MM-DD): "
                "move it out of shards"
            )
        return [n.removeprefix("night=") for n in nights]
