"""Taxonomies: the heads a model predicts, declared in YAML, versioned by content hash.

Kinds of head (docs/models.md):
- ``single``: one value out of N (softmax). May declare ``not_visible`` (FashionAI's "defined for this view
  but not visible" value), which is an ordinary class the model can predict.
- ``multi``: a set of values out of N (sigmoid each), optionally grouped (texture, fabric, ...). Values come
  either from a list column of the catalog or are mined from a text column with word-bounded patterns, the
  way DeepFashion mined its attributes from product text. ``w_pos``/``w_neg`` weight the BCE terms.
- hierarchy: a single head with ``parent`` and ``parent_map`` (fine value → coarse value). Predictions are
  made consistent along the chain (``label.postprocess.consistent_choice``).

Blank and unknown markers (``unknown_values``) mean "no label": masked in training, never a class.
``values: learn`` defers the value list to the shard set's labels (``Taxonomy.learn``).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

BUILTINS = ("fashion-product-images", "deepfashion", "fashionai")
DEFAULT_UNKNOWN = ("", "NA", "N/A", "nan", "NaN", "null", "None", "unknown")


class TaxonomyError(ValueError):
    """A taxonomy file or name that cannot be used."""


@dataclass(frozen=True)
class Head:
    """One output of the model: the catalog column it is read from and the values it may take."""

    name: str
    kind: str  # "single" | "multi"
    column: str  # the catalog column holding its labels (default: ``name``)
    values: tuple[str, ...] | None = None  # None: learn from the training catalog
    weight: float = 1.0  # the head's weight in the summed loss (unused with learned uncertainty weights)
    parent: str | None = None  # the coarser single head of a hierarchy
    parent_map: Mapping[str, str] = field(default_factory=dict)  # own value -> parent's value
    not_visible: str | None = None  # the "defined but not visible" value; kept as class 0 when learned
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # group -> values (multi heads)
    patterns: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # group -> value -> regex
    w_pos: float = 1.0  # BCE weight of positive labels (multi heads)
    w_neg: float = 1.0  # BCE weight of negative labels (multi heads)
    threshold: float | None = None  # default confidence threshold; calibration may refine it

    @property
    def num_classes(self) -> int:
        if self.values is None:
            raise TaxonomyError(f"head {self.name!r} has no values yet: learn them from a catalog first")
        return len(self.values)

    @cached_property
    def index(self) -> dict[str, int]:
        return {v: i for i, v in enumerate(self.values or ())}

    @cached_property
    def _compiled(self) -> list[tuple[str, re.Pattern]]:
        """(value, its pattern) in the order of ``values``: mined labels list values in the head's order.
        Case-blind: the text is lower-cased before matching, and a pattern spelt ``T-Shirt`` must find it."""
        rx = {value: r for group in self.patterns.values() for value, r in group.items()}
        return [(value, re.compile(rf"\b({rx[value]})\b", re.IGNORECASE)) for value in self.values or rx]

    def group_of(self) -> dict[str, str]:
        """value -> group name (multi heads). Learned values may carry their group as ``group:value``."""
        out = {v: g for g, vals in self.groups.items() for v in vals}
        for v in self.values or ():
            if v not in out and ":" in v and v.split(":", 1)[0] in self.groups:
                out[v] = v.split(":", 1)[0]
        return out


def _check_head(h: Head) -> None:
    """One head's own declaration: values, weights, threshold, "not visible" value and groups. Each of
    these mistakes would otherwise train silently wrong (a duplicate value is a class no label reaches, a
    weight ≤ 0 trains the head away from its labels) or fail mid-run (a head without values)."""
    where = f"head {h.name!r}"
    if h.values is not None:
        if not h.values:
            raise TaxonomyError(
                f"{where} has no values (learned ones come from its catalog column {h.column!r}: "
                "is that column in the catalog, with labels in its training products?)"
            )
        dup = sorted({v for v in h.values if h.values.count(v) > 1})
        if dup:
            raise TaxonomyError(f"{where}: duplicate values {dup[:5]}")
    for name, w in (("weight", h.weight), ("w_pos", h.w_pos)):
        if not w > 0:  # NaN fails too
            raise TaxonomyError(f"{where}: {name} must be > 0, not {w}")
    if not h.w_neg >= 0:
        raise TaxonomyError(f"{where}: w_neg must be ≥ 0, not {h.w_neg}")
    if h.threshold is not None and not (isinstance(h.threshold, int | float) and 0 <= h.threshold <= 1):
        raise TaxonomyError(f"{where}: threshold must be a probability in [0, 1], not {h.threshold!r}")
    if h.not_visible is not None:
        if h.kind != "single":
            raise TaxonomyError(f"{where}: only a single head declares a 'not_visible' value")
        if h.values is not None and h.not_visible not in h.values:
            raise TaxonomyError(f"{where}: its not_visible value {h.not_visible!r} is not one of its values")
    if h.groups and h.kind != "multi":
        raise TaxonomyError(f"{where}: only a multi head has groups")
    for g, group in h.patterns.items():
        for v, rx in group.items():
            # compiled here, at load, not in the first packing task to mine a row (a bare re.error there)
            try:
                re.compile(str(rx))
            except re.error as e:
                raise TaxonomyError(
                    f"{where}: pattern of {g}:{v} is no regular expression ({e}): {rx!r}"
                ) from e
    seen: dict[str, str] = {}
    for g, vals in h.groups.items():
        for v in vals:
            if v in seen and seen[v] != g:
                raise TaxonomyError(f"{where}: value {v!r} is in two groups, {seen[v]!r} and {g!r}")
            seen[v] = g
    if h.values is not None and not h.patterns:
        stray = [v for v in seen if v not in h.index]
        if stray:
            raise TaxonomyError(f"{where}: groups name values it does not have: {stray[:5]}")


def _fold(v: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", v).split()).casefold()


def _near_value(h: Head, bad: str) -> str:
    """What the taxonomy has that ``bad`` may have meant: the same value in another case, spacing or
    Unicode form, one it only looks like (a letter of another alphabet), or for a list-valued multi head,
    known values joined by another separator than ``|``. Characters that print alike are spelled out."""
    folded = {_fold(v): v for v in h.values or ()}
    if (same := folded.get(_fold(bad))) is not None:
        if unicodedata.normalize("NFC", bad) == unicodedata.normalize("NFC", same):
            return (
                f"; the taxonomy has {same!r}, the same text in another Unicode form (here {ascii(bad)}, the "
                f"taxonomy's {ascii(same)}): write the export's text in NFC, the usual composed form"
            )
        spelled = "" if bad.isascii() else f"; its characters are {ascii(bad)}"
        return (
            f"; the taxonomy has {same!r} (values must match exactly: case and inner spaces count{spelled})"
        )
    if not bad.isascii() and (alike := difflib.get_close_matches(bad, list(h.values or ()), n=1)):
        return (
            f"; it only looks like the taxonomy's {alike[0]!r}: its characters are {ascii(bad)} (a letter "
            "of another alphabet, or an invisible character?)"
        )
    if h.kind == "multi" and not h.patterns:
        for sep in (",", ";", "/"):
            parts = [x.strip() for x in bad.split(sep)]
            if len(parts) > 1 and all(x in h.index for x in parts if x):
                return f"; a multi-label cell separates its values with '|', not {sep!r}"
    return ""


def _one_spelling(h: Head, counts: Counter[str]) -> None:
    """Learned values must not split one value over spellings that differ only in case, spacing or Unicode
    form ('Navy Blue' and 'Navy\\xa0Blue'): each would be a class of its own, and the labels would carry two
    values that print alike. Declared values have shard quarantine such a spelling; learned ones have no
    list to check it against, so learning refuses it by name."""
    by_fold: dict[str, list[str]] = {}
    for v in sorted(counts, key=lambda v: -counts[v]):
        by_fold.setdefault(_fold(v), []).append(v)
    split = [vs for vs in by_fold.values() if len(vs) > 1]
    if split:
        named = " and ".join(f"{ascii(v)} ({counts[v]} product(s))" for v in split[0])
        raise TaxonomyError(
            f"head {h.name!r} would learn {named} as {len(split[0])} values, though they differ only in case, "
            f"spacing or Unicode form ({len(split)} such group(s)): write one spelling in the catalog column "
            f"{h.column!r} and shard again, or declare the head's values (shard then quarantines the other "
            "spellings, naming the one declared)"
        )


def _no_booleans(h: Mapping[str, Any], values: Any) -> None:
    """YAML reads an unquoted yes, no, on, off, true or false as a boolean: ``values: [yes, no]`` would
    declare 'True' and 'False', and every catalog row labelled 'yes' would be quarantined."""
    pm = h.get("parent_map")
    named = [*(values if isinstance(values, list) else []), h.get("not_visible")]
    named += [x for kv in pm.items() for x in kv] if isinstance(pm, Mapping) else []
    found = [v for v in named if isinstance(v, bool)]
    if found:
        raise TaxonomyError(
            f"head {h['name']!r}: {found[0]!r} is how YAML reads an unquoted yes, no, on, off, true or false; "
            "quote the value as the catalog writes it (values: ['yes', 'no'])"
        )


def _check_shapes(h: Mapping[str, Any]) -> None:
    """Each key of a head holds the kind of YAML value it takes: a list of groups where a mapping belongs
    failed with Python's own words ("dictionary update sequence element #0 has length 1"), naming neither
    head nor key, and a group written as one string (``colour: red``) became its letters' values."""
    where = f"head {h['name']!r}"
    for key, inner in (("patterns", Mapping), ("groups", list), ("parent_map", None)):
        v = h.get(key)
        if v is None:
            continue
        if not isinstance(v, Mapping):
            raise TaxonomyError(f"{where}: {key} must be a mapping, not {v!r:.80}")
        bad = next((g for g, x in v.items() if inner is not None and not isinstance(x, inner)), None)
        if bad is not None:
            kind = "a mapping of value: regex" if inner is Mapping else "a list of values"
            raise TaxonomyError(f"{where}: {key} {bad!r} must be {kind}, not {v[bad]!r:.80}")
    for key in ("weight", "w_pos", "w_neg"):
        v = h.get(key, 1.0)
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise TaxonomyError(f"{where}: {key} must be a number, not {v!r:.80}")


SUFFIXES = ("_score", "_topk", "_scores")  # a head's columns in the labels tables, after its own name
TAXONOMY_KEYS = ("name", "description", "unknown_values", "heads")
HEAD_KEYS = tuple(f.name for f in fields(Head))


def _check_keys(d: Any, where: str) -> None:
    """Refuse keys a taxonomy file does not know: a misspelt one (``colum:``, ``parnet:``) would otherwise
    be ignored, and the head would read another column or lose its parent without a word."""
    if not isinstance(d, Mapping):
        return  # from_dict names what is missing
    heads = d.get("heads") if isinstance(d.get("heads"), list) else []
    checks = [(d, TAXONOMY_KEYS, f"taxonomy {where!r}")]
    checks += [
        (h, HEAD_KEYS, f"head {h.get('name')!r} of taxonomy {where!r}")
        for h in heads
        if isinstance(h, Mapping)
    ]
    for keys, known, what in checks:
        for k in keys:
            if k not in known:
                near = difflib.get_close_matches(str(k), known, n=1)
                hint = f"did you mean {near[0]!r}? " if near else ""
                raise TaxonomyError(f"{what}: unknown key {k!r} ({hint}known keys: {', '.join(known)})")


@dataclass(frozen=True)
class Taxonomy:
    """The heads a model predicts, from a dict (:meth:`from_dict`) or a built-in name or file (:meth:`load`);
    its ``version`` is a content hash."""

    name: str
    heads: tuple[Head, ...]
    unknown_values: tuple[str, ...] = DEFAULT_UNKNOWN
    description: str = ""

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Taxonomy:
        if not isinstance(d, Mapping) or "heads" not in d or "name" not in d:
            raise TaxonomyError("a taxonomy needs 'name' and 'heads'")
        if not isinstance(d["heads"], list) or not d["heads"]:
            raise TaxonomyError(f"taxonomy {d['name']!r}: 'heads' must be a non-empty list of heads")
        heads = []
        for h in d["heads"]:
            if not isinstance(h, Mapping) or not isinstance(h.get("name"), str) or not h["name"]:
                raise TaxonomyError(f"taxonomy {d['name']!r}: every head needs a 'name' (got {h!r:.80})")
            h = dict(h)
            kind = h.get("kind", "single")
            if kind not in ("single", "multi"):
                raise TaxonomyError(f"head {h.get('name')!r}: kind must be 'single' or 'multi', not {kind!r}")
            values = h.get("values", "learn")
            if values != "learn" and not isinstance(values, list):  # a bare string would become its letters
                raise TaxonomyError(
                    f"head {h['name']!r}: values must be a list or 'learn', not {values!r:.80}"
                )
            _no_booleans(h, values)
            _check_shapes(h)
            # Names as text, as catalog cells are: YAML reads an unquoted 2011 or 42 as a number, and a
            # parent_map key 2011 then matched no value '2011' (refused as "add '2011: …'", though it was
            # there), a mined value 42 failed every packing task on its pattern's lookup
            patterns = {
                str(g): {str(v): str(rx) for v, rx in p.items()} for g, p in (h.get("patterns") or {}).items()
            }
            given = {str(g): [str(v) for v in vs] for g, vs in (h.get("groups") or {}).items()}
            groups = {g: tuple(vs) for g, vs in given.items()}
            if patterns:  # mined heads: values and groups follow from the patterns
                # ... in the order the dict gives with them, when it does (a saved taxonomy: stats.json and
                # model.json are written with sorted keys, which reorders the patterns but not these lists)
                mined = {g: list(p) for g, p in patterns.items()}
                groups = {
                    g: tuple(given[g] if sorted(given.get(g) or ()) == sorted(vs) else vs)
                    for g, vs in mined.items()
                }
                flat = [v for vs in mined.values() for v in vs]
                given_values = h.get("values")
                ordered = isinstance(given_values, list) and sorted(map(str, given_values)) == sorted(flat)
                values = given_values if ordered else flat
            heads.append(
                Head(
                    name=h["name"],
                    kind=kind,
                    column=str(h.get("column", h["name"])),
                    values=None if values == "learn" else tuple(str(v) for v in values),
                    weight=float(h.get("weight", 1.0)),
                    parent=h.get("parent"),
                    parent_map={str(k): str(v) for k, v in (h.get("parent_map") or {}).items()},
                    not_visible=None if h.get("not_visible") is None else str(h["not_visible"]),
                    groups=groups,
                    patterns=patterns,
                    w_pos=float(h.get("w_pos", 1.0)),
                    w_neg=float(h.get("w_neg", 1.0)),
                    threshold=h.get("threshold"),
                )
            )
        unknown = d.get("unknown_values", DEFAULT_UNKNOWN)
        if not isinstance(unknown, list | tuple):  # a bare string would mark each of its letters "no label"
            raise TaxonomyError(
                f"taxonomy {d['name']!r}: unknown_values must be a list of markers, not {unknown!r:.80}"
            )
        tax = cls(
            name=str(d["name"]),
            heads=tuple(heads),
            # as text, as cells are compared: an unquoted 0 in YAML marks the cell "0"
            unknown_values=tuple(str(v) for v in unknown),
            description=str(d.get("description", "")),
        )
        tax._check()
        tax._check_columns()
        return tax

    @classmethod
    def load(cls, name_or_path: str | Path) -> Taxonomy:
        """Load a built-in taxonomy by name or a YAML/JSON file by path."""
        s = str(name_or_path)
        if s in BUILTINS:
            text = resources.files("fashionlabel.taxonomies").joinpath(f"{s}.yaml").read_text()
        else:
            p = Path(s)
            if not p.is_file():
                raise TaxonomyError(f"no taxonomy {s!r}: not a built-in ({', '.join(BUILTINS)}) nor a file")
            text = p.read_text()
        try:
            d = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise TaxonomyError(f"taxonomy {s!r} is not valid YAML: {e}") from e
        _check_keys(d, s)
        return cls.from_dict(d)

    def _check(self) -> None:
        names = [h.name for h in self.heads]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise TaxonomyError(f"taxonomy {self.name!r}: duplicate head names {dup}")
        for h in self.heads:
            _check_head(h)
            # a single head's cell equal to an unknown marker is "no label": such a value is a dead class
            masked = [v for v in h.values or () if h.kind == "single" and self.is_unknown(v)]
            if masked:
                raise TaxonomyError(
                    f"head {h.name!r}: value {masked[0]!r} is also one of the taxonomy's unknown_values "
                    f"({', '.join(map(repr, self.unknown_values))}), which mean 'no label': no product "
                    "would ever be labelled with it. Rename the value, or list unknown_values without it"
                )
            if h.parent is None:
                if h.parent_map:  # a map without its parent would be ignored: no hierarchy, silently
                    raise TaxonomyError(self._no_parent(h))
                continue
            if h.parent not in names:
                raise TaxonomyError(
                    f"head {h.name!r}: parent {h.parent!r} is not a head of taxonomy {self.name!r} "
                    f"(its heads: {', '.join(names)})"
                )
            parent = self.head(h.parent)
            if parent.kind != "single" or h.kind != "single":
                raise TaxonomyError(f"hierarchy {h.parent} -> {h.name}: both heads must be single")
            seen = [h.name]
            while (up := self.head(seen[-1]).parent) is not None:  # coarse → fine must end somewhere
                if up in seen:
                    raise TaxonomyError(f"parents loop: {' -> parent '.join([*seen, up])}")
                seen.append(up)
            if h.values is not None and parent.values is not None:
                self._check_parent_map(h, parent)

    def _no_parent(self, h: Head) -> str:
        """What to say of a head with a ``parent_map`` and no ``parent``, naming the head its map points at."""
        ups = set(h.parent_map.values())
        fits = [p.name for p in self.heads if p is not h and p.values is not None and ups <= set(p.values)]
        name = fits[0] if fits else "<the coarser head>"
        return (
            f"head {h.name!r} has a parent_map but no parent, so its hierarchy would be ignored: add "
            f"'parent: {name}' to it, or drop its parent_map"
        )

    @staticmethod
    def _check_parent_map(h: Head, parent: Head) -> None:
        """Each value of ``h`` names one value of ``parent``: a missing entry and one naming no value of the
        parent (a typo) are told apart."""
        for v in h.values or ():
            up = h.parent_map.get(v)
            if up is not None and up not in parent.index:
                near = difflib.get_close_matches(str(up), list(parent.index), n=1)
                hint = f"did you mean {near[0]!r}? " if near else ""
                some = list(parent.values or ())
                some = some if len(some) <= 20 else [*some[:20], "…"]
                raise TaxonomyError(
                    f"head {h.name!r}: parent_map maps {v!r} to {up!r}, which is not a value of "
                    f"{parent.name!r} ({hint}its values: {', '.join(some)})"
                )
        missing = [v for v in h.values or () if v not in h.parent_map]
        if missing:
            raise TaxonomyError(
                f"head {h.name!r}: parent_map names no value of {parent.name!r} for {missing[:5]}: add "
                f"'{missing[0]}: <its {parent.name}>' for each"
            )

    def _check_columns(self) -> None:
        """Each head's columns in the shard index and the labels tables are its own: a head named like one of
        their fixed columns (a shoe ``width``: the index's stored image width) or like another head's
        ``_score`` column would make two columns of one name, and the first shard would fail to write."""
        from fashionlabel.latest import latest_schema  # these modules import this one
        from fashionlabel.shards.spec import index_schema

        none = Taxonomy(self.name, ())
        for table, schema in (("the shard index's", index_schema), ("the labels tables'", latest_schema)):
            names, fixed = schema(self).names, schema(none).names
            dup = next((n for n in names if names.count(n) > 1), None)
            if dup is None:
                continue
            owners = [h.name for h in self.heads if dup in (h.name, *(f"{h.name}{x}" for x in SUFFIXES))]
            owners.sort(key=lambda n: n != dup)  # the head of that very name first
            taken = (
                f"one of {table} own columns ({', '.join(fixed)})"
                if dup in fixed
                else f"a column of head {owners[1]!r} too"
            )
            raise TaxonomyError(
                f"head {owners[0]!r}: its labels would go to column {dup!r}, {taken}. Name the head "
                f"otherwise; its catalog column keeps its name (column: {self.head(owners[0]).column})"
            )

    def to_dict(self) -> dict[str, Any]:
        heads = []
        for h in self.heads:
            d = asdict(h)
            d["values"] = list(h.values) if h.values is not None else "learn"
            d["groups"] = {g: list(v) for g, v in h.groups.items()}
            d["parent_map"] = dict(h.parent_map)
            heads.append({k: v for k, v in d.items() if v not in (None, {}, [])})
        return {
            "name": self.name,
            "description": self.description,
            "unknown_values": list(self.unknown_values),
            "heads": heads,
        }

    @cached_property
    def version(self) -> str:
        """Content hash of :meth:`to_dict`: name, description, unknown values and heads. Two files that
        differ only in layout, comments or key order share a version; a new description is a new one."""
        blob = json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    # ---- lookup -------------------------------------------------------------------------------
    def head(self, name: str) -> Head:
        for h in self.heads:
            if h.name == name:
                return h
        raise TaxonomyError(f"taxonomy {self.name!r} has no head {name!r}")

    @property
    def single_heads(self) -> tuple[Head, ...]:
        return tuple(h for h in self.heads if h.kind == "single")

    @property
    def columns(self) -> set[str]:
        return {h.column for h in self.heads}

    def chains(self) -> list[list[Head]]:
        """Hierarchies as coarse → fine chains, one per leaf head that has a parent."""
        parents = {h.parent for h in self.heads if h.parent}
        chains = []
        for leaf in self.heads:
            if leaf.parent is None or leaf.name in parents:
                continue
            chain = [leaf]
            while chain[-1].parent:
                chain.append(self.head(chain[-1].parent))
            chains.append(chain[::-1])
        return chains

    # ---- labels -------------------------------------------------------------------------------
    def is_unknown(self, raw: Any) -> bool:
        return (
            raw is None or (isinstance(raw, float) and raw != raw) or str(raw).strip() in self.unknown_values
        )

    def labels_from_row(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """Catalog row → {head: value | None} for single heads, {head: [values]} | None for multi heads; a
        single head's list cell (JSON Lines, Parquet) of several values stays a list, for ``invalid_label``.

        Mined multi heads match their patterns against the lower-cased source text; list-valued multi
        heads accept a list or a ``|``-separated string. Unknown markers become None.
        """
        out: dict[str, Any] = {}
        for h in self.heads:
            raw = row.get(h.column)
            if self.is_unknown(raw):
                out[h.name] = None
            elif h.kind == "single" and isinstance(raw, list | tuple):
                # a JSON Lines or Parquet list cell: one value is that value; several stay a list, which
                # ``invalid_label`` refuses (as text, "['Black', 'White']" was learned as a class of its own)
                vals = [str(v).strip() for v in raw if not self.is_unknown(v)]
                out[h.name] = (vals[0] if len(vals) == 1 else vals) if vals else None
            elif h.kind == "single":
                out[h.name] = str(raw).strip()
            elif h.patterns:
                text = str(raw).lower()
                out[h.name] = [v for v, rx in h._compiled if rx.search(text)]
            else:
                items = raw if isinstance(raw, list | tuple) else str(raw).split("|")
                out[h.name] = [str(v).strip() for v in items if v is not None and str(v).strip()]
        return out

    def invalid_label(self, labels: Mapping[str, Any]) -> str | None:
        """A human-readable reason when a label falls outside the declared values, else None."""
        for h in self.heads:
            if bad := self._outside(h, labels):
                col = f" (column {h.column!r})" if h.column != h.name else ""
                if h.kind == "single" and isinstance(labels.get(h.name), list):
                    return (
                        f"{h.name}{col} holds {len(bad)} values {bad[:5]}: a single head takes one (write one "
                        "value, or declare the head kind: multi)"
                    )
                why = (
                    f"{h.name}={bad[0]!r}{col} is not one of the {len(h.values or ())} values of the taxonomy"
                )
                return why + _near_value(h, bad[0])
        return None

    def outside_heads(self, labels: Mapping[str, Any]) -> list[str]:
        """The heads whose label in ``labels`` has a value outside the head's declared values."""
        return [h.name for h in self.heads if self._outside(h, labels)]

    @staticmethod
    def _outside(h: Head, labels: Mapping[str, Any]) -> list[str]:
        v = labels.get(h.name)
        if h.kind == "single" and isinstance(v, list):  # several values: no single head has them
            return v
        if v is None or h.values is None:
            return []
        return [x for x in (v if isinstance(v, list) else [v]) if x not in h.index]

    def learn(self, label_rows: Iterable[Mapping[str, Any]]) -> Taxonomy:
        """Resolve ``values: learn`` heads from the label rows given: training takes every product of the
        shard set, validation and test ones included. Only the names are learned, sorted (so the result is
        stable): no count or frequency reaches the model, and a value only a test product has becomes a
        class no product trains, counted as an error of the head when evaluated, not hidden from it."""
        pending = [h for h in self.heads if h.values is None]
        if not pending:
            return self
        seen: dict[str, Counter[str]] = {h.name: Counter() for h in pending}
        for labels in label_rows:
            for h in pending:
                v = labels.get(h.name)
                if v is not None:
                    seen[h.name].update(v if isinstance(v, list) else [v])
        heads = []
        for h in self.heads:
            if h.values is None:
                _one_spelling(h, seen[h.name])
                vals = sorted(seen[h.name])
                if h.not_visible and h.not_visible in vals:  # keep "not visible" as class 0
                    vals.remove(h.not_visible)
                    vals.insert(0, h.not_visible)
                h = replace(h, values=tuple(vals))
            heads.append(h)
        tax = replace(self, heads=tuple(heads))
        tax._check()
        return tax
