"""Generated servicers (admin, health, reflection) with the router's own request decoding.

gRPC decodes a generated servicer's requests before the servicer runs; malformed bytes
then end the call with UNKNOWN and an ERROR traceback in the log, one per request, so a
client can fill the log at will. Registered through :class:`StrictRegistrar`, the same
handlers take raw bytes: malformed ones are INVALID_ARGUMENT with a message, and at most
one log line a minute says that it happens.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import grpc
import grpc.aio

__all__ = ["LogLimit", "StrictRegistrar", "log_bad_input"]

log = logging.getLogger("tritonmesh.badinput")

class LogLimit:
    """At most one log line per ``every_s``: :meth:`due` says whether this one may go,
    and :attr:`suppressed` how many did not since the last that went."""

    def __init__(self, every_s: float = 60.0):
        self.every_s = every_s
        self._last = -every_s
        self.suppressed = 0

    def due(self) -> bool:
        now = time.monotonic()
        if now - self._last < self.every_s:
            self.suppressed += 1
            return False
        self._last = now
        return True

    def more(self) -> str:
        """A suffix for the line that goes: how many were left out before it."""
        n, self.suppressed = self.suppressed, 0
        return f" ({n} more since the last such line)" if n else ""


_BAD_INPUT = LogLimit()


def log_bad_input(method: str, error: str) -> None:
    """One WARNING line a minute at most, however many bad requests arrive."""
    if _BAD_INPUT.due():
        log.warning("malformed request to %s answered INVALID_ARGUMENT: %.200s%s",
                    method, error, _BAD_INPUT.more())


class StrictRegistrar:
    """Stands in for a grpc.aio server while generated ``add_*Servicer_to_server``
    functions register a servicer; registers the same methods, decoding requests itself."""

    def __init__(self, server: grpc.aio.Server):
        self.server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """Ignored: generated code also calls :meth:`add_registered_method_handlers`."""

    def add_registered_method_handlers(self, service: str,
                                       handlers: Mapping[str, grpc.RpcMethodHandler]) -> None:
        strict = {name: _strict(f"/{service}/{name}", h) for name, h in handlers.items()}
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, strict),))


def _strict(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    decode: Callable[[bytes], Any] | None = handler.request_deserializer
    if decode is None:
        return handler
    serialize = handler.response_serializer

    async def read(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            return decode(raw)
        except Exception as exc:  # protobuf's DecodeError
            log_bad_input(method, str(exc))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {exc}")

    async def answer(result: Any, context: grpc.aio.ServicerContext) -> None:
        if inspect.isasyncgen(result):  # a generator servicer, else one that writes itself
            async for response in result:
                await context.write(response)
        else:
            await result

    if handler.unary_unary is not None:
        unary = handler.unary_unary

        async def unary_unary(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            return await unary(await read(raw, context), context)
        return grpc.unary_unary_rpc_method_handler(unary_unary, response_serializer=serialize)
    if handler.unary_stream is not None:
        unary_out = handler.unary_stream

        async def unary_stream(raw: bytes, context: grpc.aio.ServicerContext) -> None:
            await answer(unary_out(await read(raw, context), context), context)
        return grpc.unary_stream_rpc_method_handler(unary_stream,
                                                    response_serializer=serialize)
    if handler.stream_stream is not None:
        streaming = handler.stream_stream

        async def stream_stream(requests: AsyncIterator[bytes],
                                context: grpc.aio.ServicerContext) -> None:
            async def decoded() -> AsyncIterator[Any]:
                async for raw in requests:
                    yield await read(raw, context)
            await answer(streaming(decoded(), context), context)
        return grpc.stream_stream_rpc_method_handler(stream_stream,
                                                     response_serializer=serialize)
    return handler  # stream-unary: none of the router's services has one
