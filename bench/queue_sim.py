"""The queueing model behind late binding's queue orders: FIFO, LEAST_SLACK and the orders
between and beyond them, and how much one bench cell's P99 moves by chance.

    python bench/queue_sim.py [--jobs 150000] [--sigma 1.0 1.5]
    python bench/queue_sim.py --sweep --sigma 0.75 --scale 4/1 20/5
    python bench/queue_sim.py --cells --sigma 0.75 --scale 4/1 20/5 --cell-seconds 30
    python bench/queue_sim.py --hints --sigma 1.0 --scale 20/5 80/20 --noise 0 0.35 0.7 1 inf
    python bench/queue_sim.py --ahead --sigma 1.0 --scale 20/5 80/20 --noise 0 0.7 inf

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


MEDIAN_TOKENS = 40
_MIN_FIT = 100


def _service(tokens: float) -> float:
    return (32 * 0.05 + tokens * 2.0) / 1000


class _Requests:
    """The workload's requests and what the router predicts of them.

    Each request has a service time and a hint of its length: exact (``noise`` 0, an
    oracle), the length times lognormal(0, ``noise``) (drawn from a generator of its own, so
    every noise level serves the same requests), or none (``noise`` inf: every hint alike).
    ``shrink``: "none" reads the hint as it is; "known" shrinks its logarithm toward the
    median by rho^2 = sigma^2 / (sigma^2 + noise^2), the posterior mean of the log length
    given the hint (an oracle of the hint's quality, not of the length); "learned" fits that
    line online, least squares of log length on log hint over the requests finished so far,
    as a router can (it sees each hint and each service time).
    """

    def __init__(self, sigma: float, seed: int, noise: float, shrink: str):
        self.sigma, self.noise, self.shrink = sigma, noise, shrink
        self.rng = random.Random(seed)
        self.blur = random.Random(seed + 2)
        self.log_median = math.log(MEDIAN_TOKENS)
        # n and the sums of x, y, xx, xy, yy (x: log hint, y: log length of finished requests)
        self.fit = [0.0] * 6

    def draw(self) -> tuple[float, float]:
        """A request: its service time and the log of its hint."""
        tokens = min(max(round(MEDIAN_TOKENS * math.exp(self.rng.gauss(0.0, self.sigma))), 1),
                     2000)
        if math.isinf(self.noise):
            return _service(tokens), self.log_median
        error = self.blur.gauss(0.0, self.noise) if self.noise else 0.0
        return _service(tokens), math.log(tokens) + error

    def predict(self, x: float) -> float:
        """The service time expected of a request whose log hint is ``x``."""
        if self.shrink == "known":
            rho2 = self.sigma**2 / (self.sigma**2 + self.noise**2)
            x = self.log_median + rho2 * (x - self.log_median)
        elif self.shrink == "learned":
            n, sx, sy, sxx, sxy, _ = self.fit
            if n > 1:
                var = sxx / n - (sx / n) ** 2
                slope = (sxy / n - sx / n * sy / n) / var if var > 1e-9 else 0.0
                x = sy / n + slope * (x - sx / n)
        return _service(math.exp(x))

    def learn(self, s: float, x: float) -> None:
        y = math.log(max((s * 1000 - 32 * 0.05) / 2.0, 1e-3))  # log tokens, from the time
        for k, v in enumerate((1.0, x, y, x * x, x * y, y * y)):
            self.fit[k] += v

    def residual_sd(self) -> float:
        """The spread of log length around the line fitted on log hint, learned online:
        0 for an exact hint, sigma for none; inf until ``_MIN_FIT`` requests have finished
        (a few alike would look like a perfect hint)."""
        n, sx, sy, sxx, sxy, syy = self.fit
        if n < _MIN_FIT:
            return math.inf
        var_x = sxx / n - (sx / n) ** 2
        var_y = syy / n - (sy / n) ** 2
        cov = sxy / n - sx / n * sy / n
        explained = cov * cov / var_x if var_x > 1e-9 else 0.0
        return math.sqrt(max(var_y - explained, 0.0))


def trace(weight: float, users: int, instances: int, jobs: int, sigma: float,
          seed: int = 1, placement: str = "central", noise: float = 0.0,
          shrink: str = "none") -> list[tuple[float, float]]:
    """(completion time, response time) of each request, in completion order.

    ``placement``: "central" is one queue in the router served lowest key first (late
    binding, HAProxy ``maxconn 1``); "random" and "least" commit each request to an
    instance's own FIFO queue on arrival, at random or to the fewest outstanding (ties at
    random): RANDOM and LEAST_OUTSTANDING_REQUESTS with Triton queueing.

    The central queue's key reads the service time predicted from each request's hint
    (``noise`` and ``shrink``: see :class:`_Requests`).
    """
    requests = _Requests(sigma, seed, noise, shrink)
    chooser = random.Random(seed + 1)
    # Each queued or running request: (arrival, service, log hint).
    central: list[tuple[float, int, tuple[float, float, float]]] = []  # key, seq, request
    local: list[list[tuple[float, float, float]]] = [[] for _ in range(instances)]
    outstanding = [0] * instances
    running: list[tuple[float, int, tuple[float, float, float]]] = []  # finish, i, request
    idle = list(range(instances))
    sequence = 0
    done: list[tuple[float, float]] = []

    def arrive(now: float) -> None:
        nonlocal sequence
        s, x = requests.draw()
        request = (now, s, x)
        if placement == "central":
            heapq.heappush(central, (now - weight * requests.predict(x), sequence, request))
            sequence += 1
            return
        if placement == "random":
            i = chooser.randrange(instances)
        else:
            fewest = min(outstanding)
            i = chooser.choice([j for j, n in enumerate(outstanding) if n == fewest])
        outstanding[i] += 1
        local[i].append(request)

    def start(now: float) -> None:
        for i in list(idle):
            if placement == "central":
                if not central:
                    return
                request = heapq.heappop(central)[2]
            elif local[i]:
                request = local[i].pop(0)
            else:
                continue
            idle.remove(i)
            heapq.heappush(running, (now + request[1], i, request))

    for _ in range(users):
        arrive(0.0)
    start(0.0)
    while len(done) < jobs:
        now, i, (arrival, s, x) = heapq.heappop(running)
        idle.append(i)
        if placement != "central":
            outstanding[i] -= 1
        requests.learn(s, x)
        done.append((now, now - arrival))
        arrive(now)
        start(now)
    return done[jobs // 10:]


def trace_ahead(weight: float, users: int, instances: int, jobs: int, sigma: float,
                seed: int = 1, noise: float = 0.0, shrink: str = "none", rtt: float = 0.0,
                ahead: float = 0.0, gate: float = math.inf) -> list[tuple[float, float]]:
    """Like :func:`trace` with one central queue, plus the hand-over's round trip and
    dispatch ahead: a request handed to an instance from the router's queue starts ``rtt``
    seconds later (the instance idles meanwhile); with ``ahead`` > 0, ``ahead`` seconds
    before an instance's running request is *predicted* to end, the head of the queue is
    sent there at once and starts as soon as both it has arrived and the running one has
    ended. A prediction that is too short strands that request behind a long one.
    ``gate``: send ahead only while the hint's learned residual spread
    (:meth:`_Requests.residual_sd`) is at most this."""
    requests = _Requests(sigma, seed, noise, shrink)
    central: list[tuple[float, int, tuple[float, float, float]]] = []  # key, seq, request
    # time, instance, run (-1: its request ends; else an ahead timer), seq. Ends at one time
    # go in instance order, as in trace().
    events: list[tuple[float, int, int, int]] = []
    run = [0] * instances  # which run an ahead timer belongs to
    idle = list(range(instances))
    running: list[tuple[float, float, float] | None] = [None] * instances
    committed: list[tuple[float, tuple[float, float, float]] | None] = [None] * instances
    queued = timed = 0
    done: list[tuple[float, float]] = []

    def begin(i: int, t: float, request: tuple[float, float, float]) -> None:
        nonlocal timed
        running[i] = request
        run[i] += 1
        heapq.heappush(events, (t + request[1], i, -1, timed))
        timed += 1
        if ahead > 0:
            at = max(t, t + requests.predict(request[2]) - ahead)
            heapq.heappush(events, (at, i, run[i], timed))
            timed += 1

    def arrive(now: float) -> None:
        nonlocal queued
        s, x = requests.draw()
        heapq.heappush(central, (now - weight * requests.predict(x), queued, (now, s, x)))
        queued += 1

    def start(now: float) -> None:
        for i in list(idle):
            if not central:
                return
            idle.remove(i)
            begin(i, now + rtt, heapq.heappop(central)[2])

    for _ in range(users):
        arrive(0.0)
    start(0.0)
    while len(done) < jobs:
        now, i, kind, _ = heapq.heappop(events)
        if kind >= 0:  # an ahead timer
            if kind == run[i] and committed[i] is None and central \
                    and requests.residual_sd() <= gate:
                committed[i] = (now, heapq.heappop(central)[2])
            continue
        request = running[i]
        assert request is not None
        arrival, s, x = request
        requests.learn(s, x)
        done.append((now, now - arrival))
        running[i] = None
        nxt = committed[i]
        if nxt is not None:
            committed[i] = None
            begin(i, max(now, nxt[0] + rtt), nxt[1])
        else:
            idle.append(i)
        arrive(now)
        start(now)
    return done[jobs // 10:]


def quantile(ordered: list[float], p: float) -> float:
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def simulate(weight: float, users: int, instances: int, jobs: int, sigma: float,
             seed: int = 1, noise: float = 0.0, shrink: str = "none") -> dict[str, float]:
    measured = sorted(r for _, r in trace(weight, users, instances, jobs, sigma, seed,
                                          noise=noise, shrink=shrink))
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


HINT_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)


def hints(users: int, instances: int, jobs: int, sigma: float, noise: float,
          seeds: int = 3) -> dict[str, object]:
    """Late binding's order when the hint is noisy: P99 over FIFO's (the mean over
    ``seeds`` draws) for each weight with the hint read as it is, and at weight 1 with the
    hint shrunk by its known quality (an oracle of quality, not of length) and by the
    quality learned online."""
    def ratio(weight: float, shrink: str) -> float:
        total = 0.0
        for seed in range(1, seeds + 1):
            fifo = simulate(0.0, users, instances, jobs, sigma, seed)["p99_s"]
            total += simulate(weight, users, instances, jobs, sigma, seed, noise,
                              shrink)["p99_s"] / fifo
        return round(total / seeds, 3)

    raw = {w: ratio(w, "none") for w in HINT_WEIGHTS[1:]}
    best = min(raw, key=lambda w: raw[w])
    return {"users": users, "instances": instances, "sigma": sigma,
            "noise": "none" if math.isinf(noise) else noise,
            "raw_hint_p99_vs_fifo": raw, "raw_best_weight": best,
            "known_shrink_w1_p99_vs_fifo": ratio(1.0, "known"),
            "learned_shrink_w1_p99_vs_fifo": ratio(1.0, "learned")}


AHEAD_POLICIES = (("late binding", 0.0, math.inf), ("ahead", 0.01, math.inf),
                  ("ahead, gated", 0.01, 0.2))


def ahead_table(users: int, instances: int, jobs: int, sigma: float, noise: float,
                rtt: float, seeds: int = 3) -> dict[str, object]:
    """Dispatch ahead against plain late binding (both with the hand-over's round trip
    ``rtt``), FIFO and LEAST_SLACK order, for one hint quality: P99 and throughput over
    FIFO late binding's, mean of ``seeds`` draws."""
    rows: dict[str, dict[str, float]] = {}
    for weight in (0.0, 1.0):
        for name, lead, gate in AHEAD_POLICIES:
            p99 = tput = 0.0
            for seed in range(1, seeds + 1):
                base = trace_ahead(0.0, users, instances, jobs, sigma, seed, noise, rtt=rtt)
                done = trace_ahead(weight, users, instances, jobs, sigma, seed, noise, rtt=rtt,
                                   ahead=lead, gate=gate)
                p99 += _p99(done) / _p99(base)
                tput += _throughput(done) / _throughput(base)
            rows[f"{'FIFO' if weight == 0 else 'LEAST_SLACK'}, {name}"] = {
                "p99_vs_fifo_late_binding": round(p99 / seeds, 3),
                "throughput_vs": round(tput / seeds, 4)}
    return {"users": users, "instances": instances, "sigma": sigma,
            "noise": "none" if math.isinf(noise) else noise, "rtt_s": rtt, "policies": rows}


def _p99(done: list[tuple[float, float]]) -> float:
    return quantile(sorted(r for _, r in done), 0.99)


def _throughput(done: list[tuple[float, float]]) -> float:
    return len(done) / (done[-1][0] - done[0][0])


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
    what.add_argument("--hints", action="store_true",
                      help="P99 over FIFO's with noisy hints (--noise), raw and shrunk")
    what.add_argument("--ahead", action="store_true",
                      help="dispatch ahead (gated or not) against late binding, per --noise")
    parser.add_argument("--rtt-ms", type=float, default=1.0,
                        help="--ahead: the hand-over's round trip, milliseconds")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.35, 0.7, 1.0],
                        help="--hints: sigma of the hint's lognormal error (inf: no hint)")
    parser.add_argument("--seeds", type=int, default=3, help="--hints: draws averaged")
    parser.add_argument("--cell-seconds", type=float, default=30.0)
    args = parser.parse_args()
    rows: list[dict[str, object]] = []
    for sigma in args.sigma:
        for users, instances in args.scale:
            if args.sweep:
                rows.append(sweep(users, instances, args.jobs, sigma))
            elif args.cells:
                rows.append(cells(users, instances, args.jobs, sigma, args.cell_seconds))
            elif args.ahead:
                rows += [ahead_table(users, instances, args.jobs, sigma, noise,
                                     args.rtt_ms / 1000, args.seeds) for noise in args.noise]
            elif args.hints:
                rows += [hints(users, instances, args.jobs, sigma, noise, args.seeds)
                         for noise in args.noise]
            else:
                fifo = simulate(0.0, users, instances, args.jobs, sigma)
                slack = simulate(1.0, users, instances, args.jobs, sigma)
                rows.append({"sigma": sigma, "users": users, "instances": instances,
                             "fifo": fifo, "least_slack": slack,
                             "p99_ratio": round(slack["p99_s"] / fifo["p99_s"], 2)})
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
