"""ns per pick+release pair: the shared-memory table against the private outstanding table.

    python bench/shared_bench.py [--rounds N]

Prints JSON. For each strategy and size (4/64/1024 instances, half of them holding one
request, so every least-outstanding pick breaks a tie among the other half; every weight 1,
and more for ``pick``: every weight 1 with one instance in 128 idle (at least one; at 1,024
instances the pick's draws by rejection nearly always miss and the row's snapshot decides),
one instance in slow start (weight 0.3 of 1, a slot the pick reads beside the index),
weights 1 and 2 alternating (two weight classes), and weights 1 to 4 in turn (four
classes)), side by side
in one process: the private compiled ``OutstandingTable`` and the compiled ``SharedTable``,
"from_python" (the pair called from a Python loop) and "in_c" (the pair in a C loop: the
structure alone), "adapter" (the pair through ``SharedCounts`` as a router process calls
it, with its checks that it knows the slot and may use it: what a router pays), and the
shared twin from Python for scale. Then
"contended": two processes running the C loop on one shared table at once (started
together), each one's ns per pair against the same loop alone. Every figure is the best of
5 runs, in CPU time of the process (``time.process_time_ns``): on a shared machine, time spent
preempted is not the table's. The C loops of the private and the shared table run in turn, one
run each, five times, so that both see the same load; ``--baseline SO`` adds a third in the
turn, another build's ``_shared_c`` extension (say main's), for a before/after on one machine
at one time. The goal (issue 15): shared <= 2x private.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import platform
import time
import uuid
from collections.abc import Callable
from typing import Any

from tritonmesh._core import COutstandingTable, CSharedTable, PySharedTable
from tritonmesh.sharedcounts import SharedCounts

SIZES = (4, 64, 1024)
STRATEGIES = ("pick", "pick_random", "pick_two")
# (strategy, weights): every weight 1; every weight 1, one instance in 128 idle; 1 but the
# last instance, in slow start (0.3 of the way); 1 and 2 alternating; 1, 2, 3, 4 in turn
EVEN, FEW_IDLE, SLOW_START = "1", "1, one in 128 idle", "1, one in slow start"
ALTERNATING, SPREAD = "1 and 2", "1 to 4 spread"
CASES = (("pick", EVEN), ("pick_random", EVEN), ("pick_two", EVEN), ("pick", FEW_IDLE),
         ("pick", SLOW_START), ("pick", ALTERNATING), ("pick", SPREAD))


def _weight(i: int, weights: str) -> float:
    if weights == ALTERNATING:
        return 2.0 if i % 2 else 1.0
    return float(i % 4 + 1) if weights == SPREAD else 1.0


def _load(t: Any, n: int, weights: str = EVEN) -> Any:
    for i in range(n):
        t.add(_weight(i, weights))
    if weights == SLOW_START:
        t.set_weight(n - 1, 0.3)
    for _ in range(n - max(n // 128, 1) if weights == FEW_IDLE else n // 2):
        t.pick()
    return t


def _best_ns(run: Callable[[], object], rounds: int) -> float:
    best = float("inf")
    for _ in range(5):
        start = time.process_time_ns()
        run()
        best = min(best, (time.process_time_ns() - start) / rounds)
    return best


def from_python(t: Any, strategy: str, rounds: int) -> float:
    strategy_pick = getattr(t, strategy)

    # Defaults make the callables locals of the loop, as in the router's hot path.
    def run(pick: Any = strategy_pick, release: Any = t.release) -> None:
        for _ in range(rounds):
            release(pick())

    return _best_ns(run, rounds)


def through_adapter(owner: Any, strategy: str, rounds: int) -> float:
    """The pair through a router process's ``SharedCounts`` (process index 2), which knows
    every slot."""
    table = CSharedTable.attach(owner.name, 2, seed=3)  # type: ignore[union-attr]
    try:
        counts = SharedCounts(table, owner=False)
        for slot, *_ in table.snapshot():
            counts.learn(slot, table.generation(slot))
        return from_python(counts, strategy, rounds)
    finally:
        table.close()


def in_c_in_turn(runs: dict[str, tuple[Any, Any, int]], strategy: str) -> dict[str, float]:
    """``runs``: name -> (the C loop, its table, rounds); each run once in turn, five times;
    the best ns per pair of each."""
    best = dict.fromkeys(runs, float("inf"))
    code = STRATEGIES.index(strategy)
    for _ in range(5):
        for name, (loop, t, rounds) in runs.items():
            start = time.process_time_ns()
            loop(t, rounds, code)
            best[name] = min(best[name], (time.process_time_ns() - start) / rounds)
    return best


def load_baseline(path: str) -> Any:
    """Another build's ``_shared_c`` extension, under its own module name."""
    spec = importlib.util.spec_from_file_location("_shared_c", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--baseline {path}: not an extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def in_c(t: Any, strategy: str, rounds: int) -> float:
    from tritonmesh._core import _outstanding_c, _shared_c

    loop = _shared_c._bench_pick_release if isinstance(t, CSharedTable) \
        else _outstanding_c._bench_pick_release
    code = STRATEGIES.index(strategy)
    return _best_ns(lambda: loop(t, rounds, code), rounds)


def _contender(name: str, index: int, n: int, strategy: str, rounds: int,
               barrier: Any, out: Any) -> None:
    t = CSharedTable.attach(name, index, seed=index)  # type: ignore[union-attr]
    barrier.wait()
    out.put(in_c(t, strategy, rounds))
    t.close()


def contended(n: int, strategy: str, rounds: int, weights: str) -> dict[str, float]:
    """Two processes, each in its C loop on the same table, started together."""
    assert CSharedTable is not None
    t = CSharedTable.create(n, 4, tag=f"bench-{uuid.uuid4().hex[:8]}", seed=0)
    try:
        _load(t, n, weights)
        alone = in_c(t, strategy, rounds)
        ctx = multiprocessing.get_context("fork")  # nothing here has started a thread
        barrier, out = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_contender, args=(t.name, i, n, strategy, rounds, barrier,
                                                      out)) for i in (1, 2)]
        for p in procs:
            p.start()
        each = [out.get(timeout=300) for _ in procs]
        for p in procs:
            p.join()
        return {"alone_ns": round(alone, 1), "two_processes_ns": round(max(each), 1)}
    finally:
        t.close()
        t.unlink()


def c_rows(private: Any, shared: Any, baseline: Any, n: int, weights: str, strategy: str,
           rounds: int) -> dict[str, float]:
    from tritonmesh._core import _outstanding_c, _shared_c

    runs = {"private_ns_in_c": (_outstanding_c._bench_pick_release, private, rounds * 5),
            "shared_ns_in_c": (_shared_c._bench_pick_release, shared, rounds)}
    before = None
    if baseline is not None:
        before = _load(baseline.SharedTable.create(
            n, 3, tag=f"bench-{uuid.uuid4().hex[:8]}", seed=1), n, weights)
        runs["baseline_shared_ns_in_c"] = (baseline._bench_pick_release, before, rounds)
    try:
        return {name: round(ns, 1) for name, ns in in_c_in_turn(runs, strategy).items()}
    finally:
        if before is not None:
            before.close()
            before.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=100_000)
    parser.add_argument("--baseline", metavar="SO",
                        help="another build's _shared_c extension, timed in turn with this one")
    args = parser.parse_args()
    baseline = load_baseline(args.baseline) if args.baseline else None
    if COutstandingTable is None or CSharedTable is None:
        raise SystemExit("the compiled core is not built (TRITONMESH_NO_EXTENSIONS set?)")
    results = []
    for strategy, weights in CASES:
        for n in SIZES:
            rounds = max(args.rounds // max(n // 64, 1), 2000)
            private = _load(COutstandingTable(seed=1), n, weights)
            shared = _load(CSharedTable.create(n, 3, tag=f"bench-{uuid.uuid4().hex[:8]}",
                                               seed=1), n, weights)
            twin = PySharedTable.attach(shared.name, 1, seed=2)
            try:
                row = {
                    "strategy": strategy, "weights": weights,
                    "instances": n,
                    "private_ns_from_python": round(from_python(private, strategy, rounds), 1),
                    "shared_ns_from_python": round(from_python(shared, strategy, rounds), 1),
                    "adapter_ns_from_python": round(through_adapter(shared, strategy, rounds), 1),
                }
                row.update(c_rows(private, shared, baseline, n, weights, strategy, rounds))
                # The twin takes no part in the C table's compare-and-swap: measured alone.
                row["twin_ns_from_python"] = round(
                    from_python(twin, strategy, max(rounds // 50, 200)), 1)
                row["shared_over_private_in_c"] = round(
                    row["shared_ns_in_c"] / row["private_ns_in_c"], 1)
                row["shared_over_private_from_python"] = round(
                    row["shared_ns_from_python"] / row["private_ns_from_python"], 1)
                row["adapter_over_private_from_python"] = round(
                    row["adapter_ns_from_python"] / row["private_ns_from_python"], 1)
            finally:
                twin.close()
                shared.close()
                shared.unlink()
            row["contended"] = contended(n, strategy, rounds, weights)
            results.append(row)
    print(json.dumps({"machine": platform.processor() or platform.machine(),
                      "cpus": len(os.sched_getaffinity(0)),
                      "python": platform.python_version(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
