"""What the native engine reads of a request's HEADERS for the policy (``Stream.path``,
``grpc``, ``timeout``, ``encoded``, ``policy_values``, ``metadata``, ``illegal``), as the
headers come, against a reference in Python of how the policy read them itself: the same
answers, whatever the headers."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import h2.config
import h2.connection
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tritonmesh.native_config import native_available
from tritonmesh.native_infer import HOP_BY_HOP, POLICY_KEYS

pytestmark = pytest.mark.skipif(not native_available(), reason=(
    "the native data path's extension (tritonmesh._core._h2) is not built here"))

_UNITS = {ord("H"): 3600.0, ord("M"): 60.0, ord("S"): 1.0, ord("m"): 1e-3, ord("u"): 1e-6,
          ord("n"): 1e-9}
# grpc-core's legal header key, and legal value for keys not ending -bin.
_LEGAL_KEY = re.compile(rb"[0-9a-z_.\-]+")
_LEGAL_VALUE = re.compile(rb"[\x20-\x7e]*")


def _timeout(value: bytes) -> float | None:
    if not 2 <= len(value) <= 9 or not value[:-1].isdigit() or value[-1] not in _UNITS:
        return None
    return int(value[:-1]) * _UNITS[value[-1]]


def reference(headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    """The policy's reading, one scan in Python: the last :path, content-type and valid
    grpc-timeout, whether any grpc-timeout is malformed, the first grpc-encoding, the last
    value of each policy key, the metadata to forward and the first of it grpc-core
    refuses."""
    path = content_type = timeout = encoding = illegal = None
    malformed = False
    values: dict[bytes, bytes] = {}
    metadata: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        if name == b":path":
            path = value
        elif name == b"content-type":
            content_type = value
        elif name == b"grpc-timeout":
            seconds = _timeout(value)
            malformed = malformed or seconds is None
            timeout = timeout if seconds is None else seconds
        elif name == b"grpc-encoding" and encoding is None:
            encoding = value
        if name in POLICY_KEYS:
            values[name] = value
        elif not name.startswith(b":") and name not in HOP_BY_HOP:
            if illegal is None:
                if _LEGAL_KEY.fullmatch(name) is None:
                    illegal = (name, False)
                elif not name.endswith(b"-bin") and _LEGAL_VALUE.fullmatch(value) is None:
                    illegal = (name, True)
            metadata.append((name, value))
    return {"path": path,
            "grpc": content_type is not None and content_type.startswith(b"application/grpc"),
            "timeout": None if malformed else -1.0 if timeout is None else timeout,
            "malformed": malformed, "encoded": encoding not in (None, b"identity"),
            "policy_values": values or None, "metadata": metadata or None, "illegal": illegal}


def engine(headers: list[tuple[bytes, bytes]]) -> dict[str, Any] | None:
    """The engine's reading of a request with ``headers`` (after :method, :scheme and
    :authority), sent by a real HTTP/2 client; None when it took no request."""
    from tritonmesh._core._h2 import H2Connection

    seen: list[dict[str, Any]] = []

    class Owner:
        def request(self, stream: Any, end_stream: bool) -> None:
            seen.append({
                "headers": list(stream.headers), "path": stream.path, "grpc": stream.grpc,
                "timeout": None if stream.timeout_malformed else stream.timeout,
                "malformed": stream.timeout_malformed, "encoded": stream.encoded,
                "policy_values": stream.policy_values, "metadata": stream.metadata,
                "illegal": None if stream.illegal is None
                else (stream.illegal, stream.illegal_value)})
            stream.finish(12, b"")

        def connection_lost(self, connection: Any) -> None:
            pass

    class Transport(asyncio.Transport):
        def write(self, data: Any) -> None:
            pass

        def is_closing(self) -> bool:
            return False

    async def run() -> None:
        client = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, validate_outbound_headers=False,
            normalize_outbound_headers=False, split_outbound_cookies=False))
        client.initiate_connection()
        client.send_headers(1, [(b":method", b"POST"), (b":scheme", b"http"),
                                (b":authority", b"a"), *headers])
        server = H2Connection(Owner(), True, policy_keys=POLICY_KEYS, hop_by_hop=HOP_BY_HOP)
        server.connection_made(Transport())
        server.data_received(client.data_to_send())
        await asyncio.sleep(0)
        server.connection_lost(None)

    asyncio.run(run())
    if not seen:
        return None
    reading = seen[0]
    assert reading.pop("headers")[3:] == headers
    return reading


NAMES = st.sampled_from([
    b":path", b"content-type", b"grpc-timeout", b"grpc-encoding", b"x-target-variant",
    b"x-tritonmesh-priority", b"x-tritonmesh-retry-on", b"te", b"user-agent",
    b"grpc-accept-encoding", b"authorization", b"x-trace-bin", b"X-Upper", b"bad key",
    b"a/b", b"-bin"]) | st.binary(min_size=1, max_size=6)
VALUES = st.sampled_from([
    b"application/grpc", b"application/grpc+proto", b"application/grp", b"text/plain",
    b"10m", b"0m", b"1H", b"99999999n", b"123456789S", b"12x", b"m", b"", b"identity",
    b"gzip", b"\x00\x7f\x80", b"ok value", b"/inference.GRPCInferenceService/ModelInfer",
    ]) | st.binary(max_size=10)


@settings(max_examples=300, deadline=None)
@given(headers=st.lists(st.tuples(NAMES, VALUES), max_size=12))
@example(headers=[(b":path", b"/p"), (b"content-type", b"application/grpc"),
                  (b"grpc-timeout", b"5S"), (b"grpc-timeout", b"7m"), (b"x-ok", b"v"),
                  (b"x-target-variant", b"a"), (b"x-target-variant", b"b"),
                  (b"Bad", b"v"), (b"x-ctl", b"\x01")])
@example(headers=[(b"grpc-timeout", b"1x"), (b"grpc-timeout", b"1S"),
                  (b"grpc-encoding", b"identity"), (b"grpc-encoding", b"gzip"),
                  (b"x-ctl", b"\x01"), (b"Bad", b"v")])
def test_the_engine_reads_headers_as_the_policy_did(headers: list[tuple[bytes, bytes]]
                                                    ) -> None:
    reading = engine(headers)
    if reading is not None:  # nghttp2 took the block (it refuses a few names outright)
        assert reading == reference(headers)


def test_well_formed_requests_are_read() -> None:
    """The differential test above compares readings, so also: requests are read at all."""
    headers = [(b":path", b"/p"), (b"content-type", b"application/grpc"),
               (b"grpc-timeout", b"250m"), (b"x-trace", b"t"), (b"te", b"trailers")]
    assert engine(headers) == {
        "path": b"/p", "grpc": True, "timeout": 0.25, "malformed": False, "encoded": False,
        "policy_values": None, "metadata": [(b"x-trace", b"t")], "illegal": None}
