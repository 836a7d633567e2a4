"""The data path's keys: defaults, and errors that name the key."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from tritonmesh.config import ConfigError, parse_config
from tritonmesh.native_config import choose_data_path, native_available
from tritonmesh.tls import ServerTLS, UpstreamTLS

_VARIANT = {"name": "v", "instances": ["127.0.0.1:8001"]}


def test_defaults() -> None:
    config = parse_config({"variants": [_VARIANT]})
    assert config.limits.max_stream_requests_in_flight == 64
    assert config.limits.min_upstream_deadline_ms == 5.0
    assert config.limits.max_pending_calls == 10_000
    assert config.variants[0].per_try_timeout_s is None
    assert config.variants[0].absorbs and config.variants[0].absorb_timeout_s == 60.0


def test_values_are_read() -> None:
    config = parse_config({"variants": [{**_VARIANT, "per_try_timeout_s": 0.5,
                                         "upstream_cancellation": "Forward",
                                         "absorb_timeout_s": 5}],
                           "limits": {"max_stream_requests_in_flight": 8,
                                      "min_upstream_deadline_ms": 0, "max_pending_calls": 50}})
    assert config.variants[0].per_try_timeout_s == 0.5
    assert not config.variants[0].absorbs and config.variants[0].absorb_timeout_s == 5.0
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
    ({"variants": [{**_VARIANT, "upstream_cancellation": "drop"}]},
     "variants[0].upstream_cancellation: expected one of absorb, forward, got 'drop'"),
    ({"variants": [{**_VARIANT, "upstream_cancellation": True}]},
     "variants[0].upstream_cancellation: expected"),
    ({"variants": [{**_VARIANT, "absorb_timeout_s": 0}]},
     "variants[0].absorb_timeout_s: must be a positive number"),
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
    assert parse_config({"variants": variants}).data_path is None  # chosen at start
    config = parse_config({"variants": variants, "data_path": "grpc"})
    assert choose_data_path(config) == ("grpc", "data_path: grpc")
    with pytest.raises(ConfigError, match="data_path: must be one of grpc, native, got 'h3'"):
        parse_config({"variants": variants, "data_path": "h3"})
    if native_available():
        config = parse_config({"variants": variants, "data_path": "native"})
        assert choose_data_path(config) == ("native", "data_path: native")
        monkeypatch.setenv("TRITONMESH_DATA_PATH", "native")
        config = parse_config({"variants": variants})
        assert choose_data_path(config) == ("native", "TRITONMESH_DATA_PATH: native")
    monkeypatch.setenv("TRITONMESH_DATA_PATH", "grpc")
    assert choose_data_path(parse_config({"variants": variants})) == (
        "grpc", "TRITONMESH_DATA_PATH: grpc")
    # The key wins over the variable.
    config = parse_config({"variants": variants, "data_path": "grpc"})
    assert choose_data_path(config) == ("grpc", "data_path: grpc")
    monkeypatch.setenv("TRITONMESH_DATA_PATH", "quic")
    with pytest.raises(ConfigError, match="TRITONMESH_DATA_PATH: must be one of"):
        parse_config({"variants": variants})


_TLS = ServerTLS(b"a certificate", b"a key")  # the decision reads only whether tls is set


def test_the_default_is_native_where_it_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITONMESH_DATA_PATH", raising=False)
    config = parse_config({"variants": [_VARIANT]})
    if not native_available():
        assert choose_data_path(config) == (
            "grpc", "the default; native cannot serve here: the tritonmesh._core._h2 "
            "extension is not built")
        return
    assert choose_data_path(config) == ("native", "the default")
    # TLS on either side and several router processes are the native port's too.
    upstream_tls = replace(config, variants=(
        config.variants[0], replace(config.variants[0], name="w", upstream_tls=UpstreamTLS())))
    for served in (replace(config, tls=_TLS), replace(config, processes=2), upstream_tls):
        assert choose_data_path(served) == ("native", "the default")


def test_the_default_without_the_extension_is_grpc() -> None:
    code = ("from tritonmesh.config import parse_config\n"
            "from tritonmesh.native_config import choose_data_path\n"
            f"print(choose_data_path(parse_config({{'variants': [{_VARIANT!r}]}})))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, env={"TRITONMESH_NO_EXTENSIONS": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout == ("DataPath(path='grpc', why='the default; native cannot serve "
                             "here: the tritonmesh._core._h2 extension is not built')\n")


@pytest.mark.skipif(not native_available(), reason="without the extension every explicit "
                    "native is refused for that (test_without_the_extension_native_is_refused)")
@pytest.mark.parametrize("key", ["data_path", "TRITONMESH_DATA_PATH"])
def test_an_explicit_native_serves_tls_and_several_processes(
        key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITONMESH_DATA_PATH", raising=False)
    data: dict[str, Any] = {"variants": [_VARIANT]}
    if key == "data_path":
        data["data_path"] = "native"
    else:
        monkeypatch.setenv(key, "native")
    config = parse_config(data)
    for served in (replace(config, tls=_TLS), replace(config, processes=2),
                   parse_config({**data, "processes": 2}),
                   parse_config({**data, "variants": [{**_VARIANT, "upstream_tls": {}}]})):
        assert choose_data_path(served) == ("native", f"{key}: native")


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


@pytest.mark.skipif(os.environ.get("TRITONMESH_NO_EXTENSIONS", "") not in ("", "0"),
                    reason="TRITONMESH_NO_EXTENSIONS=1: no compiled code, grpc by design")
def test_the_compiled_pass_serves_native_where_libnghttp2_is() -> None:
    """Where libnghttp2's header is (as in CI), the extension is built and loads, so the
    compiled pass of the suite runs on the native data path, the default, and does not
    quietly fall back to grpc.aio."""
    if not Path("/usr/include/nghttp2/nghttp2.h").exists():
        pytest.skip("no /usr/include/nghttp2/nghttp2.h here: the extension may be absent")
    assert native_available(), "libnghttp2's header is here but tritonmesh._core._h2 is not"


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
