"""atheris over the native engine (``_core/_h2.pyx``): arbitrary bytes from a client into a
server-side ``H2Connection``, and from an upstream into the client-side one its requests
are relayed on (paired streams: forwarding, trailers, resets, closes, all in C).

Each input: its first byte says where it splits; the first part follows a valid client
preface and ModelInfer request (so the fuzzer starts past the preface), the second is what
the upstream answers. Whatever comes, the connections answer or close, never crash, and
hold no stream once lost. ``.ci/fuzz`` runs it against an AddressSanitizer build of ``_h2``
(``TRITONMESH_FUZZ_H2_C``: the .so to load instead of the tree's own), for a fixed number
of runs from a fixed seed::

    python tests/fuzz_h2.py -runs=20000 -seed=1 [libFuzzer options]

gcc's libasan leaves atheris without coverage of the extension, so this is mutation from
the seeds, not coverage-guided; ASan turns any read or write out of bounds into an abort.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load() -> Any:
    path = os.environ.get("TRITONMESH_FUZZ_H2_C")
    if path:  # before anything imports the tree's own build
        spec = importlib.util.spec_from_file_location("tritonmesh._core._h2", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["tritonmesh._core._h2"] = module
        spec.loader.exec_module(module)
    from tritonmesh._core import _h2

    return _h2


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    def write(self, data: Any) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


class _Relay:
    """The owner of both connections: every request is relayed to the upstream side."""

    def __init__(self) -> None:
        self.upstream: Any = None

    def request(self, stream: Any, end_stream: bool) -> None:
        if stream.headers and len(stream.headers) < 200 and not self.upstream.lost:
            try:
                self.upstream.open_stream(stream.headers, stream, None)
            except Exception as exc:  # H2Error: the engine refused it, as documented
                if type(exc).__name__ != "H2Error":
                    raise
                stream.reset()
        else:
            stream.finish(3, b"fuzzed")

    def message(self, stream: Any, compressed: int, message: bytes) -> None:
        stream.finish(3, b"fuzzed")

    def oversize(self, stream: Any, length: int) -> None:
        stream.finish(8, b"too large")

    def incomplete(self, stream: Any) -> None:
        stream.finish(13, b"incomplete")

    def connection_lost(self, connection: Any) -> None:
        pass


def _preface() -> bytes:
    import h2.config
    import h2.connection

    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":authority", "a"),
                            (":path", "/inference.GRPCInferenceService/ModelInfer"),
                            ("content-type", "application/grpc")])
    return client.data_to_send()


def _seeds() -> list[bytes]:
    frame = bytes.fromhex
    return [
        # request DATA (a whole message, END_STREAM) | response HEADERS-less SETTINGS
        b"\x10" + frame("00000a00010000000100000000050102030405")[:16]
        + frame("000000040000000000"),
        # a PING, a RST_STREAM, a GOAWAY from the client | a WINDOW_UPDATE upstream
        b"\x20" + frame("000008060000000000") + bytes(8) + frame("00000403000000000100000008")
        + frame("0000080700000000000000000100000000") + frame("000004080000000000000f0000"),
    ]


def check(data: bytes, _h2: Any, preface: bytes) -> None:
    split = 1 + data[0] if data else 1
    client_bytes, upstream_bytes = data[1:split], data[split:]

    async def run() -> None:
        owner = _Relay()
        server = _h2.H2Connection(owner, True, max_concurrent_streams=8, peek_budget=1 << 16,
                                  stream_reset_burst=4, stream_reset_rate=1)
        upstream = _h2.H2Connection(owner, False, stream_window=1 << 16)
        owner.upstream = upstream
        server_transport, upstream_transport = _Transport(), _Transport()
        server.connection_made(server_transport)
        upstream.connection_made(upstream_transport)
        payload = preface + client_bytes
        for i in range(0, len(payload), 13):  # in pieces, as TCP may deliver them
            if server_transport.closed:
                break
            server.data_received(payload[i:i + 13])
        for i in range(0, len(upstream_bytes), 11):
            if upstream_transport.closed:
                break
            upstream.data_received(upstream_bytes[i:i + 11])
        for stream in list(server.streams.values()):  # a peek or a call still waiting
            stream.finish(4, b"fuzz input ended")
        await asyncio.sleep(0)  # the deferred flush
        server.expire_peeks(float("inf"))
        upstream.connection_lost(None)
        server.connection_lost(None)
        assert server.open_streams == 0 and upstream.open_streams == 0

    asyncio.run(run())


def main() -> None:  # pragma: no cover (run by .ci/fuzz)
    import atheris

    _h2 = _load()
    preface = _preface()
    argv = list(sys.argv)
    corpora = [a for a in argv[1:] if not a.startswith("-")]
    if not corpora:
        corpora = [os.path.join(ROOT, "build", "fuzz", "h2-corpus")]
        argv += corpora
    os.makedirs(corpora[0], exist_ok=True)
    for i, seed in enumerate(_seeds()):
        with open(os.path.join(corpora[0], f"seed{i}"), "wb") as f:
            f.write(seed)
    atheris.Setup(argv, lambda data: check(data, _h2, preface))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
