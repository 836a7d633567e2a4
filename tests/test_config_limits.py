"""The limits block: defaults, and errors that name the key."""

from __future__ import annotations

from typing import Any

import pytest
from tritonmesh.config import ConfigError, LimitsConfig, parse_config
from tritonmesh.decoupled import version_key
from tritonmesh.server import server_options

VARIANTS = [{"name": "a", "instances": ["h:1"]}]


def test_defaults_and_values() -> None:
    assert parse_config({"variants": VARIANTS}).limits == LimitsConfig()
    limits = parse_config({"variants": VARIANTS, "limits": {
        "max_message_bytes": 1024, "connection_idle_timeout_s": 0.5, "max_sequences": 7}}).limits
    assert (limits.max_message_bytes, limits.connection_idle_timeout_s, limits.max_sequences) \
        == (1024, 0.5, 7)
    options = dict(server_options(limits))
    assert options["grpc.max_receive_message_length"] == 1024
    assert options["grpc.max_connection_idle_ms"] == 500
    assert "grpc.max_connection_age_ms" not in options  # 0: no limit


@pytest.mark.parametrize(("limits", "message"), [
    ({"max_message_bytes": 0}, "limits.max_message_bytes: must be at least 1"),
    ({"max_message_bytes": 2**31}, "limits.max_message_bytes: gRPC's largest"),
    ({"max_sequences": "many"}, "limits.max_sequences: expected an integer"),
    ({"sequence_idle_timeout_s": 0}, "limits.sequence_idle_timeout_s: must be a positive"),
    ({"connection_idle_timeout_s": -1}, "limits.connection_idle_timeout_s: must be a finite"),
    ({"max_streams": 3}, "limits.max_streams: unknown key"),
    ([], "limits: expected a mapping"),
])
def test_errors_name_the_key(limits: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"variants": VARIANTS, "limits": limits})


@pytest.mark.parametrize(("version", "key"), [
    ("", -1), ("1", 1), ("0001", 1), ("0" * 100_000 + "7", 7), ("0", 0),
    ("abc", None), ("+1", None), (" 1", None), ("1abc", None), ("-1", None),
    (str(2**63 - 1), 2**63 - 1), (str(2**63), None), ("9" * 30, None), ("\u0661", None),
])
def test_versions_are_keyed_as_triton_reads_them(version: str, key: int | None) -> None:
    """None: not remembered (asked of Triton each time; Triton 2.51 serves "+1", " 1" and
    "1abc" as version 1 too, which the cache leaves to Triton rather than guess)."""
    assert version_key(version) == key
