"""CPU time of a whole process tree, read from /proc: what a router costs per request.

A target is a process tree (nginx's master and worker, nghttpx's main and worker, Triton
and its Python backend stubs, tritonmesh's router processes), so its CPU is the sum over
the root and every descendant alive at the reading, found by walking the ``ppid`` of every
``/proc/*/stat``. Each process contributes its ``utime + stime`` (all its threads, the
exited ones too) and its ``cutime + cstime``: the CPU of children it has exited *and waited
for*. A child that ends between two readings is therefore still counted, in the reading
after, through whichever tree member reaped it. What escapes is a descendant that leaves the
tree (re-parented to init by a daemonizing double fork) or one that has exited but not yet
been waited for; none of the targets the bench runs does either while it serves.
"""

from __future__ import annotations

import os
from collections import defaultdict

__all__ = ["TICKS_PER_S", "process_tree", "tree_cpu_s"]

TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def _stat(pid: int | str) -> tuple[int, int] | None:
    """(ppid, utime + stime + cutime + cstime in ticks) of one process, or None if it is
    gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name is in parentheses and may hold spaces or ')': split after the last.
    fields = data[data.rindex(b")") + 2:].split()
    # fields[0] is field 3 of proc(5) (state): ppid is 4, utime..cstime are 14..17.
    return int(fields[1]), sum(int(t) for t in fields[11:15])


def _table() -> dict[int, tuple[int, int]]:
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (entry := _stat(name)) is not None:
            table[int(name)] = entry
    return table


def process_tree(root: int) -> list[int]:
    """``root`` and every process descended from it now (empty if ``root`` is gone)."""
    return _tree(root, _table())


def _tree(root: int, table: dict[int, tuple[int, int]]) -> list[int]:
    if root not in table:
        return []
    children: defaultdict[int, list[int]] = defaultdict(list)
    for pid, (ppid, _) in table.items():
        children[ppid].append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, ())
    return tree


def tree_cpu_s(root: int) -> float:
    """CPU seconds (user + system) used so far by ``root``'s process tree: the root and its
    living descendants, and the children any of them has reaped. Take the difference of
    two readings for an interval. Raises ProcessLookupError if ``root`` is gone."""
    table = _table()
    tree = _tree(root, table)
    if not tree:
        raise ProcessLookupError(root)
    return sum(table[pid][1] for pid in tree) / TICKS_PER_S
