"""Shared fixtures: real Triton workers on loopback and routers in front of them."""

from __future__ import annotations

import os

# Before grpc is imported (it reads this once), as tritonmesh/__init__.py does for its own
# processes: this one starts Triton workers from a uvloop loop while gRPC's threads run.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

from collections.abc import Iterator
from typing import Any

import pytest
from harness import LoopThread, RecordingTriton, RouterHandle, make_config, serve_on, start_router
from tritonmesh.native_config import native_available

_UNMARKED = ("starts real Triton without @pytest.mark.triton: mark it (pytestmark for a "
             "module), so that -m 'not triton' stays the fast pass")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # Before any fixture is set up: the session's worker_pool would start Triton.
    if "worker_pool" in getattr(item, "fixturenames", ()) and not item.get_closest_marker(
            "triton"):
        pytest.fail(f"{item.nodeid} uses the worker_pool fixture and {_UNMARKED}", pytrace=False)


@pytest.fixture(autouse=True)
def _triton_tests_are_marked(request: pytest.FixtureRequest,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A test without the marker that starts Triton itself (a WorkerPool, a TritonWorker)
    fails there."""
    if request.node.get_closest_marker("triton"):
        return
    from tritonmesh.workers.launcher import TritonWorker, WorkerPool

    async def refuse(self: object, *args: Any, **kwargs: Any) -> None:
        pytest.fail(f"{request.node.nodeid} {_UNMARKED}", pytrace=False)

    monkeypatch.setattr(WorkerPool, "start", refuse)
    monkeypatch.setattr(TritonWorker, "start", refuse)


@pytest.fixture(params=["grpc", "native"])
def data_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each data path in turn, for tests of what both must do alike (harness.serve_on)."""
    if request.param == "native" and not native_available():
        pytest.skip("the native data path's extension (tritonmesh._core._h2) is not built "
                    "here (TRITONMESH_NO_EXTENSIONS=1, or no libnghttp2 header)")
    serve_on(monkeypatch, request.param)
    return str(request.param)


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    loop = LoopThread()
    yield loop
    loop.close()


@pytest.fixture(scope="session")
def worker_pool(loop_thread: LoopThread) -> Iterator[Any]:
    """Three real Triton workers with the demo models, shared by the whole session."""
    from tritonmesh.workers.launcher import WorkerPool

    async def start() -> WorkerPool:
        pool = WorkerPool(3, restart=True)
        await pool.start()
        return pool

    pool = loop_thread.run(start(), timeout=180)
    yield pool
    loop_thread.run(pool.stop(grace=5.0), timeout=60)


@pytest.fixture
def worker_addresses(worker_pool: Any) -> list[str]:
    return list(worker_pool.addresses)


@pytest.fixture
def make_router(loop_thread: LoopThread, worker_addresses: list[str]) -> Iterator[Any]:
    """Start routers over the session's workers; at teardown every count must be zero."""
    routers: list[RouterHandle] = []

    def make(**kwargs: Any) -> RouterHandle:
        config, instances = make_config(worker_addresses, **kwargs)
        handle = start_router(loop_thread, config, instances)
        routers.append(handle)
        return handle

    yield make
    for handle in routers:
        try:
            handle.wait_idle()
        finally:
            handle.stop()


@pytest.fixture
def recording_triton(loop_thread: LoopThread) -> Iterator[RecordingTriton]:
    """A fake Triton that records what reaches it (harness.RecordingTriton)."""
    fake = RecordingTriton(loop_thread)
    yield fake
    fake.stop()
