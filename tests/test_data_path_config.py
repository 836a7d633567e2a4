"""The data path's keys: defaults, and errors that name the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tritonmesh.config import ConfigError, parse_config
from tritonmesh.native_config import native_available, parse_data_path

_VARIANT = {"name": "v", "instances": ["127.0.0.1:8001"]}


def test_defaults() -> None:
    config = parse_config({"variants": [_VARIANT]})
    assert config.limits.max_stream_requests_in_flight == 64
    assert config.limits.min_upstream_deadline_ms == 5.0
    assert config.limits.max_pending_calls == 10_000
    assert config.variants[0].per_try_timeout_s is None


def test_values_are_read() -> None:
    config = parse_config({"variants": [{**_VARIANT, "per_try_timeout_s": 0.5}],
                           "limits": {"max_stream_requests_in_flight": 8,
                                      "min_upstream_deadline_ms": 0, "max_pending_calls": 50}})
    assert config.variants[0].per_try_timeout_s == 0.5
    limits = config.limits
    assert (limits.max_stream_requests_in_flight, limits.min_upstream_deadline_ms,
            limits.max_pending_calls) == (8, 0.0, 50)


@pytest.mark.parametrize(("data", "message"), [
    ({"limits": {"max_stream_requests_in_flight": 0}},
     "limits.max_stream_requests_in_flight: must be at least 1"),
    ({"limits": {"max_stream_requests_in_flight": 1.5}},
     "limits.max_stream_requests_in_flight: expected an integer"),
    ({"limits": {"min_upstream_deadline_ms": -1}},
     "limits.min_upstream_deadline_ms: must be a finite number >= 0"),
    ({"limits": {"max_pending_calls": 0}}, "limits.max_pending_calls: must be at least 1"),
    ({"variants": [{**_VARIANT, "per_try_timeout_s": 0}]},
     "variants[0].per_try_timeout_s: must be a positive number"),
    ({"variants": [{**_VARIANT, "per_try_timeout_s": "1s"}]},
     "variants[0].per_try_timeout_s: expected an integer or a number"),
])
def test_bad_values_name_the_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config({"variants": [_VARIANT], **data})


def test_without_the_extension_native_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "native.yaml"
    config.write_text("data_path: native\nvariants:\n  - name: a\n"
                      "    instances: [127.0.0.1:8001]\n")
    env = {"TRITONMESH_NO_EXTENSIONS": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([str(Path(sys.executable).parent / "tritonmesh"), "serve",
                             "--config", str(config)], capture_output=True, text=True,
                            timeout=60, env=env)
    assert result.returncode == 2, result.stderr
    assert "data_path: native needs the tritonmesh._core._h2 extension" in result.stderr
    assert "libnghttp2-dev" in result.stderr


def test_data_path_key_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITONMESH_DATA_PATH", raising=False)
    variants = [{"name": "v", "instances": ["127.0.0.1:8001"]}]
    assert parse_config({"variants": variants}).data_path == "grpc"
    assert parse_config({"variants": variants, "data_path": "grpc"}).data_path == "grpc"
    with pytest.raises(ConfigError, match="data_path: native does not serve TLS yet"
                       if native_available() else "data_path: native needs"):
        parse_data_path("native", tls=True)
    with pytest.raises(ConfigError, match="data_path: must be one of grpc, native, got 'h3'"):
        parse_config({"variants": variants, "data_path": "h3"})
    if native_available():
        assert parse_config({"variants": variants, "data_path": "native"}).data_path == "native"
        monkeypatch.setenv("TRITONMESH_DATA_PATH", "native")
        assert parse_config({"variants": variants}).data_path == "native"
    monkeypatch.setenv("TRITONMESH_DATA_PATH", "quic")
    with pytest.raises(ConfigError, match="TRITONMESH_DATA_PATH: must be one of"):
        parse_config({"variants": variants})


def test_native_keys() -> None:
    variants = [{"name": "v", "instances": ["127.0.0.1:8001"]}]
    native = parse_config({"variants": variants}).native
    assert (native.stream_window_bytes, native.connection_window_bytes,
            native.max_header_list_bytes) == (1 << 20, 1 << 24, 1 << 16)
    native = parse_config({"variants": variants, "native": {"stream_window_bytes": 65535}}).native
    assert native.stream_window_bytes == 65535
    for data, message in (({"stream_window_bytes": 0}, "native.stream_window_bytes: must be at "
                           "least 1"),
                          ({"connection_window_bytes": 2**31}, "native.connection_window_bytes: "
                           "HTTP/2's largest window is 2147483647"),
                          ({"max_header_list_bytes": "64k"}, "native.max_header_list_bytes: "
                           "expected an integer"),
                          ({"window": 1}, "native.window")):
        with pytest.raises(ConfigError, match=message):
            parse_config({"variants": variants, "native": data})


def test_native_bounds_against_hostile_peers() -> None:
    variants = [{"name": "v", "instances": ["127.0.0.1:8001"]}]
    native = parse_config({"variants": variants}).native
    assert (native.connection_buffer_bytes, native.first_message_timeout_s,
            native.stream_reset_burst, native.stream_reset_rate,
            native.upstream_keepalive_time_s, native.upstream_keepalive_timeout_s) == (
        1 << 24, 30.0, 1000, 33, 300.0, 20.0)
    native = parse_config({"variants": variants, "native": {"first_message_timeout_s": 0}}).native
    assert native.first_message_timeout_s == 0.0
    for data, message in (({"first_message_timeout_s": -1}, "native.first_message_timeout_s: "
                           "must be a finite number >= 0"),
                          ({"stream_reset_rate": 0}, "native.stream_reset_rate: must be at "
                           "least 1"),
                          ({"connection_buffer_bytes": 1.5}, "native.connection_buffer_bytes: "
                           "expected an integer")):
        with pytest.raises(ConfigError, match=message):
            parse_config({"variants": variants, "native": data})
