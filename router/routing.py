"""A variant's routing keys: its strategy, how its queue is ordered, and where
LEAST_OUTSTANDING_WORK reads a request's cost (``work_hints``)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from tritonmesh.configvalues import ConfigError, _expect, _no_unknown

__all__ = ["QueueOrder", "RoutingStrategy", "WorkHint"]


class RoutingStrategy(enum.StrEnum):
    RANDOM = "RANDOM"
    LEAST_OUTSTANDING_REQUESTS = "LEAST_OUTSTANDING_REQUESTS"
    ROUND_ROBIN = "ROUND_ROBIN"
    POWER_OF_TWO_CHOICES = "POWER_OF_TWO_CHOICES"
    LEAST_OUTSTANDING_WORK = "LEAST_OUTSTANDING_WORK"


class QueueOrder(enum.StrEnum):
    """How late binding serves the requests waiting for a free instance."""

    FIFO = "FIFO"
    LEAST_SLACK = "LEAST_SLACK"


@dataclass(frozen=True)
class WorkHint:
    """Where LEAST_OUTSTANDING_WORK reads a model's request cost: ``base`` plus the sum of
    input tensor ``input``'s elements, or plus request parameter ``parameter``. Requests
    without it cost ``base`` (at least 1)."""

    input: str | None = None
    parameter: str | None = None
    base: float = 0.0


def _strategy(value: Any, key: str) -> RoutingStrategy:
    text = _expect(value, str, key)
    try:
        return RoutingStrategy(text.upper())
    except ValueError:
        options = ", ".join(s.value for s in RoutingStrategy)
        raise ConfigError(f"{key}: unknown strategy {text!r} (expected one of {options})") from None


def _work_hints(data: Any) -> dict[str, WorkHint]:
    _expect(data, dict, "work_hints")
    hints = {}
    for model, spec in data.items():
        where = f"work_hints.{model}"
        _expect(spec, dict, where)
        _no_unknown(spec, {"input", "parameter", "base"}, f"{where}.")
        if ("input" in spec) == ("parameter" in spec):
            raise ConfigError(f"{where}: give exactly one of input or parameter")
        source = "input" if "input" in spec else "parameter"
        name = _expect(spec[source], str, f"{where}.{source}")
        if not name:
            raise ConfigError(f"{where}.{source}: must not be empty")
        base = float(_expect(spec.get("base", 0.0), (int, float), f"{where}.base"))
        if not 0 <= base < float("inf"):
            raise ConfigError(f"{where}.base: must be a finite number >= 0, got {base!r}")
        hints[model] = WorkHint(**{source: name}, base=base)
    return hints
