"""Overrides of a config's values: `--set section.key=value` strings, or a mapping from Python.

They are applied to the raw YAML mapping before it is validated (minigpt.config), so an
override is checked exactly like a value in the file.
"""

from __future__ import annotations

from typing import Any, Mapping, Union

import yaml

from minigpt.errors import ConfigError


def parse_override(text: str) -> tuple[str, str, Any]:
    """Split 'section.key=value' into its parts; the value is parsed as a YAML scalar."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. train.learning_rate=3e-4")
    dotted, value_text = text.split("=", 1)
    section, key = split_key(dotted, f"--set {text!r}")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError:
        value = value_text
    if isinstance(value, str) and _looks_like_float(value):
        value = float(value)  # YAML 1.1 reads "3e-4" as a string; users mean a number
    return section, key, value


def split_key(dotted: str, shown: str) -> tuple[str, str]:
    """'section.key' -> (section, key); `shown` names the override in the error."""
    parts = str(dotted).strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"{shown}: the key must be section.key, e.g. train.max_iters=100")
    return parts[0], parts[1]


Overrides = Union[list[str], Mapping[str, Any]]  # --set strings, or from Python {"train.max_iters": 100}


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text.strip().lower() not in {"nan", "inf", "-inf", "+inf", "infinity"}


def apply_overrides(raw: dict, overrides: Overrides) -> dict:
    """Return a copy of the raw YAML mapping with overrides applied (validated later).

    `--set` strings are parsed as YAML scalars; the values of a mapping are used as they are."""
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    if isinstance(overrides, Mapping):
        items = [(*split_key(dotted, f"override {dotted!r}"), value) for dotted, value in overrides.items()]
    else:
        items = [parse_override(text) for text in overrides]
    for section, key, value in items:
        if not isinstance(merged.get(section), dict):
            merged[section] = {}
        merged[section][key] = value
    return merged


def describe_overrides(overrides: Overrides) -> str:
    """Overrides as a user wrote them, for the source named in an error."""
    if isinstance(overrides, Mapping):
        return ", ".join(f"{k}={v!r}" for k, v in overrides.items())
    return ", ".join(overrides)
