"""Settings dataclasses read from the environment (STYLE.md rule 7): one parser for all of them.

``read_env`` fills a frozen dataclass from variables named in its ``ENV`` mapping: unset or empty keeps the
field's default; the default's type decides the parsing (bool: 1/0/true/false/yes/no/on/off; int; float;
else the string); a value that does not parse raises ``InvalidInput`` naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import fields
from typing import Any, TypeVar

from residue_monitor.detectors.exceptions import InvalidInput

T = TypeVar("T")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_KIND = {bool: "one of 1/0/true/false/yes/no/on/off", int: "an integer", float: "a number"}


def read_env(
    cls: type[T], names: Mapping[str, str], env: Mapping[str, str] | None, overrides: Mapping[str, object]
) -> T:
    """``cls`` from ``env`` (default ``os.environ``) via ``names`` (field → variable), then ``overrides``
    (e.g. CLI options; None values are ignored) on top."""
    env = os.environ if env is None else env
    values: dict[str, object] = {}
    for f in fields(cls):  # type: ignore[arg-type]  # cls is a dataclass
        raw = env.get(names[f.name], "").strip()
        if not raw:
            continue
        default: Any = f.default
        try:
            if isinstance(default, bool):
                if raw.lower() not in _TRUE + _FALSE:
                    raise ValueError(raw)
                values[f.name] = raw.lower() in _TRUE
            elif isinstance(default, int):
                values[f.name] = int(raw)
            elif isinstance(default, float):
                values[f.name] = float(raw)
            else:
                values[f.name] = raw
        except ValueError as e:
            raise InvalidInput(f"{names[f.name]}={raw!r} is not {_KIND[type(default)]}") from e
    unknown = set(overrides) - {f.name for f in fields(cls)}  # type: ignore[arg-type]
    if unknown:
        raise InvalidInput(f"unknown setting(s) {sorted(unknown)}; known: {sorted(names)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)
