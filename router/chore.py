"""A control-plane chore that runs on the event loop until stopped (health checks, DNS
discovery, housekeeping): one way to start it and one way to end it."""

from __future__ import annotations

import asyncio

__all__ = ["Chore"]


class Chore:
    """``start()`` runs :meth:`run` as a task on the running loop; ``stop()`` cancels it and
    waits until it has ended. :meth:`run` loops for as long as the router serves."""

    _task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
