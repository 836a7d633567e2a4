"""The wire peek the data path uses: native (``_core._wire_c``) unless extensions are off.

Everything is documented in the pure-Python twin, ``tritonmesh._core._wire_py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tritonmesh._core import NO_EXTENSIONS
from tritonmesh._core._wire_py import (
    ENABLE_EMPTY_FINAL,
    RequestInfo,
    ResponseInfo,
    WireError,
    error_stream_response,
    inject_empty_final,
    stream_response_from_unary,
)
from tritonmesh._core._wire_py import peek_request as py_peek_request
from tritonmesh._core._wire_py import peek_stream_response as py_peek_stream_response
from tritonmesh._core._wire_py import peek_work as py_peek_work

__all__ = [
    "ENABLE_EMPTY_FINAL",
    "RequestInfo",
    "ResponseInfo",
    "WireError",
    "error_stream_response",
    "inject_empty_final",
    "peek_request",
    "peek_stream_response",
    "peek_work",
    "py_peek_request",
    "py_peek_stream_response",
    "py_peek_work",
    "stream_response_from_unary",
]

if TYPE_CHECKING or NO_EXTENSIONS:
    peek_request = py_peek_request
    peek_stream_response = py_peek_stream_response
    peek_work = py_peek_work
else:
    from tritonmesh._core._wire_c import peek_request, peek_stream_response, peek_work
