"""Which asyncio event loop the router runs on: uvloop where it is installed.

The router's own code is a few percent of its CPU time per request; the rest is grpc.aio
and the event loop (docs/architecture.md has the profile), so the loop is the cheapest
place to win throughput. uvloop is a dependency, but the stdlib loop stays supported and
tested: ``--event-loop asyncio`` or ``TRITONMESH_EVENT_LOOP=asyncio`` selects it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, Final, TypeVar

__all__ = ["CHOICES", "ENV", "EventLoopError", "loop_name", "new_event_loop", "run"]

ENV: Final = "TRITONMESH_EVENT_LOOP"
CHOICES: Final = ("auto", "uvloop", "asyncio")

T = TypeVar("T")


class EventLoopError(ValueError):
    """An event loop choice that is not one of :data:`CHOICES`."""


def _choice(choice: str | None) -> str:
    choice = choice or os.environ.get(ENV) or "auto"
    if choice not in CHOICES:
        raise EventLoopError(f"event loop must be one of {', '.join(CHOICES)}, got {choice!r} "
                         f"(from {ENV} or --event-loop)")
    return choice


def new_event_loop(choice: str | None = None) -> asyncio.AbstractEventLoop:
    """A new loop of the chosen kind. "auto" is uvloop if it imports, else the stdlib's;
    "uvloop" fails if uvloop is missing rather than quietly running slower."""
    choice = _choice(choice)
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError as exc:
            if choice == "uvloop":
                raise EventLoopError("the uvloop event loop was asked for, but uvloop is not "
                                     "installed (pip install uvloop)") from exc
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def run(main: Coroutine[Any, Any, T], choice: str | None = None) -> T:
    """``asyncio.run`` on the chosen loop."""
    try:
        loop = new_event_loop(choice)
    except BaseException:
        main.close()  # never started: no "coroutine was never awaited" on the way out
        raise
    with asyncio.Runner(loop_factory=lambda: loop) as runner:
        return runner.run(main)
