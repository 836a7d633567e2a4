"""Which models are decoupled, asked of Triton once per model and remembered.

Why the router needs to know: Triton 2.51 crashes (SIGSEGV in the gRPC stream's
response allocator, or SIGABRT on ``!byte_buffer->Valid()``) when requests to a
non-decoupled model travel on ``ModelStreamInfer`` while a decoupled model streams
on the same server; within seconds under load. ``bench/triton_stream_race.py``
reproduces it against Triton alone. The router therefore sends a stream's requests
for non-decoupled models upstream as ``ModelInfer`` and wraps the answer as the
stream response Triton would have sent (see :mod:`tritonmesh.proxy`). That needs
each model's transaction policy, which only ``ModelConfig`` tells.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
import grpc.aio
from tritonclient.grpc import service_pb2 as pb
from tritonmesh.workers.upstream import Upstream, await_call

__all__ = ["DecoupledModels"]

log = logging.getLogger("tritonmesh.decoupled")

_ASK_TIMEOUT_S = 5.0


class DecoupledModels:
    """A cache of ``model_transaction_policy.decoupled`` per (model, version).

    Answers are cached until a model is loaded or unloaded through the router, or
    until a ``ModelInfer`` reveals a stale answer (:meth:`forget`). Concurrent first
    asks for one model share one ``ModelConfig`` call.
    """

    def __init__(self) -> None:
        self._known: dict[tuple[str, str], bool] = {}
        self._asking: dict[tuple[str, str], asyncio.Future[bool | None]] = {}

    def get(self, model_name: str, version: str = "") -> bool | None:
        return self._known.get((model_name, version))

    def forget(self) -> None:
        self._known.clear()

    async def ask(self, upstream: Upstream, model_name: str, version: str = "") -> bool | None:
        """The model's policy as ``upstream`` serves it; None if Triton could not say
        (unknown model, instance down): the caller then keeps Triton's own path."""
        key = (model_name, version)
        if key in self._known:
            return self._known[key]
        pending = self._asking.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[bool | None] = asyncio.get_running_loop().create_future()
        self._asking[key] = future
        answer: bool | None = None
        try:
            request = pb.ModelConfigRequest(name=model_name, version=version)
            raw = await await_call(upstream.unary["ModelConfig"](
                request.SerializeToString(), timeout=_ASK_TIMEOUT_S))
            response = pb.ModelConfigResponse.FromString(raw)
            answer = response.config.model_transaction_policy.decoupled
            self._known[key] = answer
        except grpc.aio.AioRpcError as exc:
            log.debug("ModelConfig for %s from %s failed: %s", model_name, upstream.address,
                      exc.details())
        finally:
            del self._asking[key]
            future.set_result(answer)
        return answer
