"""Typed environment variables, declared once, read into frozen dataclasses.

    @dataclass(frozen=True)
    class ExpertConfig:
        port: int = env("EXPERT_PORT", 50051, "gRPC port; 0 = any free port")
        uids: tuple[str, ...] = env("EXPERT_UIDS", REQUIRED, "expert uids to host, e.g. 0.0,0.1")

    config = from_env(ExpertConfig)          # ConfigError on a missing or malformed value
    print(markdown_table(ExpertConfig))      # the README's table

A config shared by several services (the wallet, request signing) is declared once as its
own dataclass and embedded with `nested`: `wallet: WalletConfig = nested(WalletConfig)`.
`from_env` reads it from the same environment and `markdown_table` lists its variables.

Supported field types: str, int, float, bool, tuple[str, ...] (comma-separated).
Put the unit in the variable's name (`_S`, `_MS`, `_MB`) so a value never needs a comment.
Each config class validates cross-field rules in its own `__post_init__`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
_META = "envconfig"
_NESTED = "envconfig.nested"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class ConfigError(ValueError):
    """A missing or malformed environment variable; the message names it and says what to set."""


@dataclasses.dataclass(frozen=True)
class EnvVar:
    """One declared variable; `type` is filled in from the dataclass annotation."""

    name: str
    default: Any
    help: str
    type: Any = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def parse(self, raw: str) -> Any:
        typ = self.type
        text = raw.strip()
        if typ is str:
            return text
        if typ is bool:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ConfigError(f"{self.name}={raw!r} is not a bool (use 1/0, true/false)")
        if typ in (int, float):
            try:
                value = typ(text)
            except ValueError:
                raise ConfigError(f"{self.name}={raw!r} is not a{'n' if typ is int else ''} "
                                  f"{typ.__name__}") from None
            # float() takes "nan" and "inf", which slip past every `value <= 0` check (NaN compares
            # false to everything): a NaN AUTH_WINDOW_S accepted any timestamp. No variable means
            # "unlimited" by infinity; each says which value (usually 0) turns its limit off.
            if typ is float and not math.isfinite(value):
                raise ConfigError(f"{self.name}={raw!r} is not a finite number; give a number "
                                  f"(see the variable's help for the value that turns it off)")
            return value
        if typ == tuple[str, ...]:
            return tuple(part.strip() for part in text.split(",") if part.strip())
        raise TypeError(f"envconfig does not support type {typ!r} (variable {self.name})")


def env(name: str, default: Any = REQUIRED, help: str = "") -> Any:
    """Declare a dataclass field read from environment variable `name`."""
    var = EnvVar(name=name, default=default, help=help)
    if default is REQUIRED:
        return dataclasses.field(metadata={_META: var})
    return dataclasses.field(default=default, metadata={_META: var})


def nested(cls: type) -> Any:
    """Declare a dataclass field holding another config class, read from the same environment.
    Its default is `cls()`, so every variable of `cls` needs a default."""
    return dataclasses.field(default_factory=cls, metadata={_NESTED: cls})


def variables(cls: type) -> list[EnvVar]:
    """The declared variables of a config dataclass, nested ones included, in field order,
    with their types resolved."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if _NESTED in f.metadata:
            out.extend(variables(f.metadata[_NESTED]))
        elif _META in f.metadata:
            out.append(dataclasses.replace(f.metadata[_META], type=hints[f.name]))
    return out


def from_env(cls: type[T], environ: Mapping[str, str] | None = None) -> T:
    """Build `cls` from `environ` (default os.environ); ConfigError on any bad or missing value."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if _NESTED in f.metadata:
            values[f.name] = from_env(f.metadata[_NESTED], environ)
            continue
        if _META not in f.metadata:
            continue
        var = dataclasses.replace(f.metadata[_META], type=hints[f.name])
        raw = environ.get(var.name)
        if raw is None or (var.required and not raw.strip()):
            if var.required:
                raise ConfigError(f"{var.name} is required but not set: {var.help}")
            continue
        values[f.name] = var.parse(raw)
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None


def markdown_table(*classes: type) -> str:
    """A markdown table of every variable the given config classes declare."""
    rows = ["| Variable | Type | Default | Meaning |", "|---|---|---|---|"]
    for cls in classes:
        for var in variables(cls):
            typ = "list" if var.type == tuple[str, ...] else var.type.__name__
            if var.required:
                default = "**required**"
            elif var.type == tuple[str, ...]:
                default = f"`{','.join(var.default)}`" if var.default else "(empty)"
            else:
                default = f"`{var.default}`" if var.default != "" else "(empty)"
            rows.append(f"| `{var.name}` | {typ} | {default} | {var.help} |")
    return "\n".join(rows) + "\n"
