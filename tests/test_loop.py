"""tritonmesh.loop: which event loop the router's commands run on."""

from __future__ import annotations

import asyncio
import sys

import pytest
import uvloop
from tritonmesh.loop import ENV, EventLoopError, loop_name, new_event_loop, run


async def _kind() -> str:
    return loop_name(asyncio.get_running_loop())


@pytest.mark.parametrize(("choice", "env", "expected"), [
    (None, None, "uvloop"),  # auto, and uvloop is a dependency
    ("auto", None, "uvloop"),
    ("asyncio", None, "asyncio"),
    (None, "asyncio", "asyncio"),
    ("uvloop", "asyncio", "uvloop"),  # the flag wins over the environment
])
def test_choice(monkeypatch: pytest.MonkeyPatch, choice: str | None, env: str | None,
                expected: str) -> None:
    if env is None:
        monkeypatch.delenv(ENV, raising=False)
    else:
        monkeypatch.setenv(ENV, env)
    assert run(_kind(), choice) == expected
    loop = new_event_loop(choice)
    try:
        assert isinstance(loop, uvloop.Loop) == (expected == "uvloop")
    finally:
        loop.close()


def test_unknown_choice_names_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "trio")
    with pytest.raises(EventLoopError, match="one of auto, uvloop, asyncio, got 'trio'"):
        new_event_loop()


def test_uvloop_asked_for_but_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError

    async def never() -> None:
        raise AssertionError("must not run")

    with pytest.raises(EventLoopError, match="uvloop is not installed"):
        run(never(), "uvloop")
    assert run(_kind(), "auto") == "asyncio"  # auto falls back to the stdlib loop
