"""Frozen dataclasses to and from JSON: the one serialiser of liverseg's file formats.

Each file format keeps one owner (a frozen dataclass with its version: `manifest.Manifest`,
`rundir.RunInfo`, `models.ExportInfo`, ...); their parts are written and read here, from
the fields and their type hints, so no owner spells a key twice. An owner or part derives
from `Record`, which gives it `to_json()` and `from_json(d)` through this module. Field
metadata (`key`) adapts a field to the file as it has always been written:

    key(name=None, omit=False, group=None, skip=False, inline=False)
        name    the JSON key (default: the field's name)
        omit    leave the key out when the value is the field's default (None, "", ...)
        group   write the field inside the sub-object `group` ({"postprocess": {...}})
        skip    not part of the file (set by whoever loads it)
        inline  a nested dataclass whose keys are written at this level (read back when
                one of them is there)

`to_json(obj)` gives a dict (tuples as lists, nested dataclasses as dicts); `from_json(cls,
d)` builds `cls` back, converting by the type hints (nested dataclasses, tuples, optionals,
dicts of them), a missing key taking the field's default. Versions, and reading what older
versions wrote, stay with each owner.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def key(
    name: str | None = None,
    omit: bool = False,
    group: str | None = None,
    skip: bool = False,
    inline: bool = False,
    **field_kw,
):
    """A dataclass field with its JSON spelling (see the module docstring)."""
    spelling = {"name": name, "omit": omit, "group": group, "skip": skip, "inline": inline}
    return dataclasses.field(metadata={"json": spelling}, **field_kw)


def _spec(f: dataclasses.Field) -> dict:
    return {"name": None, "omit": False, "group": None, "skip": False, "inline": False, **f.metadata.get("json", {})}


class Record:
    """The base of liverseg's file-format dataclasses and their parts: JSON through this
    module, by field and type hint (an owner overrides `from_json` to check its version)."""

    def to_json(self) -> dict:
        return to_json(self)

    @classmethod
    def from_json(cls, d: dict):
        return from_json(cls, d)


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def to_json(obj) -> dict:
    """The JSON object of a dataclass instance."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        spec = _spec(f)
        value = getattr(obj, f.name)
        if spec["skip"] or spec["omit"] and value == _default(f):
            continue
        target = out.setdefault(spec["group"], {}) if spec["group"] else out
        if spec["inline"]:
            target.update(_plain(value))
        else:
            target[spec["name"] or f.name] = _plain(value)
    return out


def _plain(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return value.to_json() if hasattr(value, "to_json") else to_json(value)
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@functools.cache
def _hints(cls) -> dict:
    """The fields' types (resolved once per class)."""
    return typing.get_type_hints(cls)


def from_json(cls: type[T], d: dict) -> T:
    """An instance of the dataclass `cls` from its JSON object (KeyError for a missing key
    without a default, TypeError/ValueError for a value of another type: the owner names
    the file)."""
    hints, values = _hints(cls), {}
    for f in dataclasses.fields(cls):
        spec = _spec(f)
        if spec["skip"] or not f.init:
            continue
        where = d.get(spec["group"], {}) if spec["group"] else d
        name = spec["name"] or f.name
        if spec["inline"]:
            nested = _inner(hints[f.name])
            if any((_spec(g)["group"] or _spec(g)["name"] or g.name) in where for g in dataclasses.fields(nested)):
                values[f.name] = _typed(nested, where)
            elif _default(f) is dataclasses.MISSING:
                raise KeyError(name)
        elif name in where:
            values[f.name] = _typed(hints[f.name], where[name])
        elif _default(f) is dataclasses.MISSING:
            raise KeyError(name)
    return cls(**values)


def _inner(tp):
    """The dataclass of an optional type hint (`X | None` -> X)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) else tp


def _typed(tp, value):
    """`value` (plain JSON) as the type hint `tp` says."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _typed(inner[0], value) if len(inner) == 1 else value
    if dataclasses.is_dataclass(tp):
        return tp.from_json(value) if hasattr(tp, "from_json") else from_json(tp, value)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_typed(args[0], v) for v in value)
        return tuple(_typed(a, v) for a, v in zip(args, value, strict=True)) if args else tuple(value)
    if origin is dict:
        return {k: _typed(args[1], v) for k, v in value.items()} if args else dict(value)
    if tp is float:
        return float(value)
    if tp is int and not isinstance(value, bool):
        return int(value)
    return value


__all__ = ["Record", "from_json", "key", "to_json"]
