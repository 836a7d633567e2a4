"""What TLS on the router's port costs, on each data path: the `identity` model through
routers on ``data_path: grpc`` and ``native``, each plaintext and over TLS, side by side,
interleaved, in one run.

    python bench/tls_overhead.py --users 1 8 --seconds 10 --rounds 3 [--data-path grpc native]

Certificates (ECDSA P-256) are made with openssl in a temporary directory; one real Triton
worker serves every router (plaintext upstream), so the difference is the client-side hop
only. The load is h2load (nghttp2-client), as in bench/native_overhead.py, whose router and
load this reuses: over TLS it negotiates h2 by ALPN. Printed per target: req/s, P50, P99
and the router process's CPU µs per request (its connections and TLS handshakes are made in
h2load's one-second warm-up, whose CPU is counted too: every target alike). Loopback only;
it ends by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from native_overhead import body, load, router
from tritonmesh.workers.launcher import WorkerPool

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


async def main(args: argparse.Namespace) -> None:
    if shutil.which("h2load") is None:
        sys.exit("h2load is missing: apt-get install nghttp2-client")
    with tempfile.TemporaryDirectory(prefix="tls-overhead-") as tmp:
        d = Path(tmp)
        make_certificates(d)
        (d / "body.bin").write_bytes(body())
        async with WorkerPool(1) as pool, contextlib.AsyncExitStack() as stack:
            targets = {}
            for data_path in args.data_path:
                for tls in (False, True):
                    address, pid = await stack.enter_async_context(
                        router(d, data_path, pool.addresses[0], tls=tls))
                    targets[(data_path, tls)] = (address, pid)
            print(f"{'users':>5} {'round':>5}  {'target':<16} {'req/s':>7} {'P50 ms':>7} "
                  f"{'P99 ms':>7} {'router CPU µs/req':>18}")
            for users in args.users:
                sums = {target: [0.0, 0.0] for target in targets}
                for r in range(args.rounds):
                    for (data_path, tls), (address, pid) in targets.items():
                        rate, p50, p99, cpu = await load(d, address, users, args.seconds, pid,
                                                         tls=tls)
                        sums[(data_path, tls)][0] += rate
                        sums[(data_path, tls)][1] += cpu or 0.0
                        name = f"{data_path} {'TLS' if tls else 'plaintext'}"
                        print(f"{users:>5} {r + 1:>5}  {name:<16} {rate:>7.0f} {p50:>7.2f} "
                              f"{p99:>7.2f} {cpu or 0.0:>18.0f}", flush=True)
                for data_path in args.data_path:
                    (plain_rate, plain_cpu), (tls_rate, tls_cpu) = (
                        sums[(data_path, False)], sums[(data_path, True)])
                    print(f"{users:>5} {data_path}: TLS / plaintext throughput "
                          f"{tls_rate / plain_rate:.2f}x, CPU per request "
                          f"{tls_cpu / plain_cpu:.2f}x (+{(tls_cpu - plain_cpu) / args.rounds:.0f}"
                          " µs)", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data-path", nargs="+", choices=("grpc", "native"),
                        default=["grpc", "native"])
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(main(parser.parse_args()))
