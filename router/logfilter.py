"""One log filter: a client that goes away while the router writes to it is not an error.

When a client disconnects while the router writes a stream response to it, grpc.aio
raises ``ExecuteBatchError`` from ``context.write`` (the send can no longer happen). In a
task nobody awaits (a stream session's pump), asyncio then logs it at ERROR as "Task
exception was never retrieved" with a 10-line traceback: a client that comes and goes can
fill the log. Only that exact record is dropped (grpc's ExecuteBatchError, in a task whose
exception nobody read); every other error, grpc's included, is logged as before. Dropped
records are counted in :data:`ClientGoneFilter.dropped`.
"""

from __future__ import annotations

import logging

__all__ = ["ClientGoneFilter", "quiet_client_gone"]

try:
    from grpc._cython.cygrpc import ExecuteBatchError as _ExecuteBatchError
except ImportError:  # pragma: no cover (a grpcio that moved it: nothing to filter)
    _ExecuteBatchError = None

_NEVER_RETRIEVED = "Task exception was never retrieved"


class ClientGoneFilter(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" for grpc's ExecuteBatchError."""

    dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if (_ExecuteBatchError is not None and isinstance(exc, _ExecuteBatchError)
                and isinstance(record.msg, str) and record.msg.startswith(_NEVER_RETRIEVED)):
            ClientGoneFilter.dropped += 1
            return False
        return True


_FILTER = ClientGoneFilter()


def quiet_client_gone() -> None:
    """Install the filter on asyncio's logger (once; both event loops log there)."""
    logger = logging.getLogger("asyncio")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
