"""How well dispatch ahead hides late binding's idle gap, seen from inside the router.

    python bench/dispatch_ahead_probe.py [--ahead-ms 5] [--instances 5] [--seconds 22]

Starts real Triton workers (the bench's timed demo model, sigma 0.75), a tritonmesh router
in a child process with LEAST_OUTSTANDING_WORK, a limit of 1, LEAST_SLACK and
``dispatch_ahead_s``, and 4 closed-loop users per instance. The router counts, and prints
at the end:

* ``sent_ahead``: requests handed to an instance while its previous request still ran;
* ``gaps``: times an instance's request ended with requests waiting and nothing sent ahead
  (the instance then idles for a round trip, as in plain late binding);
* ``lead_ms``: how long before its predecessor's end (as the router saw it) each hand-over
  came, 10th/50th/90th percentile; ideally close to ``--ahead-ms``;
* ``error_ms``: predicted minus measured time per request (from when the router sent it),
  same percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _percentiles(values: list[float]) -> list[float]:
    values = sorted(values)
    if not values:
        return []
    return [round(values[int(q * (len(values) - 1))] * 1000, 2) for q in (0.1, 0.5, 0.9)]


async def _router(config_path: str, seconds: float) -> None:
    """The child: a router whose balancer reports what dispatch ahead did."""
    from tritonmesh.config import load_config
    from tritonmesh.dispatch_ahead import DispatchAhead
    from tritonmesh.instance import Instance, InstanceState
    from tritonmesh.server import Router
    from tritonmesh.variant import Variant

    stats: dict[str, Any] = {"sent_ahead": 0, "gaps": 0, "lead": [], "error": []}
    handed: dict[Any, float] = {}
    hand_over, give_back, observe = DispatchAhead._hand_over, Variant.give_back, Instance.observe

    def counting_hand_ahead(self: Any, instance: Any) -> bool:
        sent: bool = hand_over(self, instance)
        if sent:
            stats["sent_ahead"] += 1
            handed[instance] = time.perf_counter()
        return sent

    def counting_give_back(self: Any, instance: Any, cost: float = 1.0) -> None:
        before = instance.variant.table.outstanding(instance.slot)
        if before == 2 and instance in handed:
            stats["lead"].append(time.perf_counter() - handed.pop(instance))
        elif before == 1 and instance.variant.waiters:
            stats["gaps"] += 1
        give_back(self, instance, cost)

    def counting_observe(self: Any, seconds: float, ok: bool, ahead: float = 0.0,
                         cost: float = 1.0) -> None:
        work = self.variant.work
        if work is not None and ok and self.state is InstanceState.ACTIVE:
            predicted = work.service_time(self.slot, cost)
            if predicted >= 0.0:
                stats["error"].append(predicted - seconds)
        observe(self, seconds, ok, ahead, cost)

    DispatchAhead._hand_over = counting_hand_ahead  # type: ignore[method-assign]
    Variant.give_back = counting_give_back  # type: ignore[method-assign]
    Instance.observe = counting_observe  # type: ignore[method-assign]
    config = load_config(config_path)
    router = Router(config, {v.name: list(v.instances) for v in config.variants})
    await router.start()
    await asyncio.sleep(seconds)
    await router.stop(grace=1.0)
    print(json.dumps({"sent_ahead": stats["sent_ahead"], "gaps": stats["gaps"],
                      "lead_ms": _percentiles(stats["lead"]),
                      "error_ms": _percentiles(stats["error"])}))


async def _probe(args: argparse.Namespace) -> None:
    from tritonmesh.bench.experiment import timed_repository
    from tritonmesh.bench.loadgen import Workload, run_users
    from tritonmesh.workers.launcher import WorkerPool, free_ports

    workload = Workload(sigma=0.75)
    with tempfile.TemporaryDirectory(prefix="tritonmesh-probe-") as tmp:
        repo = timed_repository(workload, Path(tmp))
        async with WorkerPool(args.instances, repo) as pool:
            address = f"127.0.0.1:{free_ports(1)[0]}"
            config = Path(tmp) / "router.yaml"
            config.write_text(
                f"listen: {address}\nmetrics_listen: null\nadmin_listen: null\n"
                "work_hints:\n  generate_unary: {input: MAX_TOKENS, base: 1}\n"
                "variants:\n  - name: AllTraffic\n"
                "    routing_strategy: LEAST_OUTSTANDING_WORK\n"
                "    max_concurrency_per_instance: 1\n    queue_order: LEAST_SLACK\n"
                f"    dispatch_ahead_s: {args.ahead_ms / 1000}\n"
                f"    instances: {list(pool.addresses)!r}\n")
            child = await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--router", str(config), str(args.seconds + 6))
            try:
                await asyncio.sleep(3)  # the router starts
                outcomes = await run_users(address, 4 * args.instances, workload,
                                           args.seconds, False)
                ok = sum(o.error is None for o in outcomes)
                print(f"requests: {ok} answered, {len(outcomes) - ok} failed",
                      sorted({o.error for o in outcomes if o.error})[:2])
                await asyncio.wait_for(child.wait(), 60)
            finally:
                if child.returncode is None:
                    child.kill()
                    await child.wait()


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--router":
        from tritonmesh.loop import run  # the router's own loop (uvloop by default)

        run(_router(sys.argv[2], float(sys.argv[3])))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ahead-ms", type=float, default=5.0)
    parser.add_argument("--instances", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=22.0)
    asyncio.run(_probe(parser.parse_args()))


if __name__ == "__main__":
    main()
