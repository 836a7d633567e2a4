"""Start, supervise and stop real Triton Inference Server processes.

``WorkerPool`` is an async context manager: it starts N ``tritonserver`` processes on
free loopback ports, waits until each is ready (ServerReady and ModelReady for every
model of the repository), watches them, restarts those that die when asked to, and
stops them all on exit: SIGTERM to each process group, SIGKILL after a grace period.
Each worker runs in its own process group (its Python backend stubs with it), dies
with its parent (PR_SET_PDEATHSIG, set by util-linux's ``setpriv``), and an ``atexit``
hook kills any group still alive, so neither Ctrl-C, SIGTERM nor an exception leaves an
orphan behind. A parent killed outright (SIGKILL, the OOM killer) runs no ``atexit``,
and PDEATHSIG takes only tritonserver: Triton 2.51 leaves its Python backend stubs
running (they ignore SIGTERM, and hold their shared-memory regions). So each worker's
group also holds a guard, a ``sh`` (under ``setpriv --pdeathsig``) that sleeps until its
own PDEATHSIG arrives and then kills the whole group.

Each worker's Python backend names its shared-memory regions with a prefix of the
worker's own, and the launcher removes a worker's regions whenever that worker is gone:
stopped, dead, before a restart, and (through the guard) after the launcher itself was
killed (``tritonmesh.workers.groups``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
from tritonclient.grpc import service_pb2 as pb
from tritonmesh.signals import StopSignals
from tritonmesh.workers.child import Child, spawn
from tritonmesh.workers.groups import (
    GUARD_SCRIPT,
    LIVE_GROUPS,
    remove_shm_regions,
    setpriv_path,
    shm_prefix,
)
from tritonmesh.workers.tritonserver import default_model_repository, find_tritonserver
from tritonmesh.workers.upstream import method_path, name_override

__all__ = ["Probe", "TritonWorker", "WorkerPool", "WorkerStartError", "serve_workers"]

log = logging.getLogger("tritonmesh.workers")

class WorkerStartError(RuntimeError):
    """A worker did not become ready; the message ends with the tail of its log.

    :attr:`summary` says the same in one line: the worker, what happened, its log."""

    def __init__(self, index: int, reason: str, log_path: Path, log_tail: str):
        self.index = index
        self.reason = reason
        self.log_path = log_path
        super().__init__(f"Triton worker {index} {reason}; last lines of {log_path}:\n"
                         f"{log_tail}")

    @property
    def summary(self) -> str:
        return f"Triton worker {self.index} {self.reason} (its log: {self.log_path})"


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct free TCP ports on ``host`` (held open together so they differ)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def repository_models(repository: Path) -> list[str]:
    return sorted(p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file())


@dataclass(frozen=True)
class Probe:
    """How the readiness probe reaches a worker whose gRPC port demands TLS (started with
    ``--grpc-use-ssl`` among its ``extra_args``): its credentials, and the name to verify
    when the worker's certificate does not carry 127.0.0.1."""

    credentials: grpc.ChannelCredentials
    server_name: str | None = None


class TritonWorker:
    """One tritonserver process serving a model repository on loopback ports.

    ``extra_args`` go to tritonserver after tritonmesh's own (a later flag wins there).
    ``host``: the loopback address it binds (127.0.0.x stands in for other hosts)."""

    def __init__(self, index: int, model_repository: Path, log_path: Path, *,
                 extra_args: Sequence[str] = (), probe: Probe | None = None,
                 host: str = "127.0.0.1"):
        self.index = index
        self.host = host
        self.model_repository = model_repository
        self.log_path = log_path
        self.extra_args = tuple(extra_args)
        self.probe = probe
        self.grpc_port = self.http_port = self.metrics_port = 0
        self.process: Child | None = None
        self.guard: Child | None = None  # see GUARD_SCRIPT
        self.restarts = 0
        # Kept across restarts, so the guard and every cleanup know the regions' names.
        self.shm_prefix = shm_prefix()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.returncode

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    async def start(self, timeout: float = 120.0) -> None:
        """Start the process and wait until it and every model are ready.

        A first start picks free ports; if one is taken before Triton binds it (another
        process's ephemeral port, say), it picks new ones, up to three times. A restart
        keeps its ports: the router knows the worker by its address.
        """
        if self.grpc_port:
            await self._launch(timeout)
            return
        for attempt in range(3):
            self.grpc_port, self.http_port, self.metrics_port = free_ports(3, self.host)
            try:
                await self._launch(timeout)
                return
            except WorkerStartError:
                if attempt == 2 or "already in use" not in self.log_tail(5):
                    raise
                log.warning("Triton worker %d: a port was taken before it could bind; "
                            "trying other ports", self.index)

    async def _launch(self, timeout: float) -> None:
        install = find_tritonserver()
        setpriv = setpriv_path()
        args = [
            # PDEATHSIG set by setpriv, which then execs tritonserver (kept across the exec),
            # so the child runs no Python between fork and exec. With a preexec_fn Python
            # runs its at-fork hooks in the child: one such child aborted in gRPC's poller
            # before its exec ("epoll_wait error: Bad file descriptor", SIGABRT).
            *([setpriv, "--pdeathsig", "KILL"] if setpriv else []),
            str(install.binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={install.backend_dir}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            f"--http-address={self.host}", f"--http-port={self.http_port}",
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            "--model-control-mode=explicit", "--load-model=*",
            "--strict-readiness=true", "--exit-on-error=true", "--log-verbose=0",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            *self.extra_args,
        ]
        remove_shm_regions(self.shm_prefix)  # left by a previous run under this prefix
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as logfile:  # noqa: ASYNC230 (a local file, opened once)
            self.process = spawn(
                *args, stdin=subprocess.DEVNULL, stdout=logfile,
                stderr=subprocess.STDOUT, env=install.env,
                # A group of its own (away from the terminal's Ctrl-C), in this session so
                # that the guard can join it.
                process_group=0,
            )
        LIVE_GROUPS[self.process.pid] = self.shm_prefix
        await self._start_guard()
        await self._wait_ready(timeout)

    async def _start_guard(self) -> None:
        assert self.process is not None
        await self._reap_guard()
        setpriv = setpriv_path()
        if setpriv is None:
            return
        try:
            # No preexec_fn: joining the group is done by subprocess itself, safely.
            self.guard = spawn(
                setpriv, "--pdeathsig", "USR1", "/bin/sh", "-c", GUARD_SCRIPT, "guard",
                self.shm_prefix,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, process_group=self.process.pid)
        except (OSError, subprocess.SubprocessError) as exc:
            # tritonserver already gone (its group with it): the worker runs, only
            # without cover against a SIGKILL of this process.
            log.warning("Triton worker %d: no process-group guard (%s)", self.index, exc)

    async def _reap_guard(self) -> None:
        """Wait for the guard of an ended group (the group's SIGKILL ended it too)."""
        guard, self.guard = self.guard, None
        if guard is not None:
            with contextlib.suppress(ProcessLookupError):
                guard.kill()
            await guard.wait()

    async def _wait_ready(self, timeout: float) -> None:
        models = repository_models(self.model_repository)
        deadline = time.monotonic() + timeout
        probe = self.probe
        if probe is None:
            opened = grpc.aio.insecure_channel(self.address)
        else:
            opened = grpc.aio.secure_channel(self.address, probe.credentials,
                                             options=name_override(probe.server_name))
        async with opened as channel:
            server_ready = channel.unary_unary(
                method_path("ServerReady"),
                request_serializer=pb.ServerReadyRequest.SerializeToString,
                response_deserializer=pb.ServerReadyResponse.FromString)
            model_ready = channel.unary_unary(
                method_path("ModelReady"),
                request_serializer=pb.ModelReadyRequest.SerializeToString,
                response_deserializer=pb.ModelReadyResponse.FromString)
            while True:
                if self.returncode is not None:
                    raise WorkerStartError(
                        self.index, f"exited with code {self.returncode} while starting",
                        self.log_path, self.log_tail())
                try:
                    if (await server_ready(pb.ServerReadyRequest(), timeout=1)).ready and all(
                        [(await model_ready(pb.ModelReadyRequest(name=m), timeout=1)).ready
                         for m in models]
                    ):
                        return
                except grpc.aio.AioRpcError:
                    pass
                if time.monotonic() > deadline:
                    await self.stop(grace=1.0)
                    raise WorkerStartError(
                        self.index, f"was not ready after {timeout:.0f}s", self.log_path,
                        self.log_tail())
                await asyncio.sleep(0.1)

    async def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL it after ``grace`` seconds."""
        process = self.process
        if process is None:
            return
        pgid = process.pid
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), grace)
            except TimeoutError:
                log.warning("Triton worker %d ignored SIGTERM for %.0fs; killing it",
                            self.index, grace)
        # The stubs and the guard live in the same group; take down whatever is left of it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        await process.wait()
        await self._reap_guard()
        LIVE_GROUPS.pop(pgid, None)
        remove_shm_regions(self.shm_prefix)

    def kill_remains(self) -> None:
        """After tritonserver died: kill what is left of its group (the stubs ignore
        SIGTERM) and remove its shared-memory regions."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
        removed = remove_shm_regions(self.shm_prefix)
        if removed:
            log.info("Triton worker %d: removed its shared-memory regions %s", self.index,
                     ", ".join(removed))

    def __repr__(self) -> str:
        return f"<TritonWorker {self.index} {self.address} pid={self.pid}>"


class WorkerPool:
    """N local Triton workers: started together, supervised, stopped together.

    ``on_exit(worker, returncode)`` is called when a worker dies unexpectedly; with
    ``restart=True`` the worker is then started again on the same ports.
    ``extra_args`` and ``probe`` go to every worker (:class:`TritonWorker`, :class:`Probe`).
    """

    def __init__(self, count: int, model_repository: str | Path | None = None, *,
                 log_dir: str | Path | None = None, restart: bool = False,
                 start_timeout: float = 120.0,
                 on_exit: Callable[[TritonWorker, int], None] | None = None,
                 extra_args: Sequence[str] = (), probe: Probe | None = None):
        if count < 1:
            raise ValueError("a worker pool needs at least one worker")
        self.model_repository = Path(model_repository or default_model_repository()).resolve()
        if not repository_models(self.model_repository):
            raise ValueError(f"{self.model_repository} holds no model (no */config.pbtxt)")
        self._own_log_dir = log_dir is None
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="tritonmesh-workers-"))
        self.restart = restart
        self.start_timeout = start_timeout
        self.on_exit = on_exit
        self.workers = [
            TritonWorker(i, self.model_repository, self.log_dir / f"triton-{i}.log",
                         extra_args=extra_args, probe=probe)
            for i in range(count)
        ]
        self.exits: asyncio.Queue[tuple[TritonWorker, int]] = asyncio.Queue()
        self._watchers: list[asyncio.Task[None]] = []
        self._stopping = False

    @property
    def addresses(self) -> list[str]:
        return [w.address for w in self.workers]

    async def start(self) -> None:
        """Start every worker; the first that fails (or a cancellation) stops them all at
        once, rather than after the others' start timeouts."""
        loop = asyncio.get_running_loop()
        starts = [loop.create_task(w.start(self.start_timeout)) for w in self.workers]
        try:
            done, _ = await asyncio.wait(starts, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                failure = task.exception()
                if failure is not None:
                    raise failure
        except BaseException:
            for task in starts:
                task.cancel()
            await asyncio.gather(*starts, return_exceptions=True)
            await self.stop(grace=2.0)
            raise
        self._watchers = [loop.create_task(self._watch(w)) for w in self.workers]
        log.info("%d Triton workers ready: %s", len(self.workers), ", ".join(self.addresses))

    async def _watch(self, worker: TritonWorker) -> None:
        while not self._stopping:
            assert worker.process is not None
            code = await worker.process.wait()
            if self._stopping:
                return
            worker.kill_remains()
            LIVE_GROUPS.pop(worker.process.pid, None)
            log.error("Triton worker %d (%s) exited with code %d; last lines:\n%s",
                      worker.index, worker.address, code, worker.log_tail(10))
            self.exits.put_nowait((worker, code))
            if self.on_exit is not None:
                self.on_exit(worker, code)
            if not self.restart:
                return
            # A restart can fail too (Triton 2.51 has been seen to segfault while starting right
            # after a SIGKILL): keep trying, backing off, rather than leave the worker dead.
            backoff = 1.0
            while not self._stopping:
                worker.restarts += 1
                try:
                    await worker.start(self.start_timeout)
                except Exception:
                    log.exception("Triton worker %d could not be restarted; trying again in "
                                  "%.0fs", worker.index, backoff)
                    worker.kill_remains()
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 30.0)
                    continue
                log.info("Triton worker %d restarted on %s", worker.index, worker.address)
                break

    async def stop(self, grace: float = 10.0) -> None:
        self._stopping = True
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        await asyncio.gather(*(w.stop(grace) for w in self.workers))

    async def __aenter__(self) -> WorkerPool:
        await self.start()
        return self

    async def __aexit__(self, exc_type: object, *exc: object) -> None:
        await self.stop()
        # Logs of a temporary directory go with it, unless something went wrong.
        if self._own_log_dir and exc_type is None and self.exits.empty():
            shutil.rmtree(self.log_dir, ignore_errors=True)


async def serve_workers(count: int, model_repository: str | None, log_dir: str | None,
                        restart: bool) -> None:
    """``tritonmesh workers``: start the pool, print the addresses, run until SIGINT or
    SIGTERM (either one, while starting, stops the workers started so far and raises
    :class:`~tritonmesh.signals.Interrupted`)."""
    pool = WorkerPool(count, model_repository, log_dir=log_dir, restart=restart)
    print(f"starting {count} Triton workers (logs in {pool.log_dir})...", flush=True)
    with StopSignals() as signals:
        async with pool:
            signals.serving()
            print(f"{count} Triton workers ready (logs in {pool.log_dir}):", flush=True)
            for worker in pool.workers:
                print(f"  worker {worker.index}: grpc {worker.address}  "
                      f"http 127.0.0.1:{worker.http_port}  "
                      f"metrics 127.0.0.1:{worker.metrics_port}  pid {worker.pid}  "
                      f"shm {worker.shm_prefix}*", flush=True)
            print("Stop with Ctrl-C.", flush=True)
            await signals.stop.wait()
