"""The ``load_report`` key of a variant: how its router polls Triton's own view of load
(tritonmesh.loadreport). Apart from config.py so that a variant's settings grow by one
field and one call there."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from tritonmesh.configvalues import (
    ConfigError,
    _address,
    _expect,
    _no_unknown,
    _positive_int,
    _weight,
)

__all__ = ["LoadReportConfig", "parse_load_report"]

# Triton's metrics page with the demo models is about 5 KiB; one with many models and GPU
# metrics stays well under a MiB. Anything larger is not a metrics page worth reading.
_MAX_RESPONSE_BYTES: Final = 1 << 20
_KEYS: Final = frozenset({"interval_s", "metrics_port", "stale_after_intervals", "timeout_s",
                          "max_response_bytes", "metrics_addresses", "executing_window_s"})


@dataclass(frozen=True)
class LoadReportConfig:
    """Poll each instance's Triton metrics every ``interval_s`` and count the requests it
    holds that this router did not send; ``metrics_port`` on the instance's host, unless
    ``metrics_addresses`` names it (instance HOST:PORT -> metrics HOST:PORT) or the router
    was told (local workers know theirs). An instance with no good poll for
    ``stale_after_intervals`` intervals falls back to local counts."""

    interval_s: float = 0.2
    metrics_port: int = 8002
    stale_after_intervals: int = 5
    timeout_s: float = 1.0  # one poll, connecting included
    max_response_bytes: int = _MAX_RESPONSE_BYTES
    metrics_addresses: tuple[tuple[str, str], ...] = ()
    # Little's law over Triton's compute-time counter, over about this long.
    executing_window_s: float = 1.0


def parse_load_report(data: Any, key: str) -> LoadReportConfig | None:
    """``load_report``: ``true`` (the defaults), ``false``/absent (off), or a mapping of
    the keys above. Errors name the key."""
    if data is None or data is False:
        return None
    if data is True:
        return LoadReportConfig()
    _expect(data, dict, key)
    _no_unknown(data, _KEYS, f"{key}.")
    default = LoadReportConfig()
    interval = _weight(data.get("interval_s", default.interval_s), f"{key}.interval_s")
    if not 0.01 <= interval <= 60.0:
        raise ConfigError(f"{key}.interval_s: must be between 0.01 and 60 seconds "
                          f"(100-250 ms suits routing), got {interval!r}")
    port = _positive_int(data.get("metrics_port", default.metrics_port), f"{key}.metrics_port")
    if port > 65535:
        raise ConfigError(f"{key}.metrics_port: must be a TCP port (1-65535), got {port}")
    stale = _positive_int(data.get("stale_after_intervals", default.stale_after_intervals),
                          f"{key}.stale_after_intervals")
    timeout = _weight(data.get("timeout_s", default.timeout_s), f"{key}.timeout_s")
    size = _positive_int(data.get("max_response_bytes", default.max_response_bytes),
                         f"{key}.max_response_bytes")
    if size < 1024:
        raise ConfigError(f"{key}.max_response_bytes: must be at least 1024, got {size}")
    window = _weight(data.get("executing_window_s", default.executing_window_s),
                     f"{key}.executing_window_s")
    if window < interval:
        raise ConfigError(f"{key}.executing_window_s: must be at least interval_s ({interval}), "
                          f"got {window!r}")
    where = f"{key}.metrics_addresses"
    pairs = tuple(
        (_address(instance, f"{where} key {instance!r}"), _address(metrics, f"{where}.{instance}"))
        for instance, metrics in _expect(data.get("metrics_addresses", {}), dict, where).items())
    return LoadReportConfig(interval, port, stale, timeout, size, pairs, window)
