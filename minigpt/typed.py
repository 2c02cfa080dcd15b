"""Strict typing of YAML values into a config section's dataclass fields.

Every field has a type hint; a value from YAML (or an override) must be of that type, with
integers accepted for floats. Problems are collected, not raised, so that a config with several
mistakes is reported in one message, each with the dotted key and, for a typo, the closest key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union


def type_name(tp: Any) -> str:
    """A readable name for a field type, e.g. 'int', 'one of strict, replace, ignore'."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def coerce(value: Any, tp: Any) -> Any:
    """Return `value` as type `tp`, or raise TypeError. Ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)}:
            return value
        raise TypeError
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return coerce(value, option)
            except TypeError:
                pass
        raise TypeError
    if origin is list:
        if not isinstance(value, list):
            raise TypeError
        return [coerce(v, typing.get_args(tp)[0]) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError
    raise TypeError


def suggest(key: str, valid: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" (did you mean {prefix}{close[0]}?)" if close else f" (valid keys: {', '.join(valid)})"


def fill_section(cls: type, raw: Any, section: str, problems: list[str]) -> Any:
    """Build one section's dataclass from a YAML mapping, appending problems instead of raising."""
    obj = cls()
    if raw is None:
        return obj
    if not isinstance(raw, dict):
        problems.append(f"{section}: expected a mapping of keys to values, got {raw!r}")
        return obj
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key, value in raw.items():
        if key not in hints:
            problems.append(f"unknown key {section}.{key}" + suggest(str(key), names, section + "."))
            continue
        try:
            setattr(obj, key, coerce(value, hints[key]))
        except TypeError:
            problems.append(f"{section}.{key} must be {type_name(hints[key])}, got {value!r}")
    return obj
