"""The data path's keys: defaults, and errors that name the key."""

from __future__ import annotations

from typing import Any

import pytest
from tritonmesh.config import ConfigError, parse_config

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
