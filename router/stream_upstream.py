"""One client stream's upstream ``ModelStreamInfer`` call to one instance, and the
requests on it whose final response has not arrived.

Each pending request holds its :class:`~tritonmesh.lease.Lease`; settling it (its final
response came, or the upstream stream ended) releases the lease once and tells the outlier
detector how the request went. :mod:`tritonmesh.stream` owns the calls and the client side.
"""

from __future__ import annotations

import asyncio
import collections

import grpc.aio
from tritonmesh.instance import Instance
from tritonmesh.lease import Lease
from tritonmesh.wire import RequestInfo

__all__ = ["Pending", "PendingRequests", "UpstreamStream"]


class Pending:
    """A request sent to an instance whose final response has not arrived, with its lease."""

    __slots__ = ("client_wants_empty_final", "failed", "id", "lease", "model_name")

    def __init__(self, info: RequestInfo, lease: Lease):
        self.id = info.id
        self.model_name = info.model_name
        self.client_wants_empty_final = info.empty_final
        self.lease = lease
        self.failed = False  # an in-stream error came for it (final or not)

    def fail(self, error: str) -> None:
        """An in-stream error came for it: the outlier detector hears of it once per
        request, however many error responses a decoupled model sends."""
        if not self.failed:
            self.failed = True
            self.lease.code = "UNKNOWN"  # Triton's in-stream errors carry no status code
            self.lease.stream_error(error)


class PendingRequests:
    """The requests on one upstream ``ModelStreamInfer`` whose final response has not
    arrived, in the order they were sent (either data path's)."""

    __slots__ = ("instance", "pending")

    def __init__(self, instance: Instance):
        self.instance = instance
        self.pending: collections.deque[Pending] = collections.deque()

    def responded(self, request_id: str, error: str) -> None:
        """A non-final response came for ``request_id`` (``error``: its message, if any)."""
        for p in self.pending:
            if p.id == request_id:
                p.lease.responded()
                if error:
                    p.fail(error)
                return

    def settle(self, request_id: str, error: str, response: bool) -> Pending | None:
        """Close the oldest pending request with this id (its final response came;
        ``error``: that response's, "" for none; ``response``: the final carries an answer,
        not only the end of one) and release it."""
        pending = self.pending
        found = None
        for i, p in enumerate(pending):
            if p.id == request_id:
                found = p
                del pending[i]
                break
        if found is None:
            if not pending:
                return None
            found = pending.popleft()
        if response:
            found.lease.responded()
        if error:
            found.fail(error)
        elif not found.failed:
            found.lease.succeeded()
        found.lease.release(not found.failed)
        return found

    def settle_all(self, code_name: str) -> list[Pending]:
        """Release every request still pending as failed (the upstream stream ended, with
        ``code_name``); return them."""
        orphans = list(self.pending)
        self.pending.clear()
        for p in orphans:
            if not p.failed:
                p.lease.code = code_name
            p.lease.release(False)
        return orphans


class UpstreamStream(PendingRequests):
    """One upstream ``ModelStreamInfer`` call of a client stream, to one instance."""

    __slots__ = ("call", "lock", "pump")

    def __init__(self, instance: Instance, call: grpc.aio.StreamStreamCall):
        super().__init__(instance)
        self.call = call
        self.pump: asyncio.Task[None] | None = None
        # gRPC allows one write in progress per call; requests that waited in a task of
        # their own write beside the reading loop.
        self.lock = asyncio.Lock()
