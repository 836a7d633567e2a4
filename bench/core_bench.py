"""ns per pick+release pair of the outstanding tables: compiled vs pure-Python twin.

    python bench/core_bench.py [--rounds N]

Prints JSON. "from_python" times the pair called from a Python loop (what the
router pays, interpreter overhead included); "in_c" times the same pair in a C
loop (the data structure alone); "python_call_floor_ns" is the same Python loop
over two trivial builtins, the part of "from_python" no implementation can remove.
Both implementations run in the same process, side by side, with half the slots
already holding one request. Each figure is the best of 5 runs. "pick_work" is the
work table (LEAST_OUTSTANDING_WORK): pick(cost) + release(slot, cost), every slot with a
learned estimate of its own, half of them holding one request of the same cost.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from typing import Any

from tritonmesh._core import COutstandingTable, CWorkTable, PyOutstandingTable, PyWorkTable

SIZES = (4, 64, 1024)
STRATEGIES = ("pick", "pick_random", "pick_two")


def _table(cls: Any, n: int) -> Any:
    t = cls(seed=1)
    for _ in range(n):
        t.add()
    for _ in range(n // 2):
        t.pick()
    return t


def _best_ns(run: Callable[[], object], rounds: int) -> float:
    """ns per round of ``run()`` (which does ``rounds`` rounds): the best of 5."""
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter_ns()
        run()
        best = min(best, (time.perf_counter_ns() - start) / rounds)
    return best


def from_python(cls: Any, n: int, strategy: str, rounds: int) -> float:
    t = _table(cls, n)
    strategy_pick = getattr(t, strategy)

    # Defaults make the callables locals of the loop, as in the router's hot path.
    def run(pick: Any = strategy_pick, release: Any = t.release) -> None:
        for _ in range(rounds):
            release(pick())

    return _best_ns(run, rounds)


COST = 40.0


def _work_table(cls: Any, n: int) -> Any:
    t = cls(seed=1)
    for i in range(n):
        t.observe(t.add(), 0.002 + (i % 7) * 1e-4, 0.0)
    for _ in range(n // 2):
        t.pick(COST)
    return t


def work_from_python(cls: Any, n: int, rounds: int) -> float:
    t = _work_table(cls, n)

    def run(pick: Any = t.pick, release: Any = t.release, cost: float = COST) -> None:
        for _ in range(rounds):
            release(pick(cost), cost)

    return _best_ns(run, rounds)


def work_in_c(n: int, rounds: int) -> float:
    from tritonmesh._core._work_c import _bench_pick_release

    t = _work_table(CWorkTable, n)
    return _best_ns(lambda: _bench_pick_release(t, rounds, COST), rounds)


def call_floor(rounds: int) -> float:
    """The same loop over two trivial C builtins: what any pick + release from Python pays."""
    # METH_NOARGS and METH_O, like the table's.
    def run(pick: Any = (1).bit_length, release: Any = set().discard) -> None:
        for _ in range(rounds):
            release(pick())

    return _best_ns(run, rounds)


def in_c(n: int, strategy: str, rounds: int) -> float:
    from tritonmesh._core._outstanding_c import _bench_pick_release

    t = _table(COutstandingTable, n)
    code = STRATEGIES.index(strategy)
    return _best_ns(lambda: _bench_pick_release(t, rounds, code), rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=200_000)
    args = parser.parse_args()
    if COutstandingTable is None or CWorkTable is None:
        raise SystemExit("the compiled core is not built (TRITONMESH_NO_EXTENSIONS set?)")
    results = []
    for strategy in STRATEGIES:
        for n in SIZES:
            c = from_python(COutstandingTable, n, strategy, args.rounds)
            py = from_python(PyOutstandingTable, n, strategy, max(args.rounds // 20, 1000))
            c_in_c = in_c(n, strategy, args.rounds * 5)
            results.append({
                "strategy": strategy, "instances": n,
                "c_ns_from_python": round(c, 1),
                "c_ns_in_c": round(c_in_c, 1),
                "twin_ns": round(py, 1),
                "twin_over_c": round(py / c, 1),
                "twin_over_c_in_c": round(py / c_in_c, 1),
            })
    for n in SIZES:
        # The scan is O(n): fewer rounds at 1024 keep the run short.
        rounds = max(args.rounds // max(n // 16, 1), 2000)
        c = work_from_python(CWorkTable, n, rounds)
        py = work_from_python(PyWorkTable, n, max(rounds // 20, 200))
        c_in_c = work_in_c(n, rounds)
        results.append({
            "strategy": "pick_work", "instances": n,
            "c_ns_from_python": round(c, 1), "c_ns_in_c": round(c_in_c, 1),
            "twin_ns": round(py, 1), "twin_over_c": round(py / c, 1),
            "twin_over_c_in_c": round(py / c_in_c, 1),
        })
    print(json.dumps({"machine": platform.processor() or platform.machine(),
                      "python": platform.python_version(),
                      "python_call_floor_ns": round(call_floor(args.rounds), 1),
                      "results": results}, indent=2))


if __name__ == "__main__":
    main()
