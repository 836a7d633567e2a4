"""What the load is sent to: tritonmesh (a separate process), nginx, HAProxy, or one Triton.

Every target is a process of its own on a free loopback port, started for one cell and
stopped by PID after it, so the load generator never shares an interpreter with a router.
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
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
from tritonmesh.bench.loadgen import HINT_PARAMETER
from tritonmesh.workers.launcher import free_ports

__all__ = ["INSTALL_PEERS", "STDLIB_LOOP", "Target", "available_targets", "running", "terminate"]

INSTALL_PEERS = "apt-get install -y nginx haproxy"


@dataclass(frozen=True)
class Target:
    """A router under test: ``kind`` is tritonmesh, nginx, haproxy or direct."""

    kind: str
    strategy: str
    max_concurrency: int | None = None
    least_slack: bool = False  # tritonmesh late binding: queue_order LEAST_SLACK
    dispatch_ahead_s: float = 0.0  # tritonmesh late binding: dispatch_ahead_s
    event_loop: str = ""  # tritonmesh: --event-loop ("": the default, uvloop)

    @property
    def label(self) -> str:
        if self.kind == "tritonmesh" and self.max_concurrency:
            order = ", least slack" if self.least_slack else ""
            if self.dispatch_ahead_s:
                order += f", dispatch ahead {self.dispatch_ahead_s * 1000:g} ms"
            return (f"tritonmesh {self.strategy} "
                    f"(late binding, {self.max_concurrency}/instance{order})")
        if self.event_loop:
            return f"{self.kind} {self.strategy} ({self.event_loop} loop)"
        return f"{self.kind} {self.strategy}".strip()


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


def available_targets(peers: bool = True) -> tuple[list[Target], list[str]]:
    """Every target this machine can run, and a note for each peer that is missing."""
    targets = [*TRITONMESH, LATE_BINDING, *WORK_AWARE]
    notes = []
    if peers:
        for binary, group in (("nginx", NGINX), ("haproxy", HAPROXY)):
            if shutil.which(binary):
                targets += group
            else:
                notes.append(f"{binary} is not installed: its columns are missing "
                             f"(install with: {INSTALL_PEERS})")
    return targets, notes


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
    hints = ""
    if target.strategy == "LEAST_OUTSTANDING_WORK":
        hints = "".join(f"  {model}: {{parameter: {HINT_PARAMETER}, base: 1}}\n"
                        for model in ("generate", "generate_unary"))
        hints = "work_hints:\n" + hints
    return (f"listen: 127.0.0.1:{port}\nmetrics_listen: null\nadmin_listen: null\n"
            f"{hints}variants:\n"
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


@contextlib.asynccontextmanager
async def running(target: Target, workers: Sequence[str]) -> AsyncIterator[str]:
    """Start ``target`` in front of ``workers``; yields the address to send load to."""
    if target.kind == "direct":
        yield workers[0]
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
            await _wait_serving(address, process)
            yield address
        except RuntimeError as exc:
            log.flush()
            raise RuntimeError(f"{exc}\n{(prefix / 'target.log').read_text()[-2000:]}") from None
        finally:
            await terminate(process, 15.0)
            log.close()
