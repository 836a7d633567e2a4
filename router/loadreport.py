"""Triton's own view of load, blended into a variant's picks: replicas that see the fleet.

Several router replicas in front of one fleet each count only the requests they sent, so
each picks on part of the truth. A variant with ``load_report`` polls every instance's
Triton metrics page (Prometheus text) every ``interval_s``:

* queued: ``nv_inference_pending_request_count``, a gauge per model;
* executing: Triton 2.51 has no gauge for it, but ``nv_inference_compute_infer_duration_us``
  counts the microseconds requests spent executing, so its increase over a window, divided
  by the window, is the mean number executing (Little's law). Triton adds a request's time
  when it ends, in one lump: over one 100 ms interval a 400 ms request that just ended reads
  as four executing, so the window is ``executing_window_s`` (the last second's polls by
  default), long against typical requests; still, a long generation shows up late.

Summed over the variant's models, minus what this router has outstanding there (exact,
local), floored at 0, that is the load other replicas put there: the instance's *external*
load, handed to the variant's table (``set_external``), where LEAST_OUTSTANDING_REQUESTS
and POWER_OF_TWO_CHOICES compare outstanding + external and LEAST_OUTSTANDING_WORK adds it
as work. An instance with no good poll for ``stale_after_intervals`` intervals falls back
to local counts (external 0), with one log line and the stale gauge set, until a poll
succeeds again. One keep-alive HTTP/1.1 connection per instance, responses bounded.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

from tritonmesh._core import MAX_EXTERNAL
from tritonmesh.chore import Chore

if TYPE_CHECKING:
    from tritonmesh.balancer import Instance, Variant
    from tritonmesh.loadconfig import LoadReportConfig

__all__ = ["InstanceLoad", "LoadReporter", "MetricsClient", "MetricsError", "TritonLoad",
           "parse_metrics"]

log = logging.getLogger("tritonmesh.loadreport")

_PENDING: Final = b"nv_inference_pending_request_count{"
_COMPUTE: Final = b"nv_inference_compute_infer_duration_us{"
_HEADERS_LIMIT: Final = 16 * 1024


class MetricsError(Exception):
    """A metrics page that could not be read or holds no load figures."""


class TritonLoad:
    """What one metrics page says, summed over the models asked for."""

    __slots__ = ("compute_us", "pending")

    def __init__(self, pending: float, compute_us: float):
        self.pending = pending
        self.compute_us = compute_us


def parse_metrics(body: bytes, models: frozenset[str] | None) -> TritonLoad:
    """Sum the pending gauge and the compute-time counter over ``models`` (None: all).

    Raises:
        MetricsError: the page has no pending-request gauge (Triton's metrics are off or
            this is not Triton), or a value is not a number.
    """
    pending = compute = 0.0
    seen = False
    for line in body.split(b"\n"):
        if line.startswith(_PENDING):
            prefix, is_pending = _PENDING, True
        elif line.startswith(_COMPUTE):
            prefix, is_pending = _COMPUTE, False
        else:
            continue
        end = line.rfind(b"}")
        if models is not None and _model(line[len(prefix):end]) not in models:
            seen = seen or is_pending
            continue
        fields = line[end + 1:].split()
        try:
            value = float(fields[0])
        except (IndexError, ValueError):
            raise MetricsError(f"not a number in {line[:200]!r}") from None
        if is_pending:
            pending += value
            seen = True
        else:
            compute += value
    if not seen:
        raise MetricsError("no nv_inference_pending_request_count on the page (are "
                           "Triton's metrics on?)")
    return TritonLoad(pending, compute)


def _model(labels: bytes) -> str:
    start = labels.find(b'model="')
    if start < 0:
        return ""
    start += 7
    return labels[start:labels.find(b'"', start)].decode("utf-8", "replace")


class MetricsClient:
    """``GET /metrics`` over one kept-alive HTTP/1.1 connection, the body at most
    ``max_bytes``. Any failure closes the connection; the next get opens a new one."""

    def __init__(self, address: str, max_bytes: int):
        self.address = address
        host, _, port = address.rpartition(":")
        self._host = host.strip("[]")
        self._port = int(port)
        self._max = max_bytes
        self._request = (f"GET /metrics HTTP/1.1\r\nHost: {address}\r\n"
                         "Accept: text/plain\r\n\r\n").encode()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def get(self) -> bytes:
        try:
            return await self._get()
        except BaseException:  # a half-read response would garble the next one
            self.close()
            raise

    async def _get(self) -> bytes:
        if self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection(
                self._host, self._port, limit=_HEADERS_LIMIT)
        reader, writer = self._reader, self._writer
        assert reader is not None
        writer.write(self._request)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status, *lines = head.decode("latin-1").split("\r\n")
        parts = status.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or parts[1] != "200":
            raise MetricsError(f"answered {status[:100]!r}")
        headers = {}
        for line in lines:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip().lower()
        if "content-length" in headers:
            size = int(headers["content-length"])
            if not 0 <= size <= self._max:
                raise MetricsError(f"a {size}-byte page is over max_response_bytes ({self._max})")
            body = await reader.readexactly(size)
        elif headers.get("transfer-encoding") == "chunked":
            body = await self._chunked(reader)
        else:  # the body runs to the end of the connection
            body = await reader.read(self._max + 1)
            while body and len(body) <= self._max and not reader.at_eof():
                more = await reader.read(self._max + 1 - len(body))
                if not more:
                    break
                body += more
            if len(body) > self._max:
                raise MetricsError(f"the page is over max_response_bytes ({self._max})")
            self.close()
            return body
        if headers.get("connection") == "close":
            self.close()
        return body

    async def _chunked(self, reader: asyncio.StreamReader) -> bytes:
        body = bytearray()
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            if not 0 < size <= self._max - len(body):
                raise MetricsError(f"the page is over max_response_bytes ({self._max})")
            body += await reader.readexactly(size + 2)
            del body[len(body) - 2:]
        while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, up to the blank line
            pass
        return bytes(body)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


class InstanceLoad:
    """One instance's load report: the last external load set, and its freshness."""

    __slots__ = ("client", "compute", "external", "failures", "instance", "last_error",
                 "last_good", "polls", "stale")

    def __init__(self, instance: Instance, client: MetricsClient, now: float):
        self.instance = instance
        self.client = client
        self.external = 0.0
        self.stale = False
        self.last_good = now  # a never-reachable page turns stale after the same window
        # (poll time, compute-time counter) of the good polls within the executing window.
        self.compute: deque[tuple[float, float]] = deque()
        self.polls = 0
        self.failures = 0
        self.last_error = ""


class LoadReporter(Chore):
    """Polls one variant's instances and keeps their external load in its table.

    ``metrics_addresses`` maps an instance's gRPC address to its metrics HOST:PORT where
    the router knows it (local workers); other instances are polled at their host's
    ``metrics_port``.
    """

    def __init__(self, variant: Variant, spec: LoadReportConfig,
                 metrics_addresses: Mapping[str, str] | None = None):
        self.variant = variant
        self.spec = spec
        # The config's names win over what the router was told.
        self._addresses = {**(metrics_addresses or {}), **dict(spec.metrics_addresses)}
        self.loads: dict[Instance, InstanceLoad] = {}

    def metrics_address(self, instance: Instance) -> str:
        known = self._addresses.get(instance.address)
        if known is not None:
            return known
        host = instance.address.rpartition(":")[0]
        return f"{host}:{self.spec.metrics_port}"

    async def poll_once(self) -> None:
        """Poll every live instance once (together) and update the table."""
        now = asyncio.get_running_loop().time()
        live = list(self.variant.live_instances())
        for gone in self.loads.keys() - set(live):
            self.loads.pop(gone).client.close()
        for instance in live:
            if instance not in self.loads:
                client = MetricsClient(self.metrics_address(instance), self.spec.max_response_bytes)
                self.loads[instance] = InstanceLoad(instance, client, now)
        await asyncio.gather(*(self._poll(self.loads[i]) for i in live))

    async def _poll(self, load: InstanceLoad) -> None:
        loop = asyncio.get_running_loop()
        load.polls += 1
        try:
            body = await asyncio.wait_for(load.client.get(), self.spec.timeout_s)
            triton = parse_metrics(body, self.variant.models)
        except (OSError, TimeoutError, ValueError, MetricsError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError) as exc:
            load.failures += 1
            load.last_error = f"{exc.__class__.__name__}: {exc}"
            window = self.spec.stale_after_intervals * self.spec.interval_s
            if not load.stale and loop.time() - load.last_good >= window:
                self._go_stale(load, window)
            return
        now = loop.time()
        executing = 0.0
        compute = load.compute
        if compute and triton.compute_us < compute[-1][1]:
            compute.clear()  # the counter went back: Triton restarted
        while len(compute) > 1 and now - compute[1][0] >= self.spec.executing_window_s:
            compute.popleft()
        if compute and now > compute[0][0]:
            since, counted = compute[0]
            executing = (triton.compute_us - counted) / ((now - since) * 1e6)
        compute.append((now, triton.compute_us))
        if load.stale:
            log.info("load report of %s (%s): reporting again", load.instance.address,
                     load.client.address)
        load.stale = False
        load.last_good = now
        instance = load.instance
        if not self.variant.owns_slot(instance):
            return
        local = self.variant.table.outstanding(instance.slot)
        load.external = min(max(0.0, triton.pending + executing - local), float(MAX_EXTERNAL))
        self.variant.table.set_external(instance.slot, load.external)

    def _go_stale(self, load: InstanceLoad, window: float) -> None:
        instance = load.instance
        if self.variant.owns_slot(instance):
            self.variant.table.set_external(instance.slot, 0.0)
        load.external = 0.0
        log.warning("load report of %s (%s): no good poll for %.1f s (%s); routing on local "
                    "counts there", instance.address, load.client.address, window,
                    load.last_error)
        load.stale = True  # last: the scrape thread reads it

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await self.poll_once()
            except Exception:  # a bug in one round must not end the reports
                log.exception("load report round for variant '%s' failed", self.variant.name)
            await asyncio.sleep(max(0.0, self.spec.interval_s - (loop.time() - started)))

    async def stop(self) -> None:
        await super().stop()
        for load in self.loads.values():
            load.client.close()
