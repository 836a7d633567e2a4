"""Where a native-path router's CPU goes: per thread, and per shared object on the CPU.

    python bench/native_profile.py --users 8 --seconds 10

One ``identity`` worker and one ``tritonmesh serve`` on ``data_path: native``, loaded by
h2load as in ``bench/native_overhead.py``. Printed: the router's CPU µs per request, then
each of its threads' share of it (from /proc/PID/task/*/stat), then, where ``perf`` can
sample the process, the on-CPU samples per shared object (``perf record -e cpu-clock``): the
Python interpreter, the kernel (the socket syscalls, and loopback TCP's receive work, which
runs in the writer's context), libnghttp2, libc (malloc, memcpy), uvloop and the extensions.

It counts CPU, not wall time: a wall-clock sampler (py-spy) also samples a thread while it is
blocked in a C call it does not know as idle (grpc.aio's poller in ``epoll_wait``) or
preempted inside ``write`` by the peer it woke, which on a shared 2-core machine makes both
look far larger than they are. Loopback only; it ends by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from native_overhead import body, load, router
from tritonmesh.workers.launcher import WorkerPool

TICKS = os.sysconf("SC_CLK_TCK")
# Shared objects by what they are; the rest is printed under its own name.
KINDS = (("libpython", "Python interpreter (the policy, and objects the engine hands up)"),
         ("[kernel", "kernel (syscalls, loopback TCP)"),
         ("libnghttp2", "libnghttp2 (HTTP/2 frames, HPACK)"),
         ("libc.so", "libc (malloc, memcpy, epoll)"),
         ("loop.cpython", "uvloop (event loop, transports)"),
         ("_h2.cpython", "tritonmesh._core._h2 (the engine's glue, pairing)"))


def threads(pid: int) -> dict[str, tuple[str, float]]:
    """Each thread of ``pid``: (name, CPU seconds so far)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rpartition(")")[2].split()
        except FileNotFoundError:  # a thread that ended between listing and reading
            continue
        out[task.name] = (name, (int(fields[11]) + int(fields[12])) / TICKS)
    return out


def by_object(data: Path) -> list[tuple[float, str]]:
    """``perf report``'s share per shared object, largest first."""
    text = subprocess.run(["perf", "report", "-i", str(data), "--sort", "dso", "--stdio"],
                          capture_output=True, text=True, check=True).stdout
    shares: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        found = re.match(r"\s*([\d.]+)%\s+(\S.*?)\s*$", line)
        if found:
            name = found.group(2)
            kind = next((k for prefix, k in KINDS if name.startswith(prefix)), name)
            shares[kind] += float(found.group(1))
    return sorted(((share, kind) for kind, share in shares.items()), reverse=True)


async def main(args: argparse.Namespace) -> None:
    if shutil.which("h2load") is None:
        sys.exit("h2load is missing: apt-get install nghttp2-client")
    with tempfile.TemporaryDirectory(prefix="native-profile-") as tmp:
        d = Path(tmp)
        (d / "body.bin").write_bytes(body())
        async with WorkerPool(1) as pool, \
                router(d, "native", pool.addresses[0]) as (address, pid):
            await load(d, address, args.users, 2, pid)  # connections made, code warm
            perf = None
            if shutil.which("perf") and not args.no_perf:
                perf = await asyncio.create_subprocess_exec(
                    "perf", "record", "-q", "-e", "cpu-clock", "-F", "2000", "-p", str(pid),
                    "-o", str(d / "perf.data"),
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            before = threads(pid)
            rate, p50, _, cpu = await load(d, address, args.users, args.seconds, pid)
            after = threads(pid)
            if perf is not None:
                perf.send_signal(2)
                await perf.wait()
            assert cpu is not None
            print(f"{args.users} users: {rate:.0f} req/s, P50 {p50:.2f} ms, router CPU "
                  f"{cpu:.0f} µs per request")
            spent: dict[str, float] = defaultdict(float)
            for tid, (name, seconds) in after.items():  # Python's threads keep its name
                label = "the event loop's thread" if tid == str(pid) else f"{name} (other)"
                spent[label] += seconds - before.get(tid, (name, 0.0))[1]
            total = sum(spent.values()) or 1.0
            print("per thread (share of the router's CPU):")
            for label, seconds in sorted(spent.items(), key=lambda kv: -kv[1]):
                if seconds > 0:
                    print(f"  {seconds / total:6.1%}  {label}")
            if perf is not None and (d / "perf.data").exists():
                print("on-CPU samples per shared object (perf, cpu-clock):")
                for share, kind in by_object(d / "perf.data"):
                    if share >= 0.5:
                        print(f"  {share:5.1f}%  {kind}")
            elif perf is not None:
                print("perf could not sample the router (kernel.perf_event_paranoid?)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--no-perf", action="store_true", help="threads only")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(main(parser.parse_args()))
