"""Throughput while one instance hangs: one of two real Triton workers SIGSTOPped.

    python bench/hung_instance.py [--per-try-timeout-s 1.0] [--retry] [--seconds 12]

18 closed-loop clients send ``identity`` through tritonmesh (RANDOM, two local workers,
health checks every 2 s); two seconds in, worker 0 is stopped (SIGSTOP) until the end
(SIGCONT in ``finally``). Prints requests answered and failed per second. Without a
per-try timeout every client soon has a request stuck on the stopped worker until its
own deadline (30 s here); with one, those requests end after it, and with ``--retry``
(``x-tritonmesh-retry-on: timeout``) they are answered by the other worker. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import signal
import threading
import time
from collections.abc import Coroutine
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonmesh.config import EndpointConfig, HealthCheckConfig, RoutingStrategy, VariantConfig
from tritonmesh.server import Router
from tritonmesh.workers.launcher import WorkerPool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-try-timeout-s", type=float, default=None)
    parser.add_argument("--retry", action="store_true")
    parser.add_argument("--seconds", type=int, default=12)
    parser.add_argument("--users", type=int, default=18)
    args = parser.parse_args()

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coro: Coroutine[Any, Any, None], timeout: float = 180.0) -> None:
        asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    pool = WorkerPool(2)
    run(pool.start())
    router = None
    try:
        variant = VariantConfig("v", 1.0, RoutingStrategy.RANDOM, None, tuple(pool.addresses),
                                per_try_timeout_s=args.per_try_timeout_s)
        config = EndpointConfig(listen="127.0.0.1:0", metrics_listen=None, variants=(variant,),
                                health_check=HealthCheckConfig(interval_s=2.0, timeout_s=1.0))
        router = Router(config, {"v": list(pool.addresses)})
        run(router.start())
        address = router.address
        answered: collections.Counter[int] = collections.Counter()
        failed: collections.Counter[int] = collections.Counter()
        start = time.monotonic()
        stop = start + args.seconds
        headers = {"x-tritonmesh-retry-on": "timeout"} if args.retry else None

        def user() -> None:
            with grpcclient.InferenceServerClient(address) as client:
                tensor = grpcclient.InferInput("INPUT0", [3], "FP32")
                tensor.set_data_from_numpy(np.ones(3, np.float32))
                while time.monotonic() < stop:
                    try:
                        client.infer("identity", [tensor], headers=headers, client_timeout=30)
                        answered[int(time.monotonic() - start)] += 1
                    except Exception:  # counted, whatever it was
                        failed[int(time.monotonic() - start)] += 1

        users = [threading.Thread(target=user) for _ in range(args.users)]
        for t in users:
            t.start()
        time.sleep(2.0)
        stopped = pool.workers[0].pid
        assert stopped is not None
        os.kill(stopped, signal.SIGSTOP)
        try:
            for t in users:
                t.join()
        finally:
            os.kill(stopped, signal.SIGCONT)
        seconds = range(int(time.monotonic() - start) + 1)
        print("answered per second:", [answered[s] for s in seconds])
        print("failed per second:  ", [failed[s] for s in seconds])
    finally:
        if router is not None:
            run(router.stop(grace=1.0))
        run(pool.stop(grace=5.0))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


if __name__ == "__main__":
    main()
