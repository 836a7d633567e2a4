"""``local_workers`` with autoscaling (SageMaker's target tracking on concurrency):

    local_workers: {min: 1, max: 4, target_concurrency: 2, scale_out_cooldown_s: 30,
                    scale_in_cooldown_s: 300}

The parser lives here, beside :class:`Autoscaling`; ``tritonmesh.config`` calls it for a
``local_workers`` mapping with ``min`` or ``max``. The controller is
:mod:`tritonmesh.autoscaler`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from tritonmesh.configvalues import ConfigError

__all__ = ["AUTOSCALING_KEYS", "Autoscaling", "parse_autoscaling"]


@dataclass(frozen=True)
class Autoscaling:
    min: int
    max: int
    # Requests per instance (outstanding plus waiting in the queue) the variant aims for.
    target_concurrency: float
    # Above target at every sample for this long (and this long after the last change):
    # start workers; below what one worker fewer could carry for scale_in_cooldown_s:
    # drain and stop one.
    scale_out_cooldown_s: float = 30.0
    scale_in_cooldown_s: float = 300.0
    interval_s: float = 1.0  # how often the concurrency is sampled
    drain_timeout_s: float = 30.0  # a worker scaled in gets this long to finish its requests


AUTOSCALING_KEYS: Final = frozenset({"min", "max", "target_concurrency", "scale_out_cooldown_s",
                                     "scale_in_cooldown_s", "interval_s", "drain_timeout_s"})


def _int(data: Mapping[str, Any], name: str, key: str) -> int:
    value = data.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}.{name}: expected an integer >= 1, got {value!r}")
    return value


def _seconds(data: Mapping[str, Any], name: str, key: str, default: float, *,
             positive: bool = False) -> float:
    value = data.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or value < 0 or (positive and value == 0):
        what = "> 0" if positive else ">= 0"
        raise ConfigError(f"{key}.{name}: expected a finite number {what}, got {value!r}")
    return float(value)


def parse_autoscaling(data: Mapping[str, Any], key: str) -> Autoscaling | None:
    """The autoscaling part of a ``local_workers`` mapping (None without ``min`` or
    ``max``); every error names its key under ``key``."""
    if "min" not in data and "max" not in data:
        return None
    for name in ("min", "max", "target_concurrency"):
        if name not in data:
            raise ConfigError(f"{key}.{name}: required with autoscaling (min, max, "
                              "target_concurrency)")
    if "count" in data:
        raise ConfigError(f"{key}.count: not with autoscaling (min workers start, up to max)")
    low, high = _int(data, "min", key), _int(data, "max", key)
    if high < low:
        raise ConfigError(f"{key}.max: must be at least min ({low}), got {high}")
    return Autoscaling(
        min=low, max=high,
        target_concurrency=_seconds(data, "target_concurrency", key, 0.0, positive=True),
        scale_out_cooldown_s=_seconds(data, "scale_out_cooldown_s", key, 30.0),
        scale_in_cooldown_s=_seconds(data, "scale_in_cooldown_s", key, 300.0),
        interval_s=_seconds(data, "interval_s", key, 1.0, positive=True),
        drain_timeout_s=_seconds(data, "drain_timeout_s", key, 30.0, positive=True),
    )
