"""Typed, frozen dataclass configs from YAML: the generic machinery behind embsum/config.py.

Fields carry a one-line doc and an inclusive numeric range in ``metadata`` (``field_doc``);
``build`` checks every value against its annotation (int, float, str, bool, Optional, Literal,
list, nested dataclass) and range, and every error names the dotted key, the value and what is
allowed. ``reference`` renders the docs as a Markdown table, so documentation cannot drift.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import field
from typing import Any, Literal

import yaml


def field_doc(default: Any, doc: str, *, lo: float | None = None, hi: float | None = None,
       factory: bool = False) -> Any:
    """A dataclass field with a doc line and an optional inclusive numeric range."""
    meta = {"doc": doc, "lo": lo, "hi": hi}
    if factory:
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against annotation ``tp``; return it (ints widen to float). Raise naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(key, value, a)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(f"{key}: {value!r} is not allowed; expected {type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{key}: {value!r} is not allowed; choose one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{key}: {value!r} is not allowed; expected a list of {type_name(args[0])}")
        return [coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return build(tp, value, key + ".")
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}: {value!r} is not allowed; expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}: {value!r} is not allowed; expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads '3e-4' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key}: {value!r} is not allowed; expected a number")
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. serve.model_version=3
        if not isinstance(value, str):
            raise ValueError(f"{key}: {value!r} is not allowed; expected a string")
        return value
    raise AssertionError(f"unsupported annotation {tp} for {key}")


def build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"{prefix}{unknown[0]}: unknown key; allowed keys in "
                         f"{prefix.rstrip('.') or 'the top level'}: {sorted(names)}")
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        key = prefix + name
        v = coerce(key, value, hints[name])
        lo, hi = names[name].metadata.get("lo"), names[name].metadata.get("hi")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if v != v:  # NaN compares False with every bound, so it would pass any range
                raise ValueError(f"{key}: {v!r} is not allowed; expected a number")
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
                raise ValueError(f"{key}: {v!r} is out of range; allowed: {rng}")
        kwargs[name] = v
    return cls(**kwargs)


def parse_scalar(text: str) -> Any:
    """An override's value is YAML: 3e-4 -> float, true -> bool, null -> None, [a, b] -> list."""
    value = yaml.safe_load(text) if text.strip() else ""
    # Unquoted none/None also mean null; a quoted '"none"' stays the string (e.g. for replace()).
    if isinstance(value, str) and value.lower() in {"none", "null", "~"} and text.strip() == value:
        return None
    return value


def merge(base: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = base
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ValueError(f"{dotted}: '{p}' is a value, not a section")
        cur = nxt
    cur[parts[-1]] = value


def check_key_path(root: type, dotted: str) -> None:
    """Name the bad part of an override key before anything else reads it."""
    cls: Any = root
    for i, part in enumerate(dotted.split(".")):
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if part not in fields:
            where = ".".join(dotted.split(".")[:i]) or "the top level"
            raise ValueError(f"{dotted}: unknown key '{part}'; allowed keys in {where}: {sorted(fields)}")
        cls = typing.get_type_hints(cls)[part]


def reference(root: type) -> str:
    """Markdown table of every key, its default and its doc (the README's config reference)."""
    lines = ["| key | default | allowed | description |", "| --- | --- | --- | --- |"]

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            lo, hi = f.metadata.get("lo"), f.metadata.get("hi")
            if typing.get_origin(tp) is Literal:
                allowed = ", ".join(str(a) for a in typing.get_args(tp))
            elif lo is not None or hi is not None:
                allowed = f"{lo if lo is not None else ''}..{hi if hi is not None else ''}"
            else:
                allowed = type_name(tp)
            lines.append(f"| `{prefix}{f.name}` | `{json.dumps(default)}` | {allowed} | {f.metadata['doc']} |")

    walk(root, "")
    return "\n".join(lines)
