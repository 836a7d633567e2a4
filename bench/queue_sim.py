"""The queueing model behind late binding's queue orders: FIFO, LEAST_SLACK and the orders
between and beyond them, and how much one bench cell's P99 moves by chance.

    python bench/queue_sim.py [--jobs 150000] [--sigma 1.0 1.5]
    python bench/queue_sim.py --sweep --sigma 0.75 --scale 4/1 20/5
    python bench/queue_sim.py --cells --sigma 0.75 --scale 4/1 20/5 --cell-seconds 30

A discrete-event simulation of `tritonmesh bench`'s workload with no router in it: U
closed-loop users (no think time), K instances that serve one request at a time, one
central queue (late binding with a limit of 1, or HAProxy's maxconn 1), request sizes
drawn as in router/bench/loadgen.py (lognormal tokens, median 40, clipped to 1..2000;
service = 32 x 0.05 ms + tokens x 2 ms). Prints JSON. The first 10% of completions are
warm-up.

Every order here serves the lowest ``arrival - weight x service``: weight 0 is FIFO, 1 is
LEAST_SLACK (``arrival + budget - service`` with the same budget for all, so the budget
drops out), above 1 favours long requests more, below 0 favours short ones (shortest first
with ageing). Since the loop is closed and the instances never idle, the mean response
time is the same under any order (Little's law): an order that lowered the mean would be
hiding requests it starved, so ``--sweep`` prints the mean beside each P99.

``--sweep`` answers "could any order do better?": at 4 users / 1 instance no weight brings
the P99 to 0.9 x FIFO's, because with one instance and at most three requests waiting
every order trades the long requests' wait against the short ones' and the P99 holds
both. ``--cells`` answers "how far apart can two bench cells land by chance?": it cuts long
traces into windows as long as a bench cell and prints the spread of the windows' P99
ratios, FIFO against itself and LEAST_OUTSTANDING_REQUESTS (requests committed to an
instance's own queue on arrival) against RANDOM.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random

SCALES = ((4, 1), (20, 5), (40, 10), (60, 15), (80, 20))
SWEEP_WEIGHTS = (-2.0, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)


def trace(weight: float, users: int, instances: int, jobs: int, sigma: float,
          seed: int = 1, placement: str = "central") -> list[tuple[float, float]]:
    """(completion time, response time) of each request, in completion order.

    ``placement``: "central" is one queue in the router served lowest key first (late
    binding, HAProxy ``maxconn 1``); "random" and "least" commit each request to an
    instance's own FIFO queue on arrival, at random or to the fewest outstanding (ties at
    random): RANDOM and LEAST_OUTSTANDING_REQUESTS with Triton queueing.
    """
    rng = random.Random(seed)
    chooser = random.Random(seed + 1)

    def service() -> float:
        tokens = min(max(round(40 * math.exp(rng.gauss(0.0, sigma))), 1), 2000)
        return (32 * 0.05 + tokens * 2.0) / 1000

    central: list[tuple[float, int, float, float]] = []  # (key, seq, arrival, service)
    local: list[list[tuple[float, float]]] = [[] for _ in range(instances)]  # FIFO each
    outstanding = [0] * instances
    running: list[tuple[float, int, float]] = []  # (finish, instance, arrival)
    idle = list(range(instances))
    sequence = 0
    done: list[tuple[float, float]] = []

    def arrive(now: float) -> None:
        nonlocal sequence
        s = service()
        if placement == "central":
            heapq.heappush(central, (now - weight * s, sequence, now, s))
            sequence += 1
            return
        if placement == "random":
            i = chooser.randrange(instances)
        else:
            fewest = min(outstanding)
            i = chooser.choice([j for j, n in enumerate(outstanding) if n == fewest])
        outstanding[i] += 1
        local[i].append((now, s))

    def start(now: float) -> None:
        for i in list(idle):
            if placement == "central":
                if not central:
                    return
                _, _, arrival, s = heapq.heappop(central)
            elif local[i]:
                arrival, s = local[i].pop(0)
            else:
                continue
            idle.remove(i)
            heapq.heappush(running, (now + s, i, arrival))

    for _ in range(users):
        arrive(0.0)
    start(0.0)
    while len(done) < jobs:
        now, i, arrival = heapq.heappop(running)
        idle.append(i)
        if placement != "central":
            outstanding[i] -= 1
        done.append((now, now - arrival))
        arrive(now)
        start(now)
    return done[jobs // 10:]


def quantile(ordered: list[float], p: float) -> float:
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def simulate(weight: float, users: int, instances: int, jobs: int, sigma: float,
             seed: int = 1) -> dict[str, float]:
    measured = sorted(r for _, r in trace(weight, users, instances, jobs, sigma, seed))
    return {"p50_s": round(quantile(measured, 0.5), 3), "p90_s": round(quantile(measured, 0.9), 3),
            "p99_s": round(quantile(measured, 0.99), 3), "max_s": round(measured[-1], 3),
            "mean_s": round(sum(measured) / len(measured), 3)}


def sweep(users: int, instances: int, jobs: int, sigma: float) -> dict[str, object]:
    fifo = simulate(0.0, users, instances, jobs, sigma)
    rows = []
    for weight in SWEEP_WEIGHTS:
        result = simulate(weight, users, instances, jobs, sigma)
        rows.append({"weight": weight, "p99_s": result["p99_s"], "mean_s": result["mean_s"],
                     "p99_vs_fifo": round(result["p99_s"] / fifo["p99_s"], 3)})
    best = min(rows, key=lambda r: r["p99_vs_fifo"])
    return {"users": users, "instances": instances, "sigma": sigma, "orders": rows,
            "best_weight": best["weight"], "best_p99_vs_fifo": best["p99_vs_fifo"]}


def _window_p99s(done: list[tuple[float, float]], seconds: float) -> dict[int, float]:
    windows: dict[int, list[float]] = {}
    for end, response in done:
        windows.setdefault(int(end // seconds), []).append(response)
    full = sorted(windows)[1:-1]  # the first and last window are partial
    return {w: quantile(sorted(windows[w]), 0.99) for w in full}


def _spread(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {f"p{q}": round(quantile(ordered, q / 100), 3) for q in (5, 50, 95)}


def cells(users: int, instances: int, jobs: int, sigma: float,
          cell_seconds: float) -> dict[str, object]:
    """What one bench cell's P99 does by chance. Two ratios, window by window over long
    traces cut into cells: FIFO against itself a cell later (the same schedule, so any
    distance from 1 is the draw), and LEAST_OUTSTANDING_REQUESTS against RANDOM in the same
    window of two traces drawn from one seed (the issue's 0.67 bar; their throughputs
    differ, so a window holds different requests in each)."""
    fifo = _window_p99s(trace(0.0, users, instances, jobs, sigma), cell_seconds)
    p99s = [fifo[w] for w in sorted(fifo)]
    if len(p99s) < 2:
        raise SystemExit(f"{len(p99s)} full cell(s) of {cell_seconds:g} s: raise --jobs")
    pairs = len(p99s) // 2
    same = [p99s[2 * k] / p99s[2 * k + 1] for k in range(pairs)]
    least = _window_p99s(trace(0.0, users, instances, jobs, sigma, placement="least"),
                         cell_seconds)
    rand = _window_p99s(trace(0.0, users, instances, jobs, sigma, placement="random"),
                        cell_seconds)
    lor_random = [least[w] / rand[w] for w in sorted(set(least) & set(rand))]
    return {"users": users, "instances": instances, "sigma": sigma,
            "cell_seconds": cell_seconds, "cells": len(p99s),
            "fifo_cell_p99_s": _spread(p99s),
            "fifo_over_fifo": _spread(same),
            "fifo_over_fifo_at_or_below_0.9": round(sum(r <= 0.9 for r in same) / len(same), 3),
            "lor_over_random": _spread(lor_random),
            "lor_over_random_above_0.67": round(sum(r > 0.67 for r in lor_random)
                                                / len(lor_random), 3)}


def _scale(text: str) -> tuple[int, int]:
    users, instances = text.split("/")
    return int(users), int(instances)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=150_000)
    parser.add_argument("--sigma", type=float, nargs="+", default=[1.0, 1.5])
    parser.add_argument("--scale", type=_scale, nargs="+", default=list(SCALES),
                        metavar="USERS/INSTANCES")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--sweep", action="store_true",
                      help="P99 of every order weight against FIFO's")
    what.add_argument("--cells", action="store_true",
                      help="spread of one cell's P99 under FIFO, cell by cell")
    parser.add_argument("--cell-seconds", type=float, default=30.0)
    args = parser.parse_args()
    rows: list[dict[str, object]] = []
    for sigma in args.sigma:
        for users, instances in args.scale:
            if args.sweep:
                rows.append(sweep(users, instances, args.jobs, sigma))
            elif args.cells:
                rows.append(cells(users, instances, args.jobs, sigma, args.cell_seconds))
            else:
                fifo = simulate(0.0, users, instances, args.jobs, sigma)
                slack = simulate(1.0, users, instances, args.jobs, sigma)
                rows.append({"sigma": sigma, "users": users, "instances": instances,
                             "fifo": fifo, "least_slack": slack,
                             "p99_ratio": round(slack["p99_s"] / fifo["p99_s"], 2)})
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
