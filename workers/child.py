"""A child process spawned by ``subprocess.Popen`` and awaited on any asyncio event loop.

The launcher needs ``process_group`` (a worker's group, which its guard joins), which
uvloop's ``subprocess_exec`` does not take, and the stdlib loop's subprocess support is
``Popen`` underneath anyway. So children are spawned with ``Popen`` as the stdlib loop
would, and awaited through a pidfd (readable once the process has exited), which any loop
can watch with ``add_reader``: no thread per child and no SIGCHLD handler.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from typing import Any

__all__ = ["Child", "spawn"]


class Child:
    """The parts of ``asyncio.subprocess.Process`` the launcher uses."""

    def __init__(self, popen: subprocess.Popen[bytes]):
        self._popen = popen
        self.pid = popen.pid

    @property
    def returncode(self) -> int | None:
        """None while it runs; reaps it (without blocking) once it has exited."""
        return self._popen.poll()

    async def wait(self) -> int:
        if self._popen.poll() is not None:
            return self._popen.returncode
        pidfd_open = getattr(os, "pidfd_open", None)
        try:
            # Reaping happens only here and in poll(), on this thread: until then an
            # exited child is a zombie, so its pidfd can still be opened.
            if pidfd_open is None:
                raise OSError("no os.pidfd_open")
            fd = pidfd_open(self.pid)
        except OSError:  # Linux before 5.3, or a kernel without pidfds
            return await asyncio.to_thread(self._popen.wait)
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not exited.done():
                exited.set_result(None)

        try:
            loop.add_reader(fd, readable)
            try:
                await exited
            finally:
                loop.remove_reader(fd)
        finally:
            os.close(fd)
        return self._popen.wait()

    def send_signal(self, sig: int) -> None:
        self._popen.send_signal(sig)  # a no-op once reaped: never a recycled pid

    def kill(self) -> None:
        self._popen.kill()

    def terminate(self) -> None:
        self._popen.terminate()


def spawn(*args: str, **kwargs: Any) -> Child:
    """``subprocess.Popen(args, **kwargs)`` as a :class:`Child`."""
    return Child(subprocess.Popen(args, **kwargs))
