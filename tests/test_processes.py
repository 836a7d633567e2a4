"""K router processes on one port (``processes``; tritonmesh.supervisor): a real
supervisor and real router processes over the session's real Triton workers. The test
reads the variant's shared table as its spare process index (K + 1): fleet-wide counts,
each process's ledger, and how many updates each process made. The tests of the data
path's accounting run on each data path (the ``data_path`` fixture; native only on the
compiled build): every router process serves the port with its own native port and its own
grpc.aio relay."""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import mmap
import os
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import admin_stub, generate_inputs, identity_inputs, wait_for, wait_gone
from test_cli import Running
from tritonclient.utils import InferenceServerException
from tritonmesh._core import SharedTable, _segment
from tritonmesh._pb import tritonmesh_admin_pb2 as apb

TRITONMESH = str(Path(sys.executable).parent / "tritonmesh")


def _write_config(path: Path, addresses: list[str], processes: object = 2, *,
                  metrics: bool = False, **extra: object) -> Path:
    path.write_text(json.dumps({
        "listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0" if metrics else None,
        "admin_listen": "127.0.0.1:0",
        "processes": processes, "shutdown_grace_s": 5.0,
        "health_check": {"interval_s": 0.5, "timeout_s": 1.0},
        "variants": [{"name": "AllTraffic", "routing_strategy": "LEAST_OUTSTANDING_REQUESTS",
                      "instances": addresses, "slow_start_s": 0, **extra}],
    }))
    return path


class Endpoint:
    """``tritonmesh serve`` with K router processes, and its table as seen from here."""

    def __init__(self, config: Path, processes: int):
        self.running = Running(["serve", "--config", str(config)])
        self.processes = processes
        self.pid = self.running.process.pid
        self.segment = f"tritonmesh-{self.pid}-v0"
        self.table = SharedTable.attach(self.segment, processes + 1)

    def serves(self, data_path: str) -> None:
        """Every router process serves the port on ``data_path`` (as it logged at start)."""
        for index in range(1, self.processes + 1):
            assert any(f"router[{index}] " in line and f"(data_path: {data_path})" in line
                       for line in self.running.lines), (index, "".join(self.running.lines))

    def relay_directory(self, index: int) -> str:
        """Where router process ``index`` has its grpc.aio relay's socket (native only):
        the path /proc/net/unix gives the socket inode it holds open."""
        pid = self.table.pid(index)
        inodes = _socket_inodes(pid)
        with open("/proc/net/unix") as table:
            for line in table:
                fields = line.split()
                if len(fields) == 8 and fields[6] in inodes and fields[7].endswith("grpc.sock"):
                    return os.path.dirname(fields[7])
        raise AssertionError(f"router[{index}] (pid {pid}) holds no relay socket")

    def connections_to(self, address: str) -> int:
        """The router processes' established TCP connections to ``address``'s port, the
        sockets /proc/net/tcp and tcp6 (gRPC's, v4-mapped) list against the inodes they
        hold."""
        port = int(address.rpartition(":")[2])
        inodes = set().union(*(_socket_inodes(pid) for pid in self.router_pids().values()))
        rows = []
        for name in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(name) as table:
                rows += [line.split() for line in table][1:]
        return sum(1 for row in rows if row[3] == "01" and row[9] in inodes
                   and int(row[2].rpartition(":")[2], 16) == port)

    def close(self) -> None:
        self.table.close()
        if self.running.process.poll() is None:
            self.running.interrupt()

    def router_pids(self) -> dict[int, int]:
        return {i: self.table.pid(i) for i in range(1, self.processes + 1)}

    def slots(self) -> list[int]:
        return [slot for slot, *_ in self.table.snapshot()]

    def total(self) -> int:
        return sum(self.table.outstanding(s) for s in self.slots())

    def held(self, index: int) -> int:
        return sum(self.table.held(s, index) for s in self.slots())

    def updates(self, index: int) -> int:
        """Count updates process ``index`` applied to the table (its ledger cells' high
        32 bits, _segment's layout): how many requests it picked and released."""
        capacity, max_processes = self.table.capacity, self.table.max_processes
        _, _, ledgers, size = _segment.offsets(capacity, max_processes)
        row = ledgers + index * _segment.ledger_row(capacity)
        with open(_segment.path(self.segment), "rb") as f, \
                mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as m:
            cells = np.frombuffer(m, dtype="<u8", count=capacity, offset=row).copy()
        return int((cells >> np.uint64(32)).sum())

    def quiescent(self) -> None:
        """Every global count and every ledger back to zero, and the invariants hold."""
        wait_for(lambda: self.total() == 0, "every request released")
        self.table.check()
        for index in range(self.processes + 1):
            assert self.held(index) == 0, index


@pytest.fixture
def endpoints() -> Iterator[list[Endpoint]]:
    started: list[Endpoint] = []
    yield started
    for endpoint in started:
        endpoint.close()


def _concurrently(address: str, clients: int, requests: int, model: str = "identity",
                  max_tokens: int = 0, timeout: float = 60) -> tuple[int, list[str]]:
    """``clients`` threads, each with its own connection, sending ``requests`` each:
    (answered, errors as status names)."""
    answered = [0] * clients
    errors: list[str] = []
    connected = threading.Barrier(clients)

    def run(i: int) -> None:
        # A connection of its own (gRPC shares one between like channels by default),
        # opened before any request, so that the requests start together.
        with grpcclient.InferenceServerClient(
                address, channel_args=[("grpc.use_local_subchannel_pool", 1)]) as client:
            client.is_server_live()
            connected.wait(60)
            inputs = identity_inputs() if model == "identity" else generate_inputs(max_tokens)
            for _ in range(requests):
                try:
                    client.infer(model, inputs, client_timeout=timeout)
                    answered[i] += 1
                except InferenceServerException as exc:
                    errors.append(str(exc.status()))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    return sum(answered), errors


def _in_background(address: str, clients: int, max_tokens: int) -> tuple[
        threading.Thread, list[Any]]:
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(
        _concurrently(address, clients, 1, "generate_unary", max_tokens)))
    thread.start()
    return thread, result


def _logged_by_every_router(running: Running, text: str, processes: int,
                            logger: str = "tritonmesh.members") -> None:
    """Wait until each router process has logged ``text`` (in any order)."""
    wanted = [f"router[{i}] {logger}: {text}" for i in range(1, processes + 1)]
    while not all(any(w in line for line in running.lines) for w in wanted):
        running.expect(text)


def _inferences(address: str, model: str = "identity") -> int:
    return _statistics(address, model)[0]


def _gained(workers: list[str], before: list[int], total: int) -> list[int]:
    """Each worker's inferences since ``before``, once they add up to ``total``: Triton's
    Python backend counts a request just after it sends the response, so a client that
    asks right after its answer can find the last one not counted yet."""
    def gained() -> list[int]:
        return [_inferences(w) - b for w, b in zip(workers, before, strict=True)]

    wait_for(lambda: sum(gained()) >= total, f"Triton's statistics to count {total} requests")
    return gained()


def _statistics(address: str, model: str) -> tuple[int, int, int]:
    """Triton's own figures for ``model``: (inferences, ns waiting in its queue, ns
    computing)."""
    with grpcclient.InferenceServerClient(address) as client:
        stats = client.get_inference_statistics(model, as_json=True)
    count = queued = computed = 0
    for s in stats.get("model_stats", []):
        count += int(s.get("inference_count", 0))
        figures = s.get("inference_stats", {})
        queued += int(figures.get("queue", {}).get("ns", 0))
        computed += int(figures.get("compute_infer", {}).get("ns", 0))
    return count, queued, computed


@pytest.mark.parametrize("value", [0, -1, "x", 1.5, True])
def test_processes_must_be_a_positive_integer_or_auto(tmp_path: Path, value: object) -> None:
    config = _write_config(tmp_path / "c.json", ["127.0.0.1:9"], value)
    result = subprocess.run([TRITONMESH, "serve", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "processes:" in result.stderr and repr(value) in result.stderr, result.stderr


@pytest.mark.parametrize("slots", [0, -1, "many", 2**20 + 1])
def test_shared_table_slots_is_checked(tmp_path: Path, slots: object) -> None:
    config = tmp_path / "c.json"
    _write_config(config, ["127.0.0.1:9"], 2)
    data = json.loads(config.read_text())
    config.write_text(json.dumps({**data, "shared_table_slots": slots}))
    result = subprocess.run([TRITONMESH, "serve", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert f"shared_table_slots: expected an integer in [1, {2**20}], got {slots!r}" \
        in result.stderr, result.stderr


def test_processes_auto_is_the_cpus_this_process_may_use(tmp_path: Path) -> None:
    from tritonmesh.config import load_config

    config = load_config(_write_config(tmp_path / "c.json", ["127.0.0.1:9"], "auto"))
    assert config.processes == len(os.sched_getaffinity(0))


def test_processes_auto_is_one_where_the_configuration_needs_one(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``auto`` (what make up passes) serves a configuration several processes would be
    refused for with one process, and says why; an explicit K is refused as before."""
    from tritonmesh.config import load_config

    with caplog.at_level(logging.INFO, "tritonmesh.processes"):
        config = load_config(_write_config(tmp_path / "c.json", ["127.0.0.1:9"], "auto",
                                           routing_strategy="ROUND_ROBIN"))
    assert config.processes == 1
    if len(os.sched_getaffinity(0)) > 1:
        assert "processes: auto runs one router process: variants[0].routing_strategy: " \
               "ROUND_ROBIN needs one router process" in caplog.text, caplog.text


@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_processes_option_is_checked_too(tmp_path: Path, value: str) -> None:
    config = _write_config(tmp_path / "c.json", ["127.0.0.1:9"], 1)
    result = subprocess.run([TRITONMESH, "serve", "--config", str(config), "--processes", value],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "processes:" in result.stderr, result.stderr


@pytest.mark.parametrize(("extra", "key"), [
    ({"routing_strategy": "ROUND_ROBIN"}, "variants[0].routing_strategy"),
    ({"routing_strategy": "LEAST_OUTSTANDING_WORK"}, "variants[0].routing_strategy"),
])
def test_what_one_process_keeps_is_refused_with_several(tmp_path: Path, extra: dict[str, Any],
                                                         key: str) -> None:
    config = _write_config(tmp_path / "c.json", ["127.0.0.1:9"], 2, **extra)
    result = subprocess.run([TRITONMESH, "serve", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert f"{key}:" in result.stderr and "processes: 2" in result.stderr, result.stderr


def test_grpc_fork_handlers_are_off_in_tritonmesh_processes() -> None:
    """The supervisor starts router processes by fork + exec from uvloop while gRPC's
    threads run; with gRPC's fork handlers on, about one child in 70 died of SIGSEGV before
    its exec, failing the start (bench/grpc_fork_crash.py: 11 of 300 with, 0 of 300
    without). Importing tritonmesh turns them off, unless the environment says otherwise."""
    env = {k: v for k, v in os.environ.items() if k != "GRPC_ENABLE_FORK_SUPPORT"}
    read = "import tritonmesh, os; print(os.environ['GRPC_ENABLE_FORK_SUPPORT'])"
    for given, expected in ((None, "0"), ("1", "1")):
        result = subprocess.run(
            [sys.executable, "-c", read], capture_output=True, text=True, timeout=60,
            env=env if given is None else {**env, "GRPC_ENABLE_FORK_SUPPORT": given})
        assert result.stdout.strip() == expected, result.stderr


def test_a_read_only_dev_shm_is_a_clear_error_at_start(tmp_path: Path) -> None:
    """In a mount namespace of its own, with a read-only tmpfs on /dev/shm."""
    config = _write_config(tmp_path / "c.json", ["127.0.0.1:9"], 2)
    probe = subprocess.run(["unshare", "-m", "sh", "-c",
                            "mount -t tmpfs -o ro tmpfs /dev/shm"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a mount namespace here: {probe.stderr.strip()}")
    result = subprocess.run(["unshare", "-m", "sh", "-c",
                             f"mount -t tmpfs -o ro tmpfs /dev/shm && exec {TRITONMESH} "
                             f"serve --config {config}"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "processes: 2 router processes share their counts in /dev/shm, which cannot be " \
           "used: Read-only file system" in result.stderr, result.stderr


@pytest.mark.triton
@pytest.mark.parametrize("processes", [2, 3])
def test_k_processes_share_exact_counts_under_load(tmp_path: Path, worker_addresses: list[str],
                                                  endpoints: list[Endpoint],
                                                  processes: int, data_path: str) -> None:
    endpoint = Endpoint(_write_config(tmp_path / "c.json", worker_addresses[:2], processes,
                                      metrics=True), processes)
    endpoints.append(endpoint)
    endpoint.serves(data_path)
    address = endpoint.running.address
    # Six long requests at once, from six connections: the picks are fleet-wide
    # least-outstanding, so the two instances hold three each whichever processes took them.
    thread, result = _in_background(address, 6, max_tokens=400)
    wait_for(lambda: endpoint.total() == 6, "six requests in flight")
    assert endpoint.table.check_live() == 2
    assert sorted(endpoint.table.outstanding(s) for s in endpoint.slots()) == [3, 3]
    assert sum(endpoint.held(i) for i in range(1, processes + 1)) == 6
    thread.join(60)
    assert result == [(6, [])]
    endpoint.quiescent()
    # Many connections: the kernel spreads them over every router process.
    answered, errors = _concurrently(address, 24, 10)
    assert (answered, errors) == (240, [])
    endpoint.quiescent()
    served = [endpoint.updates(i) for i in range(1, processes + 1)]
    assert all(served), served
    assert sum(served) == 2 * (240 + 6)  # one pick and one release per request
    assert endpoint.updates(0) == 0  # the supervisor serves nothing
    # The supervisor's /metrics: the router processes' counts, added up.
    wait_for(lambda: _metric(endpoint, "tritonmesh_instance_requests_total") == 246,
             "the fleet's request count on /metrics", timeout=30)
    assert _metric(endpoint, "tritonmesh_instance_request_duration_seconds_count") == 246
    assert _metric(endpoint, "tritonmesh_instance_outstanding_requests") == 0
    # tritonmesh status (the admin API) shows the fleet's counts too.
    assert endpoint.running.admin is not None
    admin = admin_stub(endpoint.running.admin)
    wait_for(lambda: sum(i.requests for i in admin.ListInstances(
        apb.ListInstancesRequest()).instances) == 246, "the fleet's request count on status")
    assert admin.ListInstances(apb.ListInstancesRequest()).processes == processes
    status = subprocess.run([TRITONMESH, "status", "--address", endpoint.running.admin],
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    # That its counts lag is said where they are read.
    assert f"router processes: {processes} (requests and errors: the fleet's, up to 2 s old)" \
        in status.stdout, status.stdout


def _metric(endpoint: Endpoint, name: str) -> float:
    """The sum of ``name``'s samples on the supervisor's /metrics."""
    with urllib.request.urlopen(f"http://{endpoint.running.metrics}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith((name + "{", name + " ")))


@pytest.mark.triton
def test_sigkill_of_a_router_process_fails_only_its_requests(
        tmp_path: Path, worker_addresses: list[str], endpoints: list[Endpoint],
        data_path: str) -> None:
    endpoint = Endpoint(_write_config(tmp_path / "c.json", worker_addresses[:2], 2), 2)
    endpoints.append(endpoint)
    endpoint.serves(data_path)
    address = endpoint.running.address
    thread, result = _in_background(address, 8, max_tokens=400)
    wait_for(lambda: endpoint.total() == 8, "eight requests in flight")
    pids = endpoint.router_pids()
    victim = max(pids, key=endpoint.held)
    lost = endpoint.held(victim)
    relay = endpoint.relay_directory(victim) if data_path == "native" else None
    os.kill(pids[victim], signal.SIGKILL)
    # Reaped: all its threads are gone, and its socket with them. (A connection the
    # kernel hands its socket in the instant it dies is reset, as with any SO_REUSEPORT
    # server; /proc shows the process a zombie while its other threads still exit.)
    endpoint.running.expect(f"router[{victim}] (pid {pids[victim]}) exited")
    # The port keeps serving while it is restarting.
    assert _concurrently(address, 8, 5) == (40, [])
    thread.join(60)
    answered, errors = result[0]
    assert (answered, len(errors)) == (8 - lost, lost), errors
    assert set(errors) <= {"StatusCode.UNAVAILABLE"}, errors
    endpoint.running.expect(f"router[{victim}] started")
    restarted = endpoint.router_pids()[victim]
    assert restarted not in (0, pids[victim])
    if relay is not None:  # what the killed process left, its successor removed
        assert not os.path.exists(relay)
        assert os.path.exists(endpoint.relay_directory(victim))
    endpoint.quiescent()
    assert _concurrently(address, 16, 5) == (80, [])
    endpoint.quiescent()


@pytest.mark.triton
def test_membership_reaches_every_router_process(
        tmp_path: Path, worker_addresses: list[str], endpoints: list[Endpoint],
        data_path: str) -> None:
    first, second, third = worker_addresses[:3]
    config = _write_config(tmp_path / "c.json", [first], 2)
    endpoint = Endpoint(config, 2)
    endpoints.append(endpoint)
    endpoint.serves(data_path)
    running = endpoint.running
    assert running.admin is not None
    assert _health(running.address) == health_pb2.HealthCheckResponse.SERVING
    admin = admin_stub(running.admin)
    assert _concurrently(running.address, 16, 5) == (80, [])  # connections to the first
    assert endpoint.connections_to(first) > 0
    admin.AddInstance(apb.AddInstanceRequest(variant="AllTraffic", address=second))
    _logged_by_every_router(running, f"{second} joined", 2)
    removed = admin.RemoveInstance(apb.RemoveInstanceRequest(variant="AllTraffic",
                                                             address=first))
    assert removed.drained
    _logged_by_every_router(running, f"{first} left", 2)
    # Each router process closes its connections to an instance that left, as one process
    # does (native: its upstream connection, GOAWAY; grpc: its channel).
    wait_for(lambda: endpoint.connections_to(first) == 0, "connections to the removed one closed")
    before = [_inferences(first), _inferences(second)]
    assert _concurrently(running.address, 16, 5) == (80, [])
    assert _gained([first, second], before, 80) == [0, 80]
    # A SIGHUP reload's static instances reach them too (the admin-added one stays),
    # and so do the variant's live keys: a per-try timeout shorter than any generation.
    _write_config(config, [third], 2, per_try_timeout_s=1.0)
    running.process.send_signal(signal.SIGHUP)
    _logged_by_every_router(running, f"{third} joined", 2)
    _logged_by_every_router(running, "reloaded the configuration", 2,
                            "tritonmesh.routerchild")
    assert _concurrently(running.address, 16, 5) == (80, [])
    answered, errors = _concurrently(running.address, 6, 1, "generate_unary", max_tokens=600)
    assert (answered, set(errors)) == (0, {"StatusCode.DEADLINE_EXCEEDED"}), errors
    endpoint.quiescent()


@pytest.mark.triton
def test_late_binding_limit_holds_fleet_wide_and_wakes_every_process(
        tmp_path: Path, worker_addresses: list[str], endpoints: list[Endpoint],
        data_path: str) -> None:
    """max_concurrency_per_instance: 1 with three router processes and one instance:
    Triton never holds two requests (its own queue statistics: nothing waited there),
    and requests waiting in one process get the instance a release in another frees
    (none runs into its deadline)."""
    instance = worker_addresses[0]
    endpoint = Endpoint(_write_config(tmp_path / "c.json", [instance], 3,
                                      max_concurrency_per_instance=1), 3)
    endpoints.append(endpoint)
    endpoint.serves(data_path)
    most = [0]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            most[0] = max(most[0], endpoint.total())

    before = _statistics(instance, "generate_unary")
    watcher = threading.Thread(target=watch)
    watcher.start()  # stopped in the finally: it reads the table the teardown unmaps
    try:
        answered = _concurrently(endpoint.running.address, 12, 3, "generate_unary",
                                 max_tokens=10, timeout=30)
    finally:
        done.set()
        watcher.join()
    assert answered == (36, [])
    count, queued, computed = (a - b for a, b in
                               zip(_statistics(instance, "generate_unary"), before, strict=True))
    assert count == 36
    # Two at once would have one wait in Triton's queue for the other's whole compute.
    assert queued < computed / 10, (queued, computed)
    assert most[0] == 1
    endpoint.quiescent()


def _socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets process ``pid`` holds open."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def _health(address: str) -> int:
    """The port's grpc.health.v1 status (one router process answers)."""
    with grpc.insecure_channel(address,
                               options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10)
    return int(answer.status)


def test_the_port_says_not_serving_as_the_supervisor_checks_say(
        tmp_path: Path, endpoints: list[Endpoint], data_path: str) -> None:
    """One instance, refusing connections: health checks fail open (it stays pickable),
    but no instance passed its last probe, so the port is NOT_SERVING, as with one
    process, in every router process (new connections reach either)."""
    endpoint = Endpoint(_write_config(tmp_path / "c.json", ["127.0.0.1:9"], 2), 2)
    endpoints.append(endpoint)
    endpoint.serves(data_path)
    address = endpoint.running.address
    wait_for(lambda: all(_health(address) == health_pb2.HealthCheckResponse.NOT_SERVING
                         for _ in range(8)), "NOT_SERVING from every router process")


def _ours(pid: int) -> list[str]:
    return sorted(n for n in os.listdir(_segment.SHM_DIR) if n.startswith(f"tritonmesh-{pid}-"))


@pytest.mark.triton
def test_sigkill_of_everything_then_restart_leaves_nothing_and_sigterm_drains(
        tmp_path: Path, worker_addresses: list[str], endpoints: list[Endpoint],
        data_path: str) -> None:
    config = _write_config(tmp_path / "c.json", worker_addresses[:1], 2)
    crashed = Endpoint(config, 2)
    endpoints.append(crashed)
    left = _ours(crashed.pid)
    # The table, the membership file, the router processes' run file, the sequence pins,
    # the ejections and the retry counts.
    assert len(left) == 6
    routers = crashed.router_pids()
    for pid in [*routers.values(), crashed.pid]:
        os.kill(pid, signal.SIGKILL)
    crashed.running.process.wait(30)
    wait_gone({pid: "router" for pid in routers.values()})
    assert _ours(crashed.pid) == left
    metrics = glob.glob(f"{tempfile.gettempdir()}/tritonmesh-metrics-{crashed.pid}-*")
    assert len(metrics) == 1

    endpoint = Endpoint(config, 2)
    endpoints.append(endpoint)
    endpoint.serves(data_path)
    assert "stale shared-memory files" in "".join(endpoint.running.lines)
    assert _ours(crashed.pid) == [] and not os.path.exists(metrics[0])
    routers = endpoint.router_pids()
    # SIGTERM: in-flight requests finish (shutdown_grace_s), then everything exits.
    thread, result = _in_background(endpoint.running.address, 2, max_tokens=100)
    wait_for(lambda: endpoint.total() == 2, "two requests in flight")
    endpoint.running.process.send_signal(signal.SIGTERM)
    thread.join(60)
    assert result == [(2, [])]
    assert endpoint.running.process.wait(60) == 0
    wait_gone({pid: "router" for pid in routers.values()})
    endpoint.table.close()
    assert _ours(endpoint.pid) == []


def test_a_router_process_never_sends_where_it_may_not() -> None:
    """SharedCounts in a router process: its picks never return a slot whose address it
    does not know yet (the membership event in flight), one it excludes (a retry's "not
    that one again"), or one the fleet ejected; the supervisor's slots become pickable
    only once published. Both builds, no gRPC."""
    from tritonmesh.fleetoutliers import SharedEjections
    from tritonmesh.sharedcounts import SharedCounts

    supervisor = SharedTable.create(8, 3, tag="counts-test")
    router = SharedTable.attach(supervisor.name, 1)
    ejections = SharedEjections.create(1, 8, tag="counts-test-ejections")
    try:
        owner = SharedCounts(supervisor, owner=True)
        first, second = owner.add(), owner.add()
        assert owner.pickable() == 0  # not published yet
        owner.published()
        view = SharedCounts(router, owner=False, ejections=ejections)
        view.learn(first, router.generation(first))
        picks = {view.pick() for _ in range(50)}
        assert picks == {first}  # the unknown slot is never returned
        assert router.outstanding(second) == 0 and router.outstanding(first) == 50
        for _ in range(50):
            view.release(first)
        view.learn(second, router.generation(second))
        view.set_available(first, False)  # a retry avoids it: here only
        assert supervisor.is_available(first)
        assert {view.pick_two() for _ in range(20)} == {second}
        view.set_available(first, True)
        assert {view.pick_random() for _ in range(200)} == {first, second}
        assert ejections.eject(0, second, router.generation(second), 30.0, 30.0)
        assert {view.pick() for _ in range(20)} == {first} and view.pickable() == 1
        for slot, count, *_ in router.snapshot():
            for _ in range(count):
                view.release(slot)
        supervisor.check()
    finally:
        router.close()
        ejections.unlink()
        ejections.close()
        supervisor.unlink()
        supervisor.close()
