"""``data_path``: which engine serves the port, grpc.aio (``grpc``) or libnghttp2 (``native``).

The key wins; without it ``TRITONMESH_DATA_PATH``; without either, ``native`` where the native
port serves the configuration, else ``grpc`` (:func:`choose_data_path`, the one place that
decides). ``native`` needs the ``tritonmesh._core._h2`` extension, built only where
libnghttp2's header was found; asked for where it cannot serve, the config is refused at
start (docs/native.md says how to get it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from tritonmesh.configvalues import (
    ConfigError,
    _expect,
    _no_unknown,
    _non_negative,
    _positive_int,
)

if TYPE_CHECKING:
    from tritonmesh.config import EndpointConfig

__all__ = ["DATA_PATHS", "ENV", "DataPath", "NativeConfig", "choose_data_path",
           "native_available", "parse_data_path", "parse_native"]

ENV: Final = "TRITONMESH_DATA_PATH"
DATA_PATHS: Final = ("grpc", "native")

_MISSING: Final = (
    "{key}: native needs the tritonmesh._core._h2 extension, which is built only where "
    "libnghttp2's header is found: install libnghttp2-dev (Debian/Ubuntu) or "
    "libnghttp2-devel, or conda's libnghttp2, then reinstall tritonmesh "
    "(or use data_path: grpc)")


@dataclass(frozen=True)
class NativeConfig:
    """The native data path's HTTP/2 bounds (docs/config.md, ``native.*``): what one stream
    and one connection may have in flight, in each direction, before their reader gives the
    window back; flow control is end to end, so it is also what the router holds for them."""

    stream_window_bytes: int = 1 << 20
    connection_window_bytes: int = 1 << 24
    max_header_list_bytes: int = 1 << 16
    # A client's first ModelInfer message must reach its length prefix, and once reserved
    # its last byte, within this many seconds (0: no bound, as grpc.aio).
    first_message_timeout_s: float = 30.0
    # The client-sent RST_STREAMs a connection may make (a token bucket; nghttp2 1.57's
    # defaults); past them, GOAWAY ENHANCE_YOUR_CALM.
    # What the upstream streams of one client connection may send the router before their
    # client reads (their windows, all together); past it, a stream's window is HTTP/2's base
    # 64 KiB instead of stream_window_bytes.
    connection_buffer_bytes: int = 1 << 24
    stream_reset_burst: int = 1000
    stream_reset_rate: int = 33
    # A PING on each upstream connection with calls open, this often (0: never), and how
    # long its ACK may take before the connection is taken for dead (grpc.aio's upstream
    # channels: workers/upstream.py).
    upstream_keepalive_time_s: float = 300.0
    upstream_keepalive_timeout_s: float = 20.0


def parse_native(data: Any) -> NativeConfig:
    """The ``native`` section (None: every default)."""
    if data is None:
        return NativeConfig()
    _expect(data, dict, "native")
    names = {f.name for f in fields(NativeConfig)}
    _no_unknown(data, names, "native.")
    values: dict[str, Any] = {}
    for name in names:
        default = getattr(NativeConfig, name)
        if name.endswith("_s"):
            values[name] = _non_negative(data.get(name, default), f"native.{name}")
            continue
        value = _positive_int(data.get(name, default), f"native.{name}")
        if name.endswith("window_bytes") and value > 2**31 - 1:
            raise ConfigError(f"native.{name}: HTTP/2's largest window is 2147483647, "
                              f"got {value}")
        values[name] = value
    return NativeConfig(**values)


def native_available() -> bool:
    """Whether the native data path's extension was built and loads (never with
    ``TRITONMESH_NO_EXTENSIONS=1``, which means no compiled code at all)."""
    from tritonmesh._core import NO_EXTENSIONS

    if NO_EXTENSIONS:
        return False
    try:
        import tritonmesh._core._h2  # noqa: F401
    except ImportError:
        return False
    return True


def parse_data_path(value: Any) -> str | None:
    """The ``data_path`` key as written (None: not set); :func:`choose_data_path` decides."""
    if value is not None and (not isinstance(value, str) or value not in DATA_PATHS):
        raise ConfigError(f"data_path: must be one of {', '.join(DATA_PATHS)}, got {value!r}")
    return value


class DataPath(NamedTuple):
    """What serves the port, and why (for the start log)."""

    path: str
    why: str


def _not_served(config: EndpointConfig) -> tuple[str, str] | None:
    """The reason the native port cannot serve ``config``, as (the start log's words, the
    refusal of an explicit ``native``, where ``{key}`` is what asked for it); None: it can.
    TLS on either side and several router processes it serves as grpc.aio does; what is
    left is a build without the extension."""
    if not native_available():
        return "the tritonmesh._core._h2 extension is not built", _MISSING
    return None


def choose_data_path(config: EndpointConfig) -> DataPath:
    """The data path ``config`` runs on: its ``data_path`` key, else ``TRITONMESH_DATA_PATH``,
    else ``native`` where the native port serves this configuration and ``grpc`` where it
    does not. An explicit ``native`` it cannot serve, or a wrong value, is a ConfigError
    naming the key (or the variable). Read at start: a reload does not change it."""
    key, value = "data_path", config.data_path
    if value is None:
        key, value = ENV, os.environ.get(ENV) or None
        if value is not None and value not in DATA_PATHS:
            raise ConfigError(f"{ENV}: must be one of {', '.join(DATA_PATHS)}, got {value!r}")
    reason = _not_served(config) if value != "grpc" else None
    if value is None:
        return DataPath("grpc", f"the default; native cannot serve here: {reason[0]}") \
            if reason is not None else DataPath("native", "the default")
    if reason is not None:
        raise ConfigError(reason[1].format(key=key))
    return DataPath(value, f"{key}: {value}")
