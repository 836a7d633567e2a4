"""What the router costs per request on each data path: ``identity`` through a router on
``data_path: grpc``, one on ``data_path: native``, and Triton direct, side by side,
interleaved, in one run.

    python bench/native_overhead.py --users 1 8 --seconds 10 --rounds 3

The load is h2load (nghttp2-client), a C client sending the same gRPC ModelInfer body
(``identity``, three FP32) over ``--users`` connections, one request at a time each (closed
loop), so the client takes as little of the shared CPU as it can. Printed per target: req/s,
P50 and P99 (from h2load's per-request log), and the router process's CPU µs per request
(/proc/PID/stat utime + stime, before and after). Each router is ``tritonmesh serve`` in a
process of its own over one real Triton worker. Loopback only; it ends by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2 as pb
from tritonmesh.bench.targets import terminate
from tritonmesh.workers.launcher import WorkerPool, free_ports

PATH = "/inference.GRPCInferenceService/ModelInfer"
TICKS = os.sysconf("SC_CLK_TCK")


def body() -> bytes:
    request = pb.ModelInferRequest(model_name="identity")
    tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[3])
    tensor.contents.fp32_contents.extend([0.0, 1.0, 2.0])
    raw = request.SerializeToString()
    return b"\0" + len(raw).to_bytes(4, "big") + raw


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


@contextlib.asynccontextmanager
async def router(d: Path, data_path: str, worker: str, *, tls: bool = False,
                 processes: int = 1, metrics: bool = False) -> AsyncIterator[tuple[str, int]]:
    """``tritonmesh serve`` in a process of its own; yields its address and pid (with
    ``processes`` > 1, the supervisor's). With ``tls``, its port serves TLS with ``d``'s
    server.pem and server.key (bench/tls_overhead.py makes them); with ``metrics``, it
    serves /metrics on a port of its own."""
    port, metrics_port = free_ports(2)
    config = d / f"{data_path}{'-tls' if tls else ''}-k{processes}.yaml"
    config.write_text(
        f"listen: 127.0.0.1:{port}\nadmin_listen: null\nprocesses: {processes}\n"
        f"metrics_listen: {f'127.0.0.1:{metrics_port}' if metrics else 'null'}\n"
        f"data_path: {data_path}\nvariants:\n  - name: AllTraffic\n"
        f"    routing_strategy: LEAST_OUTSTANDING_REQUESTS\n    instances: ['{worker}']\n"
        + ("tls: {cert_file: server.pem, key_file: server.key}\n" if tls else ""))
    tritonmesh = str(Path(sys.executable).parent / "tritonmesh")
    process = await asyncio.create_subprocess_exec(
        tritonmesh, "--log-level", "WARNING", "serve", "--config", str(config),
        stdout=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30 * processes
        while not await asyncio.to_thread(answers, address, d / "ca.pem" if tls else None):
            if time.monotonic() > deadline or process.returncode is not None:
                raise RuntimeError(f"the {data_path} router did not come up")
            await asyncio.sleep(0.2)
        yield address, process.pid
    finally:
        await terminate(process, 30.0)


def answers(address: str, ca: Path | None = None) -> bool:
    """Whether an identity ModelInfer through ``address`` (over TLS trusting ``ca``)
    comes back right."""
    try:
        with grpcclient.InferenceServerClient(
                address, ssl=ca is not None,
                root_certificates=None if ca is None else str(ca)) as client:
            x = grpcclient.InferInput("INPUT0", [3], "FP32")
            x.set_data_from_numpy(np.arange(3, dtype=np.float32))
            out = client.infer("identity", [x], client_timeout=5).as_numpy("OUTPUT0")
            return out is not None and out.tolist() == [0.0, 1.0, 2.0]
    except Exception:
        return False


async def load(d: Path, address: str, users: int, seconds: float, pid: int | None, *,
               tls: bool = False) -> tuple[float, float, float, float | None]:
    """h2load for ``seconds`` (over TLS with ``tls``: h2 by ALPN, connections made before
    the timed window): (req/s, P50 ms, P99 ms, router CPU µs per request)."""
    log = d / "h2load.tsv"
    log.unlink(missing_ok=True)
    before = cpu_seconds(pid) if pid else 0.0
    process = await asyncio.create_subprocess_exec(
        "h2load", "-c", str(users), "-m", "1", "-D", f"{seconds:g}", "--warm-up-time", "1",
        "-d", str(d / "body.bin"), "-H", "content-type: application/grpc",
        "-H", "te: trailers", "--log-file", str(log),
        f"{'https' if tls else 'http'}://{address}{PATH}",
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = await process.communicate()
    after = cpu_seconds(pid) if pid else 0.0
    text = out.decode()
    found = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded", text)
    if process.returncode or not found or found.group(3) != found.group(2):
        raise RuntimeError(f"h2load against {address} failed:\n{text}")
    done = int(found.group(3))
    rate = float(re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", text).group(1))  # type: ignore[union-attr]
    micros = np.loadtxt(log, usecols=2, ndmin=1)
    cpu = (after - before) / done * 1e6 if pid else None
    return rate, float(np.percentile(micros, 50)) / 1e3, float(np.percentile(micros, 99)) / 1e3, cpu


async def main(args: argparse.Namespace) -> None:
    if shutil.which("h2load") is None:
        sys.exit("h2load is missing: apt-get install nghttp2-client")
    with tempfile.TemporaryDirectory(prefix="native-overhead-") as tmp:
        d = Path(tmp)
        (d / "body.bin").write_bytes(body())
        async with WorkerPool(1) as pool, \
                router(d, "grpc", pool.addresses[0]) as grpc_router, \
                router(d, "native", pool.addresses[0]) as native_router:
            targets = {"Triton direct": (pool.addresses[0], None),
                       "data_path grpc": grpc_router, "data_path native": native_router}
            print(f"{'users':>5} {'round':>5}  {'target':<17} {'req/s':>7} {'P50 ms':>7} "
                  f"{'P99 ms':>7} {'router CPU µs/req':>18}")
            for users in args.users:
                sums: dict[str, list[float]] = {name: [0.0, 0.0] for name in targets}
                for r in range(args.rounds):
                    for name, (address, pid) in targets.items():
                        rate, p50, p99, cpu = await load(d, address, users, args.seconds, pid)
                        sums[name][0] += rate
                        sums[name][1] += cpu or 0.0
                        print(f"{users:>5} {r + 1:>5}  {name:<17} {rate:>7.0f} {p50:>7.2f} "
                              f"{p99:>7.2f} {'—' if cpu is None else f'{cpu:.0f}':>18}",
                              flush=True)
                grpc_rate, grpc_cpu = sums["data_path grpc"]
                native_rate, native_cpu = sums["data_path native"]
                print(f"{users:>5} native / grpc: throughput {native_rate / grpc_rate:.2f}x, "
                      f"CPU per request {native_cpu / grpc_cpu:.2f}x; native / direct "
                      f"throughput {native_rate / sums['Triton direct'][0]:.2f}x", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(main(parser.parse_args()))
