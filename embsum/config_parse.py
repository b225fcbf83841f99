"""From YAML mappings and ``key=value`` overrides to the pydantic config sections of ``embsum.config``.

Pydantic validates every field (type, range, choice, unknown keys; ``SECTION`` is the one set of rules:
strict types, ``extra="forbid"``, no NaN or infinity). This module only feeds it and explains it:

- ``build`` nests a mapping into section instances and turns a ``ValidationError`` into a
  ``ValueError`` whose lines each name the dotted key, the value and what is allowed (with a
  suggestion for a misspelt key);
- two YAML habits are accepted before validation: a number where a string is expected
  (``serve.model_version=3``) and YAML 1.1's ``3e-4`` (no dot: a string) where a number is;
- ``parse_scalar``/``merge``/``check_key_path`` apply dotted overrides; ``reference`` renders the
  fields' descriptions as the README's Markdown table.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from typing import Any, Literal

import annotated_types
import yaml
from pydantic import ConfigDict, ValidationError
from pydantic.fields import FieldInfo

# Every section: unknown keys are errors, values keep their type (no "8" -> 8, no true -> 1), no NaN/inf.
SECTION = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def fields_of(cls: Any) -> dict[str, FieldInfo]:
    """A section's fields, in declaration order (pydantic's resolved annotations and constraints)."""
    return cls.__pydantic_fields__


def is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def bounds(info: FieldInfo) -> tuple[Any, Any]:
    """The field's inclusive (ge, le) range; None where open."""
    lo = next((m.ge for m in info.metadata if isinstance(m, annotated_types.Ge)), None)
    hi = next((m.le for m in info.metadata if isinstance(m, annotated_types.Le)), None)
    return lo, hi


def _members(tp: Any) -> tuple[Any, ...]:
    """The types a value may take: ``str | None`` -> (str, NoneType)."""
    return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)


def _loosen(tp: Any, value: Any) -> Any:
    """The two YAML habits accepted before strict validation (see the module doc)."""
    members = _members(tp)
    if str in members and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if float in members and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def build(cls: Any, values: Any, prefix: str = "") -> Any:
    """A ``cls`` instance from a mapping (nested sections from nested mappings), validated by pydantic.

    Raises ``ValueError`` naming every bad key as ``prefix + dotted path``."""
    where = prefix.rstrip(".")
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping of {cls.__name__} fields, got {values!r}")
    known = fields_of(cls)
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        info = known.get(name)
        if info is None:
            kwargs[name] = value  # pydantic reports it (extra="forbid")
        elif is_section(info.annotation):
            kwargs[name] = build(info.annotation, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _loosen(info.annotation, value)
    try:
        return cls(**kwargs)
    except ValidationError as e:
        raise ValueError("\n".join(explain(err, cls, prefix) for err in e.errors())) from None


def unknown_key(cls: Any, name: str, key: str, where: str) -> str:
    allowed = sorted(fields_of(cls))
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{key}: unknown key {name!r}; allowed keys in {where or 'the top level'}: {allowed}{hint}"


_EXPECTED = {"int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
             "bool_type": "true or false", "bool_parsing": "true or false", "float_type": "a number",
             "float_parsing": "a number", "string_type": "a string", "dataclass_exact_type": "a mapping"}
_RANGE = {"greater_than_equal", "less_than_equal", "greater_than", "less_than"}


def explain(err: Any, cls: Any, prefix: str) -> str:
    """One pydantic error as ``key: value is not allowed; what is``."""
    loc = [p for p in err["loc"]]
    kind, value = err["type"], err.get("input")
    key = prefix + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    if kind == "value_error":  # a cross-field rule (__post_init__) explains itself
        return str(err["ctx"]["error"])
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        return unknown_key(cls, str(loc[-1]), key, prefix.rstrip("."))
    info = fields_of(cls).get(str(loc[0])) if loc else None
    tp = info.annotation if info is not None else None
    lo, hi = bounds(info) if info is not None else (None, None)
    if isinstance(value, int) and not isinstance(value, bool) and float in _members(tp):
        value = float(value)  # shown as the number it becomes
    infinite = isinstance(value, float) and value in (float("inf"), float("-inf"))
    if kind in _RANGE or (kind == "finite_number" and infinite and (lo is not None or hi is not None)):
        rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        return f"{key}: {value!r} is out of range; allowed: {rng}"
    if kind == "literal_error":
        return f"{key}: {value!r} is not allowed; choose one of {list(typing.get_args(tp))}"
    if kind == "list_type":
        item = typing.get_args(tp)[0] if typing.get_args(tp) else Any
        return f"{key}: {value!r} is not allowed; expected a list of {type_name(item)}"
    if kind == "finite_number":
        return f"{key}: {value!r} is not allowed; expected a {'finite ' if infinite else ''}number"
    expected = _EXPECTED.get(kind)
    if expected is None:
        return f"{key}: {value!r} is not allowed; {err['msg']}"
    return f"{key}: {value!r} is not allowed; expected {expected}"


# ---- dotted overrides --------------------------------------------------------------------------------------
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


def check_key_path(root: Any, dotted: str) -> None:
    """Name the bad part of an override key before anything else reads it."""
    cls: Any = root
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        known = fields_of(cls) if is_section(cls) else {}
        if part not in known:
            if not known:
                raise ValueError(f"{dotted}: {'.'.join(parts[:i])} is a value, not a section")
            raise ValueError(unknown_key(cls, part, dotted, ".".join(parts[:i])))
        cls = known[part].annotation


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


# ---- the README reference ------------------------------------------------------------------------------------
def type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def default_of(info: FieldInfo) -> Any:
    return info.default_factory() if info.default_factory is not None else info.default  # type: ignore[call-arg]


def reference(root: Any) -> str:
    """Markdown table of every key, its default and its description (the README's config reference)."""
    lines = ["| key | default | allowed | description |", "| --- | --- | --- | --- |"]

    def walk(cls: Any, prefix: str) -> None:
        for name, info in fields_of(cls).items():
            tp = info.annotation
            if is_section(tp):
                walk(tp, f"{prefix}{name}.")
                continue
            lo, hi = bounds(info)
            if typing.get_origin(tp) is Literal:
                allowed = ", ".join(str(a) for a in typing.get_args(tp))
            elif lo is not None or hi is not None:
                allowed = f"{lo if lo is not None else ''}..{hi if hi is not None else ''}"
            else:
                allowed = type_name(tp)
            lines.append(f"| `{prefix}{name}` | `{json.dumps(default_of(info))}` | {allowed} | {info.description} |")

    walk(root, "")
    return "\n".join(lines)
