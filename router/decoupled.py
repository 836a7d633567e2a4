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

__all__ = ["DecoupledModels", "version_key"]

log = logging.getLogger("tritonmesh.decoupled")

_ASK_TIMEOUT_S = 5.0


def version_key(version: str) -> int | None:
    """The version Triton serves for ``version`` (-1: the latest), or None for a string the
    router does not read as Triton does. Triton reads versions as integers, so ``"01"``
    and ``"1"`` are one model version and share one cache entry; anything else (``"abc"``,
    a sign, a number past int64) is never cached: each ask goes to Triton, whose own status
    the client then gets."""
    if not version:
        return -1
    if not version.isascii() or not version.isdigit():
        return None
    digits = version.lstrip("0")
    if len(digits) > 19:  # past int64, and int() of a long string is not free
        return None
    number = int(digits or "0")
    return number if number < 2**63 else None


class DecoupledModels:
    """A cache of ``model_transaction_policy.decoupled`` per (model, version).

    Answers are cached until a model is loaded or unloaded through the router, or
    until a ``ModelInfer`` reveals a stale answer (:meth:`forget`). Concurrent first
    asks for one model share one ``ModelConfig`` call. At most ``max_entries`` answers
    are kept (the oldest go first): model names and versions come from clients.
    """

    def __init__(self, max_entries: int = 1_024) -> None:
        self.max_entries = max_entries
        self._known: dict[tuple[str, int], bool] = {}
        self._asking: dict[tuple[str, str], asyncio.Future[bool | None]] = {}

    def __len__(self) -> int:
        return len(self._known)

    def get(self, model_name: str, version: str = "") -> bool | None:
        key = version_key(version)
        return None if key is None else self._known.get((model_name, key))

    def forget(self) -> None:
        self._known.clear()

    async def ask(self, upstream: Upstream, model_name: str, version: str = "") -> bool | None:
        """The model's policy as ``upstream`` serves it; None if Triton could not say
        (unknown model, invalid version, instance down): the caller then keeps Triton's
        own path."""
        number = version_key(version)
        if number is not None and (model_name, number) in self._known:
            return self._known[(model_name, number)]
        key = (model_name, version)
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
            if number is not None:
                self._remember((model_name, number), answer)
        except grpc.aio.AioRpcError as exc:
            log.debug("ModelConfig for %.200s from %s failed: %.200s", model_name,
                      upstream.address, exc.details())
        finally:
            del self._asking[key]
            future.set_result(answer)
        return answer

    def _remember(self, key: tuple[str, int], answer: bool) -> None:
        known = self._known
        if key not in known and len(known) >= self.max_entries:
            del known[next(iter(known))]
        known[key] = answer
