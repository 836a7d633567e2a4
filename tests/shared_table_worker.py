"""A process attached to a shared table, for tests/test_shared_table.py (run as a script).

    python shared_table_worker.py IMPL MODE NAME INDEX ITERATIONS SEED [LIMIT]

IMPL is ``c`` or ``py``. Each worker attaches, prints ``ready`` and waits for a line on
stdin before it starts, so that the test can start all of them at once. Every mode stops
by itself after ITERATIONS, releases what it still holds, closes the table and prints one
JSON line; ``forever`` only stops when killed.
Modes:

- ``hammer``: random picks (all three strategies), try_acquire, acquire, releases, and
  adds/removes of its own slots, holding up to 8 requests at a time.
- ``hammer-even``: the same with every weight 1, so that least-outstanding picks read the
  pick index alone (with weights 1 and 2 they read the slots off the common weight beside it,
  one by one).
- ``limited``: try_acquire(slot 0, LIMIT) in a loop; after each success it reads the
  fleet-wide count a few times and records the highest it saw; it counts refusals too.
- ``forever``: picks and releases, holding up to 8; prints ``running`` after the first
  ITERATIONS operations, then goes on until killed.
- ``waiter``: takes slot 0 (limit 1) ITERATIONS times with the wake-up protocol, holding it
  for a few operations each time; records waits that timed out.
"""

from __future__ import annotations

import json
import random
import sys
from typing import Any

import tritonmesh._core as core


def _table_cls(impl: str) -> Any:
    cls = core.CSharedTable if impl == "c" else core.PySharedTable
    if cls is None:
        raise SystemExit("the compiled core is not built")
    return cls


def hammer(t: Any, rng: random.Random, iterations: int,
           weights: tuple[float, ...] = (1.0, 2.0)) -> dict[str, Any]:
    held: list[int] = []
    mine: list[int] = []
    ops = 0
    for _ in range(iterations):
        r = rng.random()
        if held and (r < 0.4 or len(held) >= 8):
            t.release(held.pop(rng.randrange(len(held))))
        elif r < 0.7:
            slot = (t.pick, t.pick_two, t.pick_random)[rng.randrange(3)]()
            if slot >= 0:
                held.append(slot)
        elif r < 0.8:
            slot = rng.randrange(t.capacity)
            try:
                if t.try_acquire(slot, 3):
                    held.append(slot)
            except (IndexError, ValueError):  # free, or removed meanwhile: both fine
                pass
        elif r < 0.88:
            slot = rng.randrange(t.capacity)
            try:
                t.acquire(slot)
                held.append(slot)
            except (IndexError, ValueError):
                pass
        elif r < 0.94 or not mine:
            try:
                mine.append(t.add(rng.choice(weights), rng.choice((0, 2))))
            except ValueError:  # the table is full
                pass
        else:
            t.remove(mine.pop(rng.randrange(len(mine))))
        ops += 1
    for slot in held:
        t.release(slot)
    for slot in mine:
        t.remove(slot)
    return {"ops": ops}


def limited(t: Any, iterations: int, limit: int) -> dict[str, Any]:
    highest = 0
    successes = 0
    refused = 0
    for _ in range(iterations):
        if t.try_acquire(0, limit):
            successes += 1
            for _ in range(3):
                highest = max(highest, t.outstanding(0))
            t.release(0)
        else:
            refused += 1
    return {"highest": highest, "successes": successes, "refused": refused}


def forever(t: Any, rng: random.Random, iterations: int) -> None:
    held: list[int] = []
    n = 0
    while True:
        if held and (rng.random() < 0.5 or len(held) >= 8):
            t.release(held.pop(rng.randrange(len(held))))
        else:
            slot = t.pick()
            if slot >= 0:
                held.append(slot)
        n += 1
        if n == iterations:
            print("running", flush=True)


def waiter(t: Any, iterations: int) -> dict[str, Any]:
    timeouts = 0
    for _ in range(iterations):
        seq = t.begin_wait()
        while not t.try_acquire(0, 1):
            new = t.wait_for_release(seq, 20.0)
            if new == seq:
                timeouts += 1
            seq = new
        t.end_wait()
        for _ in range(5):
            assert t.outstanding(0) == 1
        t.release(0)
    return {"timeouts": timeouts}


def main() -> None:
    impl, mode, name, index, iterations, seed = sys.argv[1:7]
    limit = int(sys.argv[7]) if len(sys.argv) > 7 else 0
    t = _table_cls(impl).attach(name, int(index), seed=int(seed))
    print("ready", flush=True)
    sys.stdin.readline()
    rng = random.Random(int(seed))
    n = int(iterations)
    if mode == "hammer":
        out = hammer(t, rng, n)
    elif mode == "hammer-even":
        out = hammer(t, rng, n, weights=(1.0,))
    elif mode == "limited":
        out = limited(t, n, limit)
    elif mode == "forever":
        forever(t, rng, n)
        return
    elif mode == "waiter":
        out = waiter(t, n)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    t.close()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
