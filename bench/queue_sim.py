"""The queueing model behind late binding's queue orders: FIFO against LEAST_SLACK.

    python bench/queue_sim.py [--jobs 150000] [--sigma 1.0 1.5]

A discrete-event simulation of `tritonmesh bench`'s workload with no router in it: U
closed-loop users (no think time), K instances that serve one request at a time, one
central queue (late binding with a limit of 1, or HAProxy's maxconn 1), request sizes
drawn as in router/bench/loadgen.py (lognormal tokens, median 40, clipped to 1..2000;
service = 32 x 0.05 ms + tokens x 2 ms). Prints JSON: P50/P90/P99/max and mean response
time per scale point and order. The first 10% of completions are warm-up.

FIFO serves the oldest request; LEAST_SLACK the lowest ``arrival + budget - service``
(the same budget for all, so the budget drops out). Since the loop is closed and the
instances never idle, the mean response time is the same under any order (Little's law):
an order that lowered the mean would be hiding requests it starved.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random

SCALES = ((4, 1), (20, 5), (40, 10), (60, 15), (80, 20))


def simulate(order: str, users: int, instances: int, jobs: int, sigma: float,
             seed: int = 1) -> dict[str, float]:
    rng = random.Random(seed)

    def service() -> float:
        tokens = min(max(round(40 * math.exp(rng.gauss(0.0, sigma))), 1), 2000)
        return (32 * 0.05 + tokens * 2.0) / 1000

    queue: list[tuple[float, int, float, float]] = []  # (key, seq, arrival, service)
    running: list[tuple[float, float]] = []  # (finish, arrival)
    sequence = 0
    free = instances
    latencies: list[float] = []

    def arrive(now: float) -> None:
        nonlocal sequence
        s = service()
        key = now if order == "FIFO" else now - s
        heapq.heappush(queue, (key, sequence, now, s))
        sequence += 1

    def start(now: float) -> None:
        nonlocal free
        while free and queue:
            _, _, arrival, s = heapq.heappop(queue)
            free -= 1
            heapq.heappush(running, (now + s, arrival))

    for _ in range(users):
        arrive(0.0)
    start(0.0)
    while len(latencies) < jobs:
        now, arrival = heapq.heappop(running)
        free += 1
        latencies.append(now - arrival)
        arrive(now)
        start(now)
    measured = sorted(latencies[jobs // 10:])

    def q(p: float) -> float:
        return round(measured[int(p * len(measured))], 3)

    return {"p50_s": q(0.5), "p90_s": q(0.9), "p99_s": q(0.99), "max_s": round(measured[-1], 3),
            "mean_s": round(sum(measured) / len(measured), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=150_000)
    parser.add_argument("--sigma", type=float, nargs="+", default=[1.0, 1.5])
    args = parser.parse_args()
    rows = []
    for sigma in args.sigma:
        for users, instances in SCALES:
            fifo = simulate("FIFO", users, instances, args.jobs, sigma)
            slack = simulate("LEAST_SLACK", users, instances, args.jobs, sigma)
            rows.append({"sigma": sigma, "users": users, "instances": instances,
                         "fifo": fifo, "least_slack": slack,
                         "p99_ratio": round(slack["p99_s"] / fifo["p99_s"], 2)})
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
