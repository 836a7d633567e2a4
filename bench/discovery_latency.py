"""How long DNS discovery takes: from a record appearing to its instance taking traffic, and
from a record disappearing to its instance drained and gone, under steady load.

Two real Tritons on 127.0.0.11 and 127.0.0.12 share one port (pods of a headless
Service); a real dnsmasq on loopback serves ``triton.test``; the router discovers
``triton.test:PORT``. Each cycle adds .12's record, waits until .12 has served a request,
removes it, and waits until .12 has left the router. The answer's TTL (dnsmasq
``--local-ttl``) and the variant's ``interval_s`` bound the lookup delay; the probe of a new
address and the drain of a leaving one add to it.

    python bench/discovery_latency.py --cycles 5 --ttl 1 --interval-s 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tritonclient.grpc.aio as aioclient
from tritonclient.grpc import InferInput
from tritonmesh.config import (
    EndpointConfig,
    HealthCheckConfig,
    RoutingStrategy,
    VariantConfig,
    parse_config,
)
from tritonmesh.server import Router
from tritonmesh.workers.launcher import TritonWorker, free_ports
from tritonmesh.workers.tritonserver import default_model_repository

# The tests' dnsmasq wrapper: one real DNS server, one way to drive it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from dnsmasq import Dnsmasq


async def _load(address: str, stop: asyncio.Event, outcome: dict[str, int]) -> None:
    client = aioclient.InferenceServerClient(address)
    x = InferInput("INPUT0", [4], "FP32")
    x.set_data_from_numpy(np.arange(4, dtype=np.float32))
    try:
        while not stop.is_set():
            try:
                await client.infer("identity", [x], client_timeout=10)
                outcome["ok"] += 1
            except Exception:
                outcome["failed"] += 1
    finally:
        await client.close()


async def _until(check: Callable[[], bool], timeout: float = 60.0) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise TimeoutError("discovery did not follow the records")
        await asyncio.sleep(0.005)
    return time.monotonic() - start


async def main(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="tritonmesh-discovery-bench-"))
    hosts = ["127.0.0.11", "127.0.0.12"]
    port = free_ports(1, hosts[0])[0]
    workers = []
    for i, host in enumerate(hosts):
        w = TritonWorker(i, default_model_repository(), work / f"triton-{i}.log", host=host)
        w.grpc_port = port
        w.http_port, w.metrics_port = free_ports(2, host)
        workers.append(w)
    dns = Dnsmasq(work, ttl=args.ttl)
    router = None
    stop = asyncio.Event()
    outcome = {"ok": 0, "failed": 0}
    try:
        await asyncio.gather(*(w.start(180) for w in workers))
        dns.set_hosts([(hosts[0], "triton.test")])
        dns.start()
        spec = parse_config({"variants": [{"name": "v", "discovery": {
            "dns": f"triton.test:{port}", "resolver": dns.resolver,
            "interval_s": args.interval_s}}]}).variants[0].discovery
        config = EndpointConfig(
            name="bench", listen="127.0.0.1:0", metrics_listen=None, admin_listen=None,
            variants=(VariantConfig("v", routing_strategy=RoutingStrategy.
                                    LEAST_OUTSTANDING_REQUESTS, discovery=spec),),
            health_check=HealthCheckConfig(interval_s=1.0), shutdown_grace_s=1.0)
        router = Router(config, {})
        await router.start()
        assert router.balancer is not None
        balancer = router.balancer
        users = [asyncio.create_task(_load(router.address, stop, outcome))
                 for _ in range(args.users)]
        joined, left = [], []
        second = f"{hosts[1]}:{port}"

        def served() -> bool:
            return any(i.address == second and i.requests > 0 for i in balancer.instances())

        def gone() -> bool:
            return all(i.address != second for i in balancer.instances())

        for cycle in range(args.cycles):
            dns.set_hosts([(hosts[0], "triton.test"), (hosts[1], "triton.test")])
            joined.append(await _until(served))
            dns.set_hosts([(hosts[0], "triton.test")])
            left.append(await _until(gone))
            print(json.dumps({"cycle": cycle, "join_s": round(joined[-1], 3),
                              "leave_s": round(left[-1], 3)}), flush=True)
        stop.set()
        await asyncio.gather(*users)
        print(json.dumps({
            "ttl_s": args.ttl, "interval_s": args.interval_s, "cycles": args.cycles,
            "join_s_median": round(statistics.median(joined), 3),
            "join_s_max": round(max(joined), 3),
            "leave_s_median": round(statistics.median(left), 3),
            "leave_s_max": round(max(left), 3),
            "requests_ok": outcome["ok"], "requests_failed": outcome["failed"],
        }), flush=True)
    finally:
        stop.set()
        if router is not None:
            await router.stop(grace=1.0)
        dns.stop()
        await asyncio.gather(*(w.stop(5.0) for w in workers))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--ttl", type=int, default=1, help="the records' TTL, seconds")
    parser.add_argument("--interval-s", type=float, default=5.0,
                        help="the variant's discovery interval_s")
    parser.add_argument("--users", type=int, default=4, help="closed-loop clients")
    asyncio.run(main(parser.parse_args()))
