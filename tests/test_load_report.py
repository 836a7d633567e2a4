"""Load reports (tritonmesh.loadreport): replicas that see the load other replicas put on the
fleet, through Triton's own metrics, against real Triton workers on loopback."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from harness import LongStream, LoopThread, RouterHandle, generate_inputs, make_config
from tritonmesh.balancer import Instance
from tritonmesh.config import ConfigError, EndpointConfig, parse_config
from tritonmesh.loadconfig import LoadReportConfig
from tritonmesh.loadreport import LoadReporter, MetricsClient, MetricsError, parse_metrics
from tritonmesh.server import Router

# Background load straight at Triton 1: requests of the one-at-a-time demo generation
# (5 ms per token), so one executes and the rest wait in Triton's queue.
BACKGROUND = 8
BACKGROUND_TOKENS = 250
PROBES = 100  # requests sent one at a time through the replica under test


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _generate(address: str, max_tokens: int) -> None:
    with grpcclient.InferenceServerClient(address) as client:
        client.infer("generate_unary", generate_inputs(max_tokens), client_timeout=120)


def _probe(address: str, instances: list[Instance], n: int = PROBES) -> dict[str, int]:
    """Send ``n`` identity requests one at a time; how many each instance answered."""
    before = {i.address: i.requests for i in instances}
    values = np.arange(4, dtype=np.float32)
    with grpcclient.InferenceServerClient(address) as client:
        for _ in range(n):
            x = grpcclient.InferInput("INPUT0", [4], "FP32")
            x.set_data_from_numpy(values)
            result = client.infer("identity", [x])
            assert np.array_equal(result.as_numpy("OUTPUT0"), values)
    return {i.address: i.requests - before[i.address] for i in instances}


class _Replicas:
    """Routers over the same Tritons, each given where its Tritons' metrics are."""

    def __init__(self, loop: LoopThread, worker_pool: Any):
        self.loop = loop
        self.workers = worker_pool.workers[:2]
        self.addresses = [w.address for w in self.workers]
        self.metrics = {w.address: f"{w.host}:{w.metrics_port}" for w in self.workers}
        self.handles: list[RouterHandle] = []

    def start(self, load_report: LoadReportConfig | None,
              metrics: dict[str, str] | None = None, metrics_listen: str | None = None
              ) -> RouterHandle:
        config, instances = make_config(self.addresses)
        variant = dataclasses.replace(config.variants[0], load_report=load_report)
        config = dataclasses.replace(config, variants=(variant,), metrics_listen=metrics_listen)
        router = Router(config, instances, seed=len(self.handles) + 7,
                        metrics_addresses=self.metrics if metrics is None else metrics)
        self.loop.run(router.start())
        handle = RouterHandle(self.loop, router)
        self.handles.append(handle)
        return handle

    def close(self) -> None:
        for handle in self.handles:
            try:
                handle.wait_idle()
            finally:
                handle.stop()


@pytest.fixture
def replicas(loop_thread: LoopThread, worker_pool: Any) -> Iterator[_Replicas]:
    r = _Replicas(loop_thread, worker_pool)
    yield r
    r.close()


@pytest.fixture
def loaded_triton1(replicas: _Replicas) -> Iterator[str]:
    """Triton 1 busy with requests no replica sent (another replica's, in effect)."""
    target = replicas.addresses[0]
    with concurrent.futures.ThreadPoolExecutor(BACKGROUND) as pool:
        futures = [pool.submit(_generate, target, BACKGROUND_TOKENS) for _ in range(BACKGROUND)]
        yield target
        for f in futures:
            f.result(timeout=120)


def _reporter(handle: RouterHandle) -> LoadReporter:
    (reporter,) = handle.router.load_reporters
    return reporter


def _instance(handle: RouterHandle, address: str) -> Instance:
    return next(i for i in handle.instances() if i.address == address)


FAST = LoadReportConfig(interval_s=0.1, stale_after_intervals=3)


@pytest.mark.triton
def test_replica_with_load_reports_avoids_the_triton_another_replica_loaded(
        replicas: _Replicas, loaded_triton1: str) -> None:
    blended = replicas.start(FAST)
    local_only = replicas.start(None)
    t1, t2 = replicas.addresses
    table = blended.balancer.variants[0].table
    busy = _instance(blended, t1)
    _wait_for(lambda: table.external(busy.slot) >= 3, "Triton 1's queue in the load report")  # type: ignore[attr-defined]
    assert table.external(_instance(blended, t2).slot) == 0  # type: ignore[attr-defined]
    assert busy.outstanding == 0  # external load is never counted as this router's own

    split = _probe(blended.address, blended.instances())
    # Even odds would put 90 or more of 100 on one Triton with probability below 1e-16.
    assert split[t2] >= 90, split
    even = _probe(local_only.address, local_only.instances())
    # The same load, unseen: an even split (outside 30-70 with probability below 1e-4).
    assert 30 <= even[t1] <= 70, even
    assert local_only.balancer.variants[0].table.external(  # type: ignore[attr-defined]
        _instance(local_only, t1).slot) == 0


class _Forwarder:
    """A TCP relay to a Triton metrics port that the test can cut: the port unreachable."""

    def __init__(self, loop: LoopThread, target: str):
        self.loop = loop
        host, _, port = target.rpartition(":")
        self.writers: list[asyncio.StreamWriter] = []

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except OSError:
                pass
            finally:
                writer.close()

        async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                up_reader, up_writer = await asyncio.open_connection(host, int(port))
            except OSError:
                writer.close()
                return
            self.writers += [writer, up_writer]
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

        async def start() -> asyncio.Server:
            return await asyncio.start_server(relay, "127.0.0.1", 0)

        self.server = loop.run(start())
        self.address = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def cut(self) -> None:
        async def cut() -> None:
            self.server.close()
            for writer in self.writers:
                writer.close()
            await self.server.wait_closed()

        self.loop.run(cut())


@pytest.mark.triton
def test_unreachable_metrics_fall_back_to_local_counts(
        replicas: _Replicas, loaded_triton1: str, loop_thread: LoopThread,
        caplog: pytest.LogCaptureFixture) -> None:
    t1, t2 = replicas.addresses
    relay = _Forwarder(loop_thread, replicas.metrics[t1])
    handle = replicas.start(FAST, metrics={t1: relay.address, t2: replicas.metrics[t2]},
                            metrics_listen="127.0.0.1:0")
    table = handle.balancer.variants[0].table
    busy = _instance(handle, t1)
    _wait_for(lambda: table.external(busy.slot) >= 3, "Triton 1's queue in the load report")  # type: ignore[attr-defined]

    caplog.set_level(logging.WARNING, logger="tritonmesh.loadreport")
    relay.cut()
    load = _reporter(handle).loads[busy]
    _wait_for(lambda: load.stale, "the report of Triton 1 to turn stale")
    assert table.external(busy.slot) == 0  # type: ignore[attr-defined]
    assert not _reporter(handle).loads[_instance(handle, t2)].stale
    assert "routing on local counts there" in caplog.text and relay.address in caplog.text

    port = handle.router.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
        text = page.read().decode()
    assert (f'tritonmesh_instance_load_report_stale{{instance="{t1}",variant="AllTraffic"}} 1.0'
            in text), text
    assert (f'tritonmesh_instance_load_report_stale{{instance="{t2}",variant="AllTraffic"}} 0.0'
            in text)
    assert (f'tritonmesh_instance_external_requests{{instance="{t1}",variant="AllTraffic"}} 0.0'
            in text)

    status = subprocess.run([str(Path(sys.executable).parent / "tritonmesh"), "status",
                             "--address", handle.admin_address],
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    rows = {line.split()[1]: line.split() for line in status.stdout.splitlines()
            if line.strip()[:1].isdigit()}
    assert rows[t1][-2:] == ["0.0", "stale"] and rows[t2][-1] == "ok", status.stdout
    assert "external report" in " ".join(status.stdout.split()), status.stdout

    even = _probe(handle.address, handle.instances())
    assert 30 <= even[t1] <= 70, even  # Triton 1 is still loaded; this router cannot see it


@pytest.mark.triton
def test_late_binding_takes_the_instance_with_room_whatever_its_external_load(
        make_router: Any, loop_thread: LoopThread) -> None:
    """max_concurrency_per_instance reads local counts: the least loaded instance being
    full must not make a request wait while another, busier elsewhere, has room here."""
    router = make_router(workers=2, max_concurrency=1)
    table = router.balancer.variants[0].table
    first, second = router.instances()

    async def report(instance: Instance, load: float) -> None:
        table.set_external(instance.slot, load)

    loop_thread.run(report(second, 5))  # as a load report would: another replica's requests
    busy = LongStream(router.address, max_tokens=1000)  # 5 s on the least loaded: first
    try:
        assert (first.outstanding, second.outstanding) == (1, 0)
        with grpcclient.InferenceServerClient(router.address) as client:
            result = client.infer("generate_unary", generate_inputs(3), client_timeout=3)
        assert [int(v) for v in result.as_numpy("TOKENS")] == [0, 1, 2]
        assert (first.requests, second.requests) == (0, 1)
        assert not router.balancer.variants[0].waiters
    finally:
        busy.stop()


@pytest.mark.triton
def test_work_ahead_counts_other_replicas_work(make_router: Any, loop_thread: LoopThread) -> None:
    """LEAST_OUTSTANDING_WORK learns seconds per unit from the work a request found ahead of
    it; other replicas' requests in Triton's queue are ahead of it too, or the instance they
    load would read as slow, and be avoided twice (its external work and its estimate)."""
    from tritonmesh.config import WorkHint

    hints = {m: WorkHint(input="MAX_TOKENS") for m in ("generate", "generate_unary")}
    router = make_router(strategy="LEAST_OUTSTANDING_WORK", workers=2, work_hints=hints)
    work = router.balancer.variants[0].work
    assert work is not None
    loaded, _ = router.instances()

    async def report() -> None:
        work.set_external(loaded.slot, 3)

    loop_thread.run(report())
    assert loaded.work_ahead() == 3.0  # three requests of the mean cost (1 while it had none)
    assert loaded.outstanding == 0


# -- the metrics page and its client, without Triton ----------------------------------------

PAGE = b"""# HELP nv_inference_pending_request_count Instantaneous number of pending requests.
# TYPE nv_inference_pending_request_count gauge
nv_inference_pending_request_count{model="identity",version="1"} 2
nv_inference_pending_request_count{model="generate",version="1"} 5
nv_inference_compute_infer_duration_us{model="identity",version="1"} 1500
nv_inference_compute_infer_duration_us{model="generate",version="1"} 250000
nv_inference_queue_duration_us{model="generate",version="1"} 99
"""


def test_parse_metrics_sums_the_variant_models() -> None:
    every = parse_metrics(PAGE, None)
    assert (every.pending, every.compute_us) == (7.0, 251500.0)
    one = parse_metrics(PAGE, frozenset({"generate"}))
    assert (one.pending, one.compute_us) == (5.0, 250000.0)
    assert parse_metrics(PAGE, frozenset({"absent"})).pending == 0.0  # served, but idle
    with pytest.raises(MetricsError, match="pending_request_count"):
        parse_metrics(b"# nothing here\nup 1\n", None)
    with pytest.raises(MetricsError, match="not a number"):
        parse_metrics(b'nv_inference_pending_request_count{model="m"} lots\n', None)


def _serve(loop: LoopThread, answers: list[bytes]) -> tuple[Any, list[int]]:
    """A one-page HTTP server: each connection gets the next answer, then stays open."""
    connections: list[int] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        page = answers[min(len(connections), len(answers)) - 1]
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(page)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()  # the client went

    async def start() -> Any:
        return await asyncio.start_server(answer, "127.0.0.1", 0)

    return loop.run(start()), connections


def _close(loop: LoopThread, server: Any) -> None:
    async def close() -> None:
        server.close()

    loop.run(close())


def test_metrics_client_keeps_one_connection_and_bounds_the_page(loop_thread: LoopThread
                                                                  ) -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(PAGE), PAGE)
    server, connections = _serve(loop_thread, [ok])
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    client = MetricsClient(address, 4096)
    try:
        for _ in range(3):
            assert loop_thread.run(client.get()) == PAGE
        assert len(connections) == 1  # kept alive
        small = MetricsClient(address, 100)
        with pytest.raises(MetricsError, match="over max_response_bytes"):
            loop_thread.run(small.get())
    finally:
        client.close()
        _close(loop_thread, server)


def test_metrics_client_reads_chunked_pages_and_refuses_errors(loop_thread: LoopThread) -> None:
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (10, PAGE[:10], len(PAGE) - 10, PAGE[10:]))
    server, _ = _serve(loop_thread, [
        chunked, chunked, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"])
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    client = MetricsClient(address, 4096)
    try:
        assert loop_thread.run(client.get()) == PAGE
        assert loop_thread.run(client.get()) == PAGE  # the same connection, in step
        with pytest.raises(MetricsError, match="over max_response_bytes"):
            loop_thread.run(MetricsClient(address, 100).get())
        with pytest.raises(MetricsError, match="404"):
            loop_thread.run(MetricsClient(address, 4096).get())
    finally:
        client.close()
        _close(loop_thread, server)


@pytest.mark.parametrize(("value", "message"), [
    ({"interval_s": 0}, "load_report.interval_s: must be a positive number"),
    ({"interval_s": 120}, "load_report.interval_s: must be between 0.01 and 60"),
    ({"metrics_port": 0}, "load_report.metrics_port: must be at least 1"),
    ({"metrics_port": 70000}, "load_report.metrics_port: must be a TCP port"),
    ({"stale_after_intervals": 0}, "load_report.stale_after_intervals: must be at least 1"),
    ({"max_response_bytes": 10}, "load_report.max_response_bytes: must be at least 1024"),
    ({"timeout_s": -1}, "load_report.timeout_s: must be a positive number"),
    ({"interval": 0.1}, "load_report.interval: unknown key"),
    ("yes", "load_report: expected a mapping"),
    ({"executing_window_s": 0.1, "interval_s": 0.2},
     "load_report.executing_window_s: must be at least interval_s"),
    ({"metrics_addresses": ["a"]}, "load_report.metrics_addresses: expected a mapping"),
    ({"metrics_addresses": {"h:1": "h"}}, "load_report.metrics_addresses.h:1: expected HOST:PORT"),
    ({"metrics_addresses": {"h": "h:2"}}, "load_report.metrics_addresses key 'h': expected"),
])
def test_load_report_config_errors_name_the_key(value: Any, message: str) -> None:
    data = {"variants": [{"name": "v", "instances": ["127.0.0.1:8001"], "load_report": value}]}
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


def test_load_report_config_defaults() -> None:
    def variant(value: Any) -> EndpointConfig:
        return parse_config({"variants": [{"name": "v", "instances": ["127.0.0.1:8001"],
                                           "load_report": value}]})

    assert variant(True).variants[0].load_report == LoadReportConfig()
    assert variant(False).variants[0].load_report is None
    got = variant({"interval_s": 0.25, "metrics_port": 9002,
                   "metrics_addresses": {"10.0.0.1:8001": "10.0.0.1:9100"}}).variants[0].load_report
    assert got == LoadReportConfig(interval_s=0.25, metrics_port=9002,
                                   metrics_addresses=(("10.0.0.1:8001", "10.0.0.1:9100"),))


def test_metrics_address_from_config_then_router_then_host() -> None:
    spec = LoadReportConfig(metrics_port=9100,
                            metrics_addresses=(("10.0.0.1:8001", "10.0.0.9:9000"),))
    reporter = LoadReporter(None, spec, {"10.0.0.1:8001": "ignored:1",  # type: ignore[arg-type]
                                         "10.0.0.2:8001": "10.0.0.2:7000"})

    def at(address: str) -> str:
        return reporter.metrics_address(dataclasses.make_dataclass("I", ["address"])(address))

    assert at("10.0.0.1:8001") == "10.0.0.9:9000"  # the config names it
    assert at("10.0.0.2:8001") == "10.0.0.2:7000"  # a local worker the router started
    assert at("[fd00::3]:8001") == "[fd00::3]:9100"  # anything else: metrics_port there
