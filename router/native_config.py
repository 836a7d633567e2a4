"""``data_path``: which engine serves the port, grpc.aio (``grpc``) or libnghttp2 (``native``).

The key wins; without it ``TRITONMESH_DATA_PATH``, else ``grpc``. ``native`` needs the
``tritonmesh._core._h2`` extension, built only where libnghttp2's header was found; without
it the config is refused at start (docs/native.md says how to get it).
"""

from __future__ import annotations

import os
from typing import Any, Final

from tritonmesh.configvalues import ConfigError

__all__ = ["DATA_PATHS", "ENV", "default_data_path", "native_available", "parse_data_path"]

ENV: Final = "TRITONMESH_DATA_PATH"
DATA_PATHS: Final = ("grpc", "native")

_MISSING: Final = (
    "data_path: native needs the tritonmesh._core._h2 extension, which is built only where "
    "libnghttp2's header is found: install libnghttp2-dev (Debian/Ubuntu) or "
    "libnghttp2-devel, or conda's libnghttp2, then reinstall tritonmesh "
    "(or use data_path: grpc)")


def default_data_path() -> str:
    """``TRITONMESH_DATA_PATH``, else ``grpc``; a wrong value is a ConfigError naming it."""
    value = os.environ.get(ENV) or "grpc"
    if value not in DATA_PATHS:
        raise ConfigError(f"{ENV}: must be one of {', '.join(DATA_PATHS)}, got {value!r}")
    return value


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


def parse_data_path(value: Any, *, tls: bool) -> str:
    """The ``data_path`` key (None: the default), checked against what this build and the
    rest of the configuration allow."""
    if value is None:
        path = default_data_path()
        where = ENV
    else:
        if not isinstance(value, str) or value not in DATA_PATHS:
            raise ConfigError(f"data_path: must be one of {', '.join(DATA_PATHS)}, "
                              f"got {value!r}")
        path, where = value, "data_path"
    if path == "native":
        if not native_available():
            raise ConfigError(_MISSING.replace("data_path", where, 1))
        if tls:
            raise ConfigError(f"{where}: native does not serve TLS yet (tls is set); use "
                              "data_path: grpc")
    return path
