"""Real Triton workers: launched, served straight through tritonclient, supervised, stopped."""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from harness import LoopThread, start_pool, wait_gone
from tritonclient.utils import InferenceServerException
from tritonmesh.workers.launcher import WorkerPool, WorkerStartError

pytestmark = pytest.mark.triton


def _inputs(prompt: int, max_tokens: int, fail_after: int | None = None) -> list[Any]:
    tensors = []
    for name, value in (("PROMPT_TOKENS", prompt), ("MAX_TOKENS", max_tokens),
                        ("FAIL_AFTER", fail_after)):
        if value is None:
            continue
        t = grpcclient.InferInput(name, [1], "INT32")
        t.set_data_from_numpy(np.array([value], dtype=np.int32))
        tensors.append(t)
    return tensors


def _stream(address: str, requests: list[tuple[str, list[Any], bool]],
            n_results: int) -> list[tuple[Any, Any]]:
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    with grpcclient.InferenceServerClient(address) as client:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        for i, (model, inputs, empty_final) in enumerate(requests):
            client.async_stream_infer(model, inputs, request_id=f"r{i}",
                                      enable_empty_final_response=empty_final)
        got = [results.get(timeout=60) for _ in range(n_results)]
        client.stop_stream()
    return got


def _token(result: Any) -> int | None:
    values = result.as_numpy("TOKEN")
    return None if values is None else int(values[0])


def test_each_worker_serves_every_model(worker_addresses: list[str]) -> None:
    for address in worker_addresses:
        with grpcclient.InferenceServerClient(address) as client:
            assert client.is_server_ready()
            x = grpcclient.InferInput("INPUT0", [3], "FP32")
            x.set_data_from_numpy(np.array([1, 2, 3], dtype=np.float32))
            assert client.infer("identity", [x]).as_numpy("OUTPUT0").tolist() == [1, 2, 3]
            tokens = client.infer("generate_unary", _inputs(4, 6)).as_numpy("TOKENS")
            assert tokens.tolist() == list(range(6))
            for model in ("generate", "generate_unary", "identity"):
                assert client.get_model_metadata(model).name == model
                assert client.get_model_config(model).config.name == model
            config = client.get_model_config("generate").config
            assert config.model_transaction_policy.decoupled


def _seeded(max_tokens: int, seed: int) -> list[Any]:
    inputs = _inputs(0, max_tokens)
    t = grpcclient.InferInput("SEED", [1], "INT64")
    t.set_data_from_numpy(np.array([seed], dtype=np.int64))
    return [*inputs, t]


def test_a_seeded_request_stops_at_its_own_length(worker_addresses: list[str]) -> None:
    """With a SEED the demo models stop where an LLM would, at a length of their own drawn
    from it (lognormal, median 40, sigma 0.75 by default), and MAX_TOKENS only caps it: the
    same length on every call, and the one the bench computes for its hints."""
    from tritonmesh.bench.loadgen import own_length

    seeds = [11, 12, 13, 14, 15, 16]
    expected = [own_length(s, 40.0, 0.75, 60) for s in seeds]
    assert len(set(expected)) > 2 and min(expected) < 60  # lengths differ; not all capped
    long_seed = next(s for s in range(1000) if own_length(s, 40.0, 0.75, 1000) > 5)
    with grpcclient.InferenceServerClient(worker_addresses[0]) as client:
        got = [client.infer("generate_unary", _seeded(60, s)).as_numpy("TOKENS").size
               for s in seeds]
        again = client.infer("generate_unary", _seeded(60, seeds[0])).as_numpy("TOKENS")
        capped = client.infer("generate_unary", _seeded(5, long_seed)).as_numpy("TOKENS")
    assert got == expected and again.size == expected[0]
    assert capped.tolist() == list(range(5))
    streamed = _stream(worker_addresses[0], [("generate", _seeded(60, seeds[1]), True)],
                       expected[1] + 1)
    assert all(error is None for _, error in streamed)
    assert [_token(r) for r, _ in streamed] == [*range(expected[1]), None]


def test_aio_client_direct(worker_addresses: list[str]) -> None:
    async def run() -> list[int]:
        async with aioclient.InferenceServerClient(worker_addresses[0]) as client:
            inputs = []
            for name, value in (("PROMPT_TOKENS", 1), ("MAX_TOKENS", 3)):
                t = aioclient.InferInput(name, [1], "INT32")
                t.set_data_from_numpy(np.array([value], dtype=np.int32))
                inputs.append(t)
            result = await client.infer("generate_unary", inputs)
            return [int(v) for v in result.as_numpy("TOKENS")]

    assert asyncio.run(run()) == [0, 1, 2]


@pytest.mark.parametrize("empty_final", [False, True])
def test_generate_streams_tokens(worker_addresses: list[str], empty_final: bool) -> None:
    got = _stream(worker_addresses[0], [("generate", _inputs(8, 4), empty_final)],
                  5 if empty_final else 4)
    assert all(error is None for _, error in got)
    tokens = [_token(r) for r, _ in got]
    if empty_final:
        assert tokens == [0, 1, 2, 3, None]
        final = got[-1][0].get_response().parameters["triton_final_response"].bool_param
        assert final
    else:
        assert tokens == [0, 1, 2, 3]


def test_generate_runs_one_request_at_a_time(worker_addresses: list[str]) -> None:
    """A second request waits for the first, as on a busy GPU: no interleaved tokens."""
    got = _stream(worker_addresses[1], [("generate", _inputs(1, 20), True),
                                        ("generate", _inputs(1, 3), True)], 25)
    ids = [r.get_response().id for r, _ in got]
    assert ids == ["r0"] * 21 + ["r1"] * 4


def test_invalid_input_is_rejected_and_the_worker_keeps_serving(
        worker_addresses: list[str]) -> None:
    address = worker_addresses[0]
    with grpcclient.InferenceServerClient(address) as client:
        with pytest.raises(InferenceServerException) as info:
            client.infer("generate_unary", _inputs(1, -5))
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "MAX_TOKENS" in info.value.message()
        wrong = grpcclient.InferInput("PROMPT_TOKENS", [1], "FP32")
        wrong.set_data_from_numpy(np.array([1], dtype=np.float32))
        with pytest.raises(InferenceServerException) as info:
            client.infer("generate_unary", [wrong, _inputs(1, 1)[1]])
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "data-type is 'FP32'" in info.value.message()
    ((_, error),) = _stream(address, [("generate", _inputs(1, 100_001), False)], 1)
    assert "MAX_TOKENS must be between 0 and 100000" in str(error)
    got = _stream(address, [("generate", _inputs(1, 2), False)], 2)
    assert [_token(r) for r, _ in got] == [0, 1]


def test_decoupled_failure_mid_generation_is_final(worker_addresses: list[str]) -> None:
    """Pinned Triton behaviour the router's accounting relies on: a model's error after
    some tokens arrives once, carrying triton_final_response=true, and nothing follows."""
    got = _stream(worker_addresses[2], [("generate", _inputs(1, 10, fail_after=2), True),
                                        ("generate", _inputs(1, 1), True)], 5)
    first = [(r, e) for r, e in got if (r is not None and r.get_response().id == "r0")
             or e is not None]
    assert [_token(r) for r, e in first if e is None] == [0, 1]
    errors = [e for _, e in got if e is not None]
    assert len(errors) == 1 and "generation failed after 2 tokens" in str(errors[0])
    second = [_token(r) for r, e in got if e is None and r.get_response().id == "r1"]
    assert second == [0, None]


def test_stream_unknown_model_is_an_in_stream_error(worker_addresses: list[str]) -> None:
    got = _stream(worker_addresses[0], [("no_such_model", _inputs(1, 1), False),
                                        ("generate", _inputs(1, 1), False)], 2)
    assert "Request for unknown model: 'no_such_model' is not found" in str(got[0][1])
    assert got[1][1] is None and _token(got[1][0]) == 0  # the stream stays open


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _group_members(pgid: int) -> list[int]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def _shm_regions(prefix: str) -> set[str]:
    return {p.name for p in Path("/dev/shm").glob(f"{prefix}*")}


def test_each_worker_names_its_shared_memory_regions(worker_pool: WorkerPool) -> None:
    """Each worker's Python backend gets a prefix of its own (Triton names the regions
    ``<prefix><uuid>``): two workers on the default prefix collided and aborted."""
    prefixes = [w.shm_prefix for w in worker_pool.workers]
    assert len(set(prefixes)) == len(prefixes)
    for worker in worker_pool.workers:
        assert worker.pid is not None
        cmdline = Path(f"/proc/{worker.pid}/cmdline").read_bytes().split(b"\0")
        flag = f"--backend-config=python,shm-region-prefix-name={worker.shm_prefix}"
        assert flag.encode() in cmdline
        assert _shm_regions(worker.shm_prefix)  # one per model instance's stub


def test_sigkill_of_a_worker_removes_its_shared_memory(loop_thread: LoopThread) -> None:
    """A SIGKILLed Triton leaves its stubs' regions in /dev/shm (hundreds of MB after large
    requests): the pool removes them, and kills the stubs, before it reports the exit."""
    pool = start_pool(loop_thread, 1)
    try:
        worker = pool.workers[0]
        assert worker.pid is not None
        group = {pid: "member" for pid in _group_members(worker.pid)}
        before = _shm_regions(worker.shm_prefix)
        os.kill(worker.pid, signal.SIGKILL)
        loop_thread.run(asyncio.wait_for(pool.exits.get(), 30))
        after = _shm_regions(worker.shm_prefix)
        wait_gone(group)  # the stubs too, though the pool is still running
    finally:
        loop_thread.run(pool.stop(grace=5.0), timeout=60)
    assert len(group) > 1 and before and after == set()


def test_sigkill_is_noticed_restarted_and_shutdown_leaves_nothing(
        loop_thread: LoopThread) -> None:
    exits: list[tuple[int, int]] = []

    async def scenario() -> tuple[list[int], list[int], int, int]:
        pool = WorkerPool(1, restart=True, on_exit=lambda w, code: exits.append((w.index, code)))
        await pool.start()
        worker = pool.workers[0]
        first_pid = worker.pid
        assert first_pid is not None
        stubs_before = _group_members(first_pid)
        regions_before = _shm_regions(worker.shm_prefix)
        assert regions_before
        os.kill(first_pid, signal.SIGKILL)
        exited, code = await asyncio.wait_for(pool.exits.get(), 30)
        index = exited.index
        # Restarted on the same ports, and ready again.
        deadline = time.monotonic() + 120
        while worker.pid == first_pid or worker.returncode is not None:
            assert time.monotonic() < deadline, "worker was not restarted"
            await asyncio.sleep(0.1)
        await worker._wait_ready(120)
        second_pid = worker.pid
        assert second_pid is not None
        groups = [first_pid, second_pid]
        # The restarted worker reuses the prefix; the dead one's regions are gone.
        regions_after = _shm_regions(worker.shm_prefix)
        assert regions_after and not regions_after & regions_before
        await pool.stop(grace=5.0)
        assert _shm_regions(worker.shm_prefix) == set()
        return groups, stubs_before, index, code

    groups, stubs_before, index, code = loop_thread.run(scenario(), timeout=300)
    assert (index, code) == (0, -signal.SIGKILL) and exits == [(0, -signal.SIGKILL)]
    assert len(stubs_before) > 1  # tritonserver and its Python backend stubs
    for pgid in groups:
        assert not _alive(pgid)
        assert _group_members(pgid) == []


def test_bad_repository_fails_with_the_log_tail(tmp_path: Path, loop_thread: LoopThread) -> None:
    broken = tmp_path / "repo" / "broken"
    (broken / "1").mkdir(parents=True)
    (broken / "config.pbtxt").write_text('backend: "python"\nthis is not protobuf text\n')

    async def start() -> None:
        async with WorkerPool(1, tmp_path / "repo", start_timeout=60):
            pass

    with pytest.raises(WorkerStartError) as info:
        loop_thread.run(start(), timeout=120)
    assert "last lines of" in str(info.value)
    assert info.value.index == 0 and info.value.log_path.is_file()
    assert info.value.summary.startswith("Triton worker 0 exited with code ")
    assert str(info.value.log_path) in info.value.summary


def test_first_start_moves_off_a_port_taken_meanwhile(loop_thread: LoopThread,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Free ports are picked before Triton binds them; another process can take one in
    between. The first start then picks other ports instead of failing the pool. (The
    first pick is rigged to a port this test holds; the rest is real.)"""
    import socket

    import tritonmesh.workers.launcher as launcher

    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = taken.getsockname()[1]
    real_free_ports = launcher.free_ports
    picks: list[list[int]] = []

    def rigged(n: int, host: str = "127.0.0.1") -> list[int]:
        ports = real_free_ports(n, host)
        if not picks:
            ports[0] = busy  # the gRPC port is taken before Triton binds it
        picks.append(ports)
        return ports

    monkeypatch.setattr(launcher, "free_ports", rigged)
    pool = WorkerPool(1)
    try:
        loop_thread.run(pool.start(), timeout=180)
        assert len(picks) == 2 and pool.workers[0].grpc_port == picks[1][0] != busy
        with grpcclient.InferenceServerClient(pool.addresses[0]) as client:
            assert client.is_server_ready()
    finally:
        loop_thread.run(pool.stop(grace=5.0), timeout=60)
        taken.close()
