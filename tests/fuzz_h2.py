"""atheris over the native engine (``_core/_h2.pyx``): arbitrary bytes from a client into a
server-side ``H2Connection``, and from an upstream into the client-side one its requests
are relayed on (paired streams: forwarding, trailers, resets, closes, all in C).

Each input: its first byte says where it splits; the first part follows a valid client
preface and ModelInfer request (so the fuzzer starts past the preface), the second is what
the upstream answers, each read as frames (``_frames``). Whatever comes, the connections
answer or close, never crash, and hold no stream once lost. ``.ci/fuzz`` runs it against
an AddressSanitizer build of ``_h2`` (``TRITONMESH_FUZZ_H2_C``: the .so to load instead of
the tree's own), for a fixed number of runs from a fixed seed::

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


_h2 = _load()  # before test_h2_fuzz imports the tree's own build

from test_h2_fuzz import Owner, Transport, _preface_and_request  # noqa: E402


class _Relay(Owner):
    """The owner of both connections: every request is relayed to the upstream side."""

    upstream: Any = None

    def request(self, stream: Any, end_stream: bool) -> None:
        if stream.headers and len(stream.headers) < 200 and not self.upstream.lost:
            try:
                self.upstream.open_stream(stream.headers, stream, None)
            except _h2.H2Error:  # the engine refused it, as documented
                stream.reset()
        else:
            stream.finish(3, b"fuzzed")


def _seeds() -> list[bytes]:
    """In ``check``'s encoding: a split byte, then 4-byte frame heads and their payloads."""
    request = bytes((0, 1, 1, 7)) + b"\0\0\0\0\x02ab"  # DATA, END_STREAM: a whole message
    ping, reset = bytes((6, 0, 0, 8)) + bytes(8), bytes((3, 0, 1, 4)) + b"\0\0\0\x08"
    settings, window = bytes((4, 0, 0, 0)), bytes((8, 0, 0, 4)) + b"\0\0\x0f\0"
    return [bytes((len(request),)) + request + settings + window,
            bytes((len(ping + reset),)) + ping + reset + window + bytes((7, 0, 0, 8)) + bytes(8)]


def _frames(data: bytes) -> bytes:
    """Bytes as HTTP/2 frames: each from a 4-byte head (type, flags, stream, payload length)
    and that many bytes, so that blind mutation still reaches past the frame layer."""
    out = bytearray()
    i = 0
    while i + 4 <= len(data):
        kind, flags, stream, length = data[i:i + 4]
        payload = data[i + 4:i + 4 + length]
        out += len(payload).to_bytes(3, "big") + bytes((kind % 11, flags))
        out += (stream % 8).to_bytes(4, "big") + payload
        i += 4 + length
    return bytes(out)


def check(data: bytes, preface: bytes) -> None:
    split = 1 + data[0] if data else 1
    client_bytes, upstream_bytes = _frames(data[1:split]), _frames(data[split:])

    async def run() -> None:
        owner = _Relay()
        server = _h2.H2Connection(owner, True, max_concurrent_streams=8, peek_budget=1 << 16,
                                  stream_reset_burst=4, stream_reset_rate=1)
        upstream = _h2.H2Connection(owner, False, stream_window=1 << 16)
        owner.upstream = upstream
        server_transport, upstream_transport = Transport(), Transport()
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

    preface = _preface_and_request()
    argv = list(sys.argv)
    corpora = [a for a in argv[1:] if not a.startswith("-")]
    if not corpora:
        corpora = [os.path.join(ROOT, "build", "fuzz", "h2-corpus")]
        argv += corpora
    os.makedirs(corpora[0], exist_ok=True)
    for i, seed in enumerate(_seeds()):
        with open(os.path.join(corpora[0], f"seed{i}"), "wb") as f:
            f.write(seed)
    atheris.Setup(argv, lambda data: check(data, preface))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
