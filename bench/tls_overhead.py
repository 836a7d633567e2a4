"""What TLS on the router's port costs: the `identity` model through one router served
plaintext and one served over TLS, side by side, alternating, in one run.

    python bench/tls_overhead.py --users 1 8 --seconds 10 --rounds 2

Certificates are made with openssl in a temporary directory; one real Triton worker
serves both routers (plaintext upstream), so the difference is the client-side hop only.
Loopback only; it ends by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import tritonclient.grpc.aio as aioclient
from tritonmesh.bench.targets import terminate
from tritonmesh.workers.launcher import WorkerPool, free_ports

EC = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def make_certificates(d: Path) -> None:
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", *EC, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
            "-subj", "/CN=tls_overhead ca")
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    openssl("req", *EC, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=router")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "1", "-extfile", "server.ext")


@contextlib.asynccontextmanager
async def router(d: Path, name: str, worker: str, tls: bool) -> AsyncIterator[str]:
    """``tritonmesh serve`` in a process of its own, as deployed; yields its address."""
    (port,) = free_ports(1)
    config = d / f"{name}.yaml"
    config.write_text(
        f"listen: 127.0.0.1:{port}\nmetrics_listen: null\nadmin_listen: null\n"
        "variants:\n  - name: AllTraffic\n"
        f"    routing_strategy: LEAST_OUTSTANDING_REQUESTS\n    instances: ['{worker}']\n"
        + ("tls: {cert_file: server.pem, key_file: server.key}\n" if tls else ""))
    tritonmesh = str(Path(sys.executable).parent / "tritonmesh")
    process = await asyncio.create_subprocess_exec(
        tritonmesh, "--log-level", "WARNING", "serve", "--config", str(config),
        stdout=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                async with client(d, address, tls) as c:
                    if await c.is_server_ready():
                        break
            except Exception:
                if time.monotonic() > deadline or process.returncode is not None:
                    raise
                await asyncio.sleep(0.2)
        yield address
    finally:
        await terminate(process, 30.0)


def client(d: Path, address: str, tls: bool) -> aioclient.InferenceServerClient:
    if not tls:
        return aioclient.InferenceServerClient(address)
    return aioclient.InferenceServerClient(address, ssl=True,
                                           root_certificates=str(d / "ca.pem"))


async def load(d: Path, address: str, tls: bool, users: int, seconds: float
               ) -> tuple[float, float, float]:
    """Closed-loop users for ``seconds``: (req/s, P50 ms, P99 ms)."""
    latencies: list[float] = []
    until = time.monotonic() + seconds

    async def user() -> None:
        async with client(d, address, tls) as c:
            x = aioclient.InferInput("INPUT0", [16], "FP32")
            x.set_data_from_numpy(np.arange(16, dtype=np.float32))
            await c.infer("identity", [x])  # connect (and handshake) outside the window
            while time.monotonic() < until:
                start = time.perf_counter()
                await c.infer("identity", [x])
                latencies.append(time.perf_counter() - start)

    started = time.monotonic()
    tasks = [asyncio.ensure_future(user()) for _ in range(users)]
    try:
        await asyncio.gather(*tasks)
    finally:  # one user's failure ends the others too
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    elapsed = time.monotonic() - started
    ms = np.array(latencies) * 1e3
    return len(latencies) / elapsed, float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="tls-overhead-") as tmp:
        d = Path(tmp)
        make_certificates(d)
        async with WorkerPool(1) as pool, \
                router(d, "plain", pool.addresses[0], False) as plain, \
                router(d, "tls", pool.addresses[0], True) as secure:
            print(f"{'users':>5}  {'round':>5}  {'target':<10} {'req/s':>8} {'P50 ms':>7} "
                  f"{'P99 ms':>7}")
            for users in args.users:
                totals = {False: 0.0, True: 0.0}
                for r in range(args.rounds):
                    for tls, address in ((False, plain), (True, secure)):
                        rate, p50, p99 = await load(d, address, tls, users, args.seconds)
                        totals[tls] += rate
                        print(f"{users:>5}  {r + 1:>5}  {'TLS' if tls else 'plaintext':<10} "
                              f"{rate:>8.0f} {p50:>7.2f} {p99:>7.2f}", flush=True)
                print(f"{users:>5}  TLS / plaintext throughput: "
                      f"{totals[True] / totals[False]:.3f}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(main(parser.parse_args()))
