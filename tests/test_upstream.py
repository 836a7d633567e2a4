"""Cancelling upstream calls without leaking grpc.aio's native batches (grpc/grpc#43360).

grpc.aio's own ``call.cancel()`` cancels the asyncio task that awaits the call's batch,
and a batch whose awaiter is cancelled never frees its native operations: about 1 KiB
per client-cancelled request through the router, cancelled that way. ``await_call`` and
``cancel_in_core`` end the call in the gRPC core and leave that task to finish. These
tests check that such a cancel really ends the call, at the server too; the memory it
saves is measured, not asserted: bench/soak.py --mix unary-cancels (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import grpc.aio
import pytest
from tritonmesh.workers.upstream import await_call


async def _slow_server(seen: list[str]) -> tuple[grpc.aio.Server, grpc.aio.Channel]:
    async def slow(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        seen.append("started")
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen.append("cancelled at the server")
            raise
        return b"late"

    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "t.Slow", {"Call": grpc.unary_unary_rpc_method_handler(slow)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, grpc.aio.insecure_channel(f"127.0.0.1:{port}")


def test_a_cancelled_awaiter_ends_the_call_in_the_core_only() -> None:
    """What tells the two cancels apart from Python: grpc.aio's ``call.cancel()`` also
    cancels the call's response task (the task awaiting the batch whose awaiter, once
    cancelled, never frees it), so that task's ``cancelling()`` count goes to 1. Its
    coroutine swallows the CancelledError and returns EOF either way, so ``done()`` and
    ``cancelled()`` alone cannot tell; a cancel in the core leaves the count at 0."""
    async def main() -> None:
        seen: list[str] = []
        server, channel = await _slow_server(seen)
        try:
            call: Any = channel.unary_unary("/t.Slow/Call")(b"x")
            waiter = asyncio.ensure_future(await_call(call))
            for _ in range(250):  # until the call is in flight, its batch awaited
                if seen:
                    break
                await asyncio.sleep(0.02)
            assert seen == ["started"]
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            # The call is over for the server too ...
            for _ in range(250):
                if len(seen) > 1:
                    break
                await asyncio.sleep(0.02)
            assert seen == ["started", "cancelled at the server"]
            assert call.cancelled()
            # ... and grpc.aio's own response task ends by itself once the core has
            # completed the batch (nothing is left awaiting).
            response_task = call._call_response
            await asyncio.wait([response_task], timeout=5)
            assert response_task.done()
            # ... never asked to cancel, so it consumed its batch instead of abandoning it.
            assert response_task.cancelling() == 0
            assert not response_task.cancelled()
        finally:
            await channel.close()
            await server.stop(0)

    asyncio.run(main())


def test_a_finished_call_answers_normally() -> None:
    async def main() -> None:
        server = grpc.aio.server()

        async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return request

        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "t.Echo", {"Call": grpc.unary_unary_rpc_method_handler(echo)})])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert await await_call(channel.unary_unary("/t.Echo/Call")(b"ping")) == b"ping"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await await_call(channel.unary_unary("/t.Echo/Nope")(b"x"))
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        await server.stop(0)

    asyncio.run(main())
