"""Autoscaling demo: a load ramp against local workers that scale (docs/metrics.md).

    python bench/autoscale_demo.py [--step-s 15] [--out docs/img/autoscale.png]

Starts an endpoint whose variant has ``local_workers: {min: 1, max: 3,
target_concurrency: 2, scale_out_cooldown_s: 3, scale_in_cooldown_s: 6}`` and runs closed-loop
clients sending ``generate_unary`` (10 tokens, 50 ms in a worker that runs one request at a
time) in steps of 1, 2, 4, 6, 6, 3, 1 clients. Each second it records the clients, the workers
and the P99 of the requests that ended in that second; prints the table, and plots it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonmesh.autoscale_config import Autoscaling
from tritonmesh.config import EndpointConfig, HealthCheckConfig, LocalWorkers, VariantConfig
from tritonmesh.endpoint import open_endpoint
from tritonmesh.loop import new_event_loop

STEPS = (1, 2, 4, 6, 6, 3, 1)


def _inputs() -> list[Any]:
    tensors = []
    for name, value in (("PROMPT_TOKENS", 1), ("MAX_TOKENS", 10)):
        t = grpcclient.InferInput(name, [1], "INT32")
        t.set_data_from_numpy(np.array([value], dtype=np.int32))
        tensors.append(t)
    return tensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step-s", type=float, default=15.0)
    parser.add_argument("--out", default="docs/img/autoscale.png")
    args = parser.parse_args()
    loop = new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def run(coro: Any, timeout: float = 300.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    spec = Autoscaling(min=1, max=3, target_concurrency=2, scale_out_cooldown_s=3.0,
                       scale_in_cooldown_s=6.0, interval_s=0.5)
    config = EndpointConfig(
        name="demo", listen="127.0.0.1:0", metrics_listen=None, admin_listen=None,
        variants=(VariantConfig("AllTraffic", local_workers=LocalWorkers(1, None, spec),
                                slow_start_s=0.0),),
        health_check=HealthCheckConfig(interval_s=0.5, timeout_s=1.0), shutdown_grace_s=1.0)
    stack = contextlib.AsyncExitStack()
    router = run(stack.enter_async_context(open_endpoint(config)))
    scaler = router.autoscalers[0]
    ended: list[tuple[float, float]] = []  # (end time, latency)
    failures: list[BaseException] = []
    stops: list[threading.Event] = []

    def client(stop: threading.Event) -> None:
        with grpcclient.InferenceServerClient(router.address) as c:
            while not stop.is_set():
                start = time.monotonic()
                try:
                    c.infer("generate_unary", _inputs(), client_timeout=60)
                except Exception as exc:  # counted and shown
                    failures.append(exc)
                    continue
                now = time.monotonic()
                ended.append((now, now - start))

    rows = []
    t0 = time.monotonic()
    try:
        for clients in STEPS:
            while len(stops) < clients:
                stops.append(threading.Event())
                threading.Thread(target=client, args=(stops[-1],), daemon=True).start()
            while len(stops) > clients:
                stops.pop().set()
            step_end = time.monotonic() + args.step_s
            while time.monotonic() < step_end:
                time.sleep(1.0)
                now = time.monotonic()
                recent = [lat for end, lat in ended if end > now - 1.0]
                p99 = float(np.percentile(recent, 99)) if recent else float("nan")
                rows.append((now - t0, clients, scaler.workers, p99 * 1000, len(recent)))
                print(f"{now - t0:6.1f} s  clients {clients}  workers {scaler.workers}  "
                      f"P99 {p99 * 1000:7.1f} ms  {len(recent)} req/s", flush=True)
        for stop in stops:
            stop.set()
        time.sleep(3 * spec.scale_in_cooldown_s)
    finally:
        run(stack.aclose())
    print(f"failed requests: {len(failures)}; scaled out {scaler.scaled_out}, "
          f"in {scaler.scaled_in}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, c, w, p99, _ = (np.array(col) for col in zip(*rows, strict=True))
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 5))
    top.step(t, c, where="post", label="clients")
    top.step(t, w, where="post", label="workers")
    top.set_ylabel("count")
    top.legend()
    bottom.plot(t, p99)
    bottom.set_ylabel("P99 (ms)")
    bottom.set_xlabel("seconds")
    fig.suptitle("local_workers autoscaling: min 1, max 3, target_concurrency 2")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
