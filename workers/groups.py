"""What a Triton worker leaves to take down: its process group and its shared memory.

A worker's group holds tritonserver, its Python backend stubs and a guard (see
``GUARD_SCRIPT``); its stubs' shared-memory regions are ``/dev/shm/<prefix>*``, the prefix
being the worker's own (``shm_prefix``).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import logging
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Final

__all__ = ["GUARD_SCRIPT", "LIVE_GROUPS", "remove_shm_regions", "setpriv_path", "shm_prefix"]

log = logging.getLogger("tritonmesh.workers")

# Process groups of workers not stopped yet, with their shared-memory prefixes: taken down
# when the interpreter exits (an exception, SIGINT, sys.exit) without stopping them.
LIVE_GROUPS: dict[int, str] = {}


def _kill_live_groups() -> None:
    for pgid, prefix in list(LIVE_GROUPS.items()):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        remove_shm_regions(prefix)
    LIVE_GROUPS.clear()


atexit.register(_kill_live_groups)


# Sleeps in the worker's process group, given the worker's shared-memory prefix as $1. On
# SIGUSR1 (its PDEATHSIG: this process died) it removes the worker's regions and kills the
# group, the stubs included (a region still mapped by a stub is freed when the stub dies);
# on SIGTERM (the pool stopping) it just ends.
GUARD_SCRIPT: Final = ('trap \'rm -f /dev/shm/"$1"*; kill -KILL 0\' USR1; '
                        'trap "kill $! 2>/dev/null; exit 0" TERM; '
                        'while :; do sleep 3600 & wait $!; done')

_SHM_DIR: Final = Path("/dev/shm")
_worker_serial = itertools.count()


def shm_prefix() -> str:
    """A shared-memory region prefix no other worker uses: this process's pid, then a
    number unique in it. Triton 2.51's Python backend names a worker's regions
    ``<prefix><uuid>``; with a prefix of its own they can be found and removed (older
    Tritons named them ``<prefix>1``..., and two workers on one prefix collided)."""
    return f"tritonmesh_{os.getpid()}_{next(_worker_serial)}_"


def remove_shm_regions(prefix: str) -> list[str]:
    """Remove the shared-memory regions named ``<prefix>*``; returns their names.

    Only for a worker whose processes are gone (or being killed): a live stub could not
    open its region again."""
    removed = []
    for path in _SHM_DIR.glob(f"{prefix}*"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path.name)
    return removed


@functools.cache
def setpriv_path() -> str | None:
    """util-linux's setpriv, which sets PDEATHSIG and execs the command given to it; None
    where it is missing or too old for ``--pdeathsig`` (util-linux before 2.33)."""
    found = shutil.which("setpriv")
    if found is not None:
        try:
            usage = subprocess.run([found, "--help"], capture_output=True, text=True,
                                   timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            usage = ""
        if "--pdeathsig" not in usage:
            found = None
    if found is None:
        log.warning("no setpriv with --pdeathsig (util-linux 2.33 or later): Triton workers "
                    "and their stubs will not die with this process if it is killed outright "
                    "(SIGKILL, the OOM killer)")
    return found
