"""The checks every configuration value goes through, and the error they raise.

Each check names the key it checks (``variants[1].weight: must be a positive number``); the
sections' parsers (``config``, ``routing``, ``dnsname``, ``security``, ``tls``,
``sagemaker``) are built from them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key."""


def _expect(value: Any, kind: type | tuple[type, ...], key: str) -> Any:
    # bool is an int in Python; a weight of `true` is a typo, not 1.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ConfigError(f"{key}: expected {_kind_name(kind)}, got {value!r}")
    if not isinstance(value, kind):
        raise ConfigError(f"{key}: expected {_kind_name(kind)}, got {value!r}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "a string", int: "an integer", float: "a number", list: "a list",
             dict: "a mapping", bool: "true or false"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _no_unknown(data: Mapping[str, Any], allowed: set[str] | frozenset[str],
                where: str) -> None:
    for key in data:
        if key not in allowed:
            known = ", ".join(sorted(allowed))
            raise ConfigError(f"{where}{key}: unknown key (known keys: {known})")


def _address(value: Any, key: str, *, listen: bool = False) -> str:
    """HOST:PORT; a listening address may use port 0 for any free port."""
    text: str = _expect(value, str, key)
    host, sep, port = text.rpartition(":")
    lowest = 0 if listen else 1
    # isdecimal() alone would take "1²" or Arabic-Indic digits, which int() then refuses.
    if not sep or not host or not (port.isascii() and port.isdigit()) \
            or not lowest <= int(port) < 65536:
        raise ConfigError(f"{key}: expected HOST:PORT, got {text!r}")
    return text


def _weight(value: Any, key: str) -> float:
    number = float(_expect(value, (int, float), key))
    if not number > 0 or number != number or number == float("inf"):
        raise ConfigError(f"{key}: must be a positive number, got {value!r}")
    return number


def _non_negative(value: Any, key: str) -> float:
    number = float(_expect(value, (int, float), key))
    if not 0 <= number < float("inf"):
        raise ConfigError(f"{key}: must be a finite number >= 0, got {value!r}")
    return number


def _positive_int(value: Any, key: str) -> int:
    number = _expect(value, int, key)
    if number < 1:
        raise ConfigError(f"{key}: must be at least 1, got {number}")
    return int(number)
