"""A grpc.aio ``ModelStreamInfer`` session's requests for models that are not decoupled,
each sent as a ``ModelInfer`` of its own and answered in-stream
(:mod:`tritonmesh.stream` owns the session; :mod:`tritonmesh.decoupled` says which models).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import grpc
import grpc.aio
from tritonmesh.forwarding import Absorbed, attempt_timeout, judge, per_try_expired
from tritonmesh.stream_upstream import Pending
from tritonmesh.wire import error_stream_response, stream_response_from_unary
from tritonmesh.workers.upstream import await_call

if TYPE_CHECKING:
    from tritonmesh.stream import StreamSession

__all__ = ["UnaryCalls"]

log = logging.getLogger("tritonmesh.proxy")


class UnaryCalls:
    """A session's requests sent as ``ModelInfer``: each in a task, until its answer is
    written, with what it holds and what absorbs its call if the client leaves
    (``upstream_cancellation: absorb``)."""

    def __init__(self, session: StreamSession):
        self.session = session
        self.tasks: dict[asyncio.Task[None], tuple[Pending, Absorbed | None]] = {}

    def send(self, request: bytes, pending: Pending) -> None:
        lease = pending.lease
        lease.sending()
        absorb = Absorbed(lease) if lease.instance.variant.config.absorbs else None
        task = asyncio.get_running_loop().create_task(self._call(request, pending, absorb))
        self.tasks[task] = (pending, absorb)

    async def _call(self, request: bytes, pending: Pending, absorb: Absorbed | None) -> None:
        """Send one stream request as ``ModelInfer`` and answer it on the client's stream;
        with ``absorb``, a call whose client left or whose time is up is left to finish."""
        task = asyncio.current_task()
        assert task is not None
        session = self.session
        context = session.context
        lease = pending.lease
        instance = lease.instance
        ok = False
        timeout, per_try_bound = attempt_timeout(context.time_remaining(),
                                                 instance.variant.config.per_try_timeout_s)
        try:
            try:
                # Absorbing, Triton is sent no deadline (its expiry there is a cancellation
                # too): the router's own wait answers the client.
                call = await_call(instance.upstream.model_infer(
                    request, timeout=timeout if absorb is None else None,
                    metadata=session.metadata), None if absorb is None else absorb.take)
                response = await (call if absorb is None or timeout is None
                                  else asyncio.wait_for(call, timeout))
                ok = True
                lease.responded()
                lease.succeeded()
                out = stream_response_from_unary(response)
            except grpc.aio.AioRpcError as exc:
                lease.code = exc.code().name
                details, _ = judge(lease.outliers, instance, exc, per_try_bound, context)
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED and "decoupled" in details:
                    # Reloaded behind the router's back as decoupled: ask again next time.
                    session.balancer.decoupled.forget()
                # Triton's in-stream error for a non-decoupled request: message and id.
                out = error_stream_response(details, pending.id)
            except TimeoutError:  # the router's own wait; the call was absorbed
                lease.code = "DEADLINE_EXCEEDED"
                if per_try_bound:
                    details = per_try_expired(lease.outliers, instance)
                else:
                    lease.outliers.failure(instance, "DEADLINE_EXCEEDED")
                    details = "Deadline Exceeded"
                out = error_stream_response(details, pending.id)
            finally:
                if absorb is None or not absorb.active:  # an absorbed call releases its own
                    lease.release(ok)  # once, whether here or in close()
            try:
                await session.write(out)
            except Exception as exc:  # the client went; nothing to answer
                log.debug("answer for %s not written: %r", pending.id, exc)
        finally:
            self.tasks.pop(task, None)
            session.answered()

    def cancel(self) -> list[tuple[asyncio.Task[None], tuple[Pending, Absorbed | None]]]:
        """The session is closing: cancel every call (the ones not absorbed release here: a
        task cancelled before it ran has no finally); what :meth:`closed` awaits."""
        calls = list(self.tasks.items())
        self.tasks.clear()
        for task, (pending, absorb) in calls:
            task.cancel()
            if absorb is None:
                pending.lease.release(False)
        return calls

    @staticmethod
    async def closed(calls: list[tuple[asyncio.Task[None],
                                       tuple[Pending, Absorbed | None]]]) -> None:
        """Wait for the calls :meth:`cancel` cancelled; an absorbed call that was not
        absorbed after all (its client left before it was sent) releases here."""
        for task, (pending, absorb) in calls:
            try:
                await task
            except asyncio.CancelledError:
                pass
            if absorb is not None and not absorb.active:
                pending.lease.release(False)
