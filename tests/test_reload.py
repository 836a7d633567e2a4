"""SIGHUP reloads: every key is applied live or refused with one line naming it; a file
that cannot be read or parsed keeps the running configuration, in one line too."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from harness import LoopThread, make_config, start_router
from tritonmesh.config import EndpointConfig, load_config
from tritonmesh.endpoint import _reload

pytestmark = pytest.mark.triton

TRITONMESH = str(Path(sys.executable).parent / "tritonmesh")


def _write(path: Path, addresses: list[str], **variant: Any) -> None:
    lines = ["listen: 127.0.0.1:0", "metrics_listen: null", "variants:",
             "  - name: AllTraffic", f"    instances: [{', '.join(addresses)}]"]
    lines += [f"    {k}: {v}" for k, v in variant.items()]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def reloadable(loop_thread: LoopThread, worker_addresses: list[str], tmp_path: Path) -> Any:
    """A router started from a config file, and a function that rewrites and reloads it."""
    path = tmp_path / "endpoint.yaml"
    _write(path, worker_addresses[:2])
    config = dataclasses.replace(load_config(path), health_check=make_config(
        worker_addresses)[0].health_check)
    handle = start_router(loop_thread, config, {"AllTraffic": worker_addresses[:2]})
    running = [config]

    def reload(text: str | bytes | None = None, **variant: Any) -> EndpointConfig:
        if isinstance(text, bytes):
            path.write_bytes(text)
        elif text is not None:
            path.write_text(text)
        elif variant:
            _write(path, worker_addresses[:2], **variant)
        loop_thread.run(_reload(handle.router, path, running))
        return running[0]

    yield handle, reload, path
    handle.wait_idle()
    handle.stop()


def _reload_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith("reload")]


def test_reload_applies_weight_strategy_limit_and_models_live(
        reloadable: Any, caplog: pytest.LogCaptureFixture) -> None:
    handle, reload, _ = reloadable
    variant = handle.balancer.by_name["AllTraffic"]
    before = variant.table
    with caplog.at_level(logging.INFO, logger="tritonmesh"):
        reload(weight=3, routing_strategy="ROUND_ROBIN", max_concurrency_per_instance=4,
               max_queue=7, models="[identity]")
    assert [r.levelname for r in _reload_lines(caplog)] == ["INFO"]  # "reloaded ..."
    assert (variant.weight, variant.strategy.value, variant.limit, variant.max_queue) == \
        (3.0, "ROUND_ROBIN", 4, 7)
    assert variant.models == frozenset({"identity"}) and variant.table is before
    assert handle.balancer._variants_for("identity") == [variant]
    # Round robin now: two requests, one to each instance.
    served = {i.address: i.requests for i in handle.instances()}
    with grpcclient.InferenceServerClient(handle.address) as client:
        for _ in range(2):
            x = grpcclient.InferInput("INPUT0", [1], "FP32")
            x.set_data_from_numpy(np.ones(1, np.float32))
            client.infer("identity", [x])
    assert sorted(i.requests - served[i.address] for i in handle.instances()) == [1, 1]


def test_a_raised_concurrency_limit_hands_capacity_to_waiters(reloadable: Any) -> None:
    handle, reload, _ = reloadable
    reload(max_concurrency_per_instance=1)
    variant = handle.balancer.by_name["AllTraffic"]
    loop = handle.loop.loop
    held = [handle.loop.run(_pick(handle)) for _ in range(2)]  # both instances at 1
    waiter = __import__("asyncio").run_coroutine_threadsafe(variant.wait(30.0), loop)
    while not len(variant.waiters):
        threading.Event().wait(0.01)
    reload(max_concurrency_per_instance=2)
    third = waiter.result(10)  # handed capacity by the reload, not by a release
    for instance in (*held, third):
        loop.call_soon_threadsafe(instance.variant.give_back, instance)


async def _pick(handle: Any) -> Any:
    return handle.balancer.by_name["AllTraffic"].pick()


@pytest.mark.parametrize(("change", "keys"), [
    ("listen: 127.0.0.1:1\n", ["listen"]),
    ("health_check: {interval_s: 9}\nlimits: {max_sequences: 5}\n", ["limits.max_sequences"]),
])
def test_reload_refuses_keys_read_only_at_start(
        reloadable: Any, caplog: pytest.LogCaptureFixture, change: str, keys: list[str],
        worker_addresses: list[str]) -> None:
    handle, reload, path = reloadable
    _write(path, worker_addresses[:1])
    text = path.read_text().replace("listen: 127.0.0.1:0\n", "")
    text = ("listen: 127.0.0.1:0\n" if "listen" not in change else "") + change + text
    running = handle.router.config
    with caplog.at_level(logging.INFO, logger="tritonmesh"):
        assert reload(text) is not None
    (line,) = _reload_lines(caplog)
    assert line.levelname == "ERROR" and "keeping the running configuration" in line.getMessage()
    for key in keys:
        assert key in line.getMessage()
    # Nothing of it applied: not the instances, not the keys that could have been.
    assert handle.router.config is running
    assert len(handle.instances()) == 2
    assert handle.router.health is not None and handle.router.health.config.interval_s == 0.5


def test_reload_refuses_a_new_variant_and_a_table_change(
        reloadable: Any, caplog: pytest.LogCaptureFixture, worker_addresses: list[str]) -> None:
    handle, reload, path = reloadable
    with caplog.at_level(logging.INFO, logger="tritonmesh"):
        reload(routing_strategy="LEAST_OUTSTANDING_WORK", local_workers=1)
        _write(path, worker_addresses[:2])
        reload(path.read_text() + f"  - name: Other\n    instances: [{worker_addresses[2]}]\n")
    first, second = (r.getMessage() for r in _reload_lines(caplog))
    assert "variants[0].local_workers" in first and "variants[0].routing_strategy" in first
    assert "variants (adds 'Other')" in second
    assert handle.balancer.by_name["AllTraffic"].strategy.value == "RANDOM"  # unchanged


@pytest.mark.parametrize("content", [
    None,  # the file is gone
    b"variants: [\xff\xfe]\n",  # not UTF-8
    "listen: 127.0.0.1:1\u00b2\nvariants: [{name: a, instances: [h:1]}]\n",  # port 1²
])
def test_an_unreadable_reload_is_one_line_and_keeps_running(
        reloadable: Any, caplog: pytest.LogCaptureFixture, content: str | bytes | None) -> None:
    handle, reload, path = reloadable
    if content is None:
        path.unlink()
    running = handle.router.config
    with caplog.at_level(logging.DEBUG):
        reload(content)
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and lines[0].exc_info is None, [r.getMessage() for r in lines]
    assert "reload: keeping the running configuration" in lines[0].getMessage()
    assert handle.router.config is running and len(handle.instances()) == 2


@pytest.mark.parametrize("content", [
    None,
    b"variants: [\xff\xfe]\n",
    "listen: 127.0.0.1:1\u00b2\nvariants: [{name: a, instances: [h:1]}]\n",
])
def test_serve_exits_2_with_one_line_for_an_unreadable_config(
        tmp_path: Path, content: str | bytes | None) -> None:
    path = tmp_path / "endpoint.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    done = subprocess.run([TRITONMESH, "serve", "--config", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stdout == "" and len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith("tritonmesh: invalid configuration: ")
