"""What the load is sent to: tritonmesh (a separate process), nginx, HAProxy, nghttpx, or
one Triton.

Every target is a process of its own on a free loopback port, started for one cell (the
overhead mode: for the whole run) and stopped by PID after it, so the load generator never
shares an interpreter with a router.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import grpc.aio
from tritonmesh.bench.loadgen import HINT_PARAMETER
from tritonmesh.config import EndpointConfig
from tritonmesh.native_config import DataPath, choose_data_path
from tritonmesh.workers.launcher import free_ports

__all__ = ["DATA_PATHS", "INSTALL_PEERS", "STDLIB_LOOP", "Serving", "Target", "TargetFailed",
           "available_targets", "default_data_path", "running", "terminate",
           "tritonmesh_variants"]

INSTALL_PEERS = "apt-get install -y nginx haproxy nghttp2-proxy"
DATA_PATHS = ("grpc", "native")  # tritonmesh's data_path key
# The router's default for the processes key, which the bench writes only when it differs.
DEFAULT_PROCESSES = 1


@dataclass(frozen=True)
class Target:
    """A router under test: ``kind`` is tritonmesh, nginx, haproxy, nghttpx or direct."""

    kind: str
    strategy: str
    max_concurrency: int | None = None
    least_slack: bool = False  # tritonmesh late binding: queue_order LEAST_SLACK
    dispatch_ahead_s: float = 0.0  # tritonmesh late binding: dispatch_ahead_s
    event_loop: str = ""  # tritonmesh: --event-loop ("": the default, uvloop)
    processes: int | None = None  # tritonmesh: router processes (None: not asked, one)
    data_path: str = ""  # tritonmesh: one of DATA_PATHS ("": not asked, the default)

    @property
    def label(self) -> str:
        notes = []
        if self.kind == "tritonmesh" and self.max_concurrency:
            order = ", least slack" if self.least_slack else ""
            if self.dispatch_ahead_s:
                order += f", dispatch ahead {self.dispatch_ahead_s * 1000:g} ms"
            notes.append(f"late binding, {self.max_concurrency}/instance{order}")
        if self.event_loop:
            notes.append(f"{self.event_loop} loop")
        if self.processes is not None:
            notes.append(f"K={self.processes}")
        if self.data_path:
            notes.append(self.data_path)
        name = f"{self.kind} {self.strategy}".strip()
        return f"{name} ({', '.join(notes)})" if notes else name


TRITONMESH = [Target("tritonmesh", s) for s in
              ("RANDOM", "ROUND_ROBIN", "POWER_OF_TWO_CHOICES", "LEAST_OUTSTANDING_REQUESTS")]
LATE_BINDING = Target("tritonmesh", "LEAST_OUTSTANDING_REQUESTS", max_concurrency=1)
# Work-aware: a request's cost is its length hint (the demo models' service time is linear
# in their length); one configuration whatever the hint's quality, or none.
WORK_AWARE = [Target("tritonmesh", "LEAST_OUTSTANDING_WORK"),
              Target("tritonmesh", "LEAST_OUTSTANDING_WORK", max_concurrency=1,
                     least_slack=True),
              Target("tritonmesh", "LEAST_OUTSTANDING_WORK", max_concurrency=1,
                     least_slack=True, dispatch_ahead_s=0.01)]
# Overhead mode only: what uvloop (the default) is worth, side by side in one run.
STDLIB_LOOP = Target("tritonmesh", "RANDOM", event_loop="asyncio")
NGINX = [Target("nginx", s) for s in ("random", "least_conn", "random two least_conn")]
HAPROXY = [Target("haproxy", s) for s in ("random", "random(2)", "leastconn",
                                           "leastconn maxconn 1")]
# nghttp2's own proxy, one worker: a data path on libnghttp2 with next to no policy, the floor
# of what a proxy on that library costs. Its only choice among backends of one pattern is
# weighted round robin (equal weights here, no affinity).
NGHTTPX = [Target("nghttpx", "round-robin")]


def available_targets(peers: bool = True) -> tuple[list[Target], list[str]]:
    """Every target this machine can run, and a note for each peer that is missing."""
    targets = [*TRITONMESH, LATE_BINDING, *WORK_AWARE]
    notes = []
    if peers:
        for binary, group in (("nginx", NGINX), ("haproxy", HAPROXY), ("nghttpx", NGHTTPX)):
            if shutil.which(binary):
                targets += group
            else:
                notes.append(f"{binary} is not installed: its columns are missing "
                             f"(install with: {INSTALL_PEERS})")
    return targets, notes


def tritonmesh_variants(targets: Sequence[Target], processes: Sequence[int] | None,
                        data_paths: Sequence[str] | None) -> list[Target]:
    """Each tritonmesh target once per process count and data path asked for (``None``:
    not asked, the router's default, and no mention in the label); peers unchanged."""
    counts: Sequence[int | None] = processes or [None]
    out = []
    for target in targets:
        if target.kind != "tritonmesh":
            out.append(target)
            continue
        out += [replace(target, processes=k, data_path=d)
                for k in counts for d in (data_paths or [""])]
    return out


def default_data_path(processes: int | None) -> DataPath:
    """What a tritonmesh target with ``processes`` (None: not asked) and no data path asked
    runs on: the router's own choice for the bench's configuration with this build and
    this environment (``TRITONMESH_DATA_PATH`` reaches the router too)."""
    return choose_data_path(EndpointConfig(processes=processes or DEFAULT_PROCESSES))


def _nghttpx_args(prefix: Path, port: int, workers: Sequence[str]) -> list[str]:
    backends = []
    for address in workers:
        host, _, backend_port = address.rpartition(":")
        # The catch-all pattern, no session affinity (nghttpx's default, spelled out).
        backends.append(f"--backend={host},{backend_port};;proto=h2;affinity=none")
    return ["nghttpx", "--conf=/dev/null", f"--frontend=127.0.0.1,{port};no-tls", *backends,
            "--workers=1", f"--pid-file={prefix}/nghttpx.pid", "--no-via",
            "--backend-read-timeout=600s", "--backend-write-timeout=600s",
            "--frontend-http2-read-timeout=600s", "--frontend-write-timeout=600s",
            "--stream-write-timeout=0"]


def _nginx_conf(prefix: Path, port: int, workers: Sequence[str], strategy: str) -> str:
    servers = "\n".join(f"    server {a} max_fails=0;" for a in workers)
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""daemon off;
{user}worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/body;
  proxy_temp_path {prefix}/proxy;
  fastcgi_temp_path {prefix}/fastcgi;
  uwsgi_temp_path {prefix}/uwsgi;
  scgi_temp_path {prefix}/scgi;
  upstream triton {{
    zone triton 256k;
    {strategy};
{servers}
    keepalive 256;
  }}
  server {{
    listen 127.0.0.1:{port} http2;
    client_max_body_size 0;
    location / {{
      grpc_pass grpc://triton;
      grpc_read_timeout 600s;
      grpc_send_timeout 600s;
    }}
  }}
}}
"""


def _haproxy_conf(port: int, workers: Sequence[str], strategy: str) -> str:
    balance, _, maxconn = strategy.partition(" maxconn ")
    limit = f" maxconn {maxconn}" if maxconn else ""
    servers = "\n".join(f"  server s{i} {a} proto h2{limit}" for i, a in enumerate(workers))
    return f"""global
  maxconn 4000
defaults
  mode http
  timeout connect 5s
  timeout client 600s
  timeout server 600s
  timeout queue 600s
frontend fe
  bind 127.0.0.1:{port} proto h2
  default_backend be
backend be
  balance {balance}
{servers}
"""


def _tritonmesh_conf(port: int, workers: Sequence[str], target: Target) -> str:
    limit = (f"    max_concurrency_per_instance: {target.max_concurrency}\n"
             if target.max_concurrency else "")
    if target.least_slack:
        limit += "    queue_order: LEAST_SLACK\n"
    if target.dispatch_ahead_s:
        limit += f"    dispatch_ahead_s: {target.dispatch_ahead_s}\n"
    # Top-level keys only where they differ from the router's defaults, so that K=1 over
    # gRPC runs on a router that does not know these keys.
    top = f"listen: 127.0.0.1:{port}\nmetrics_listen: null\nadmin_listen: null\n"
    if target.processes not in (None, DEFAULT_PROCESSES):
        top += f"processes: {target.processes}\n"
    if target.data_path and target.data_path != default_data_path(target.processes).path:
        top += f"data_path: {target.data_path}\n"
    if target.strategy == "LEAST_OUTSTANDING_WORK":
        top += "work_hints:\n" + "".join(f"  {model}: {{parameter: {HINT_PARAMETER}, base: 1}}\n"
                                         for model in ("generate", "generate_unary"))
    return (f"{top}variants:\n"
            f"  - name: AllTraffic\n    routing_strategy: {target.strategy}\n{limit}"
            f"    instances: {list(workers)!r}\n")


async def terminate(process: asyncio.subprocess.Process, grace: float) -> None:
    """SIGTERM a process this bench started (unless it has ended), SIGKILL after ``grace``."""
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), grace)
        except TimeoutError:
            process.kill()
            await process.wait()


async def _wait_serving(address: str, process: asyncio.subprocess.Process,
                        timeout: float = 30.0) -> None:
    """Until a ServerReady call passes through the target (its path to Triton is up)."""
    from tritonclient.grpc import service_pb2 as pb

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with grpc.aio.insecure_channel(address) as channel:
        ready = channel.unary_unary(
            "/inference.GRPCInferenceService/ServerReady",
            request_serializer=pb.ServerReadyRequest.SerializeToString,
            response_deserializer=pb.ServerReadyResponse.FromString)
        while True:
            if process.returncode is not None:
                raise RuntimeError(f"{address}: the target exited with {process.returncode}")
            with contextlib.suppress(grpc.aio.AioRpcError):
                if (await ready(pb.ServerReadyRequest(), timeout=2)).ready:
                    return
            if loop.time() > deadline:
                raise RuntimeError(f"{address}: the target did not come up in {timeout}s")
            await asyncio.sleep(0.1)


class TargetFailed(RuntimeError):
    """A target exited or never served; the message ends with the tail of its own log."""


@dataclass(frozen=True)
class Serving:
    """A running target: where to send load, and the root of its process tree (None for
    Triton direct, whose processes are the workers')."""

    address: str
    pid: int | None


@contextlib.asynccontextmanager
async def running(target: Target, workers: Sequence[str]) -> AsyncIterator[Serving]:
    """Start ``target`` in front of ``workers``; yields where it serves. A target that exits
    or does not come up raises :class:`TargetFailed` with what it logged."""
    if target.kind == "direct":
        yield Serving(workers[0], None)
        return
    port = free_ports(1)[0]
    address = f"127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix=f"tritonmesh-bench-{target.kind}-") as tmp:
        prefix = Path(tmp)
        if target.kind == "nginx":
            conf = prefix / "nginx.conf"
            conf.write_text(_nginx_conf(prefix, port, workers, target.strategy))
            args = ["nginx", "-c", str(conf), "-p", str(prefix), "-e", str(prefix / "error.log")]
        elif target.kind == "haproxy":
            conf = prefix / "haproxy.cfg"
            conf.write_text(_haproxy_conf(port, workers, target.strategy))
            args = ["haproxy", "-f", str(conf), "-db"]
        elif target.kind == "nghttpx":
            args = _nghttpx_args(prefix, port, workers)
        else:
            conf = prefix / "endpoint.yaml"
            conf.write_text(_tritonmesh_conf(port, workers, target))
            tritonmesh = str(Path(sys.executable).parent / "tritonmesh")
            args = [tritonmesh, "--log-level", "WARNING", "serve", "--config", str(conf)]
            if target.event_loop:
                args[1:1] = ["--event-loop", target.event_loop]
        log = open(prefix / "target.log", "wb")  # noqa: ASYNC230 (closed below)
        process = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=asyncio.subprocess.STDOUT)
        try:
            try:
                await _wait_serving(address, process)
            except RuntimeError as exc:
                log.flush()
                tail = (prefix / "target.log").read_text(errors="replace")[-2000:]
                raise TargetFailed(f"{target.label}: {exc}\n{tail}") from None
            yield Serving(address, process.pid)
        finally:
            await terminate(process, 15.0)
            log.close()
