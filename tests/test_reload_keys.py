"""Every configuration key is either applied by a reload or refused by name: none is
silently dropped (the reloads themselves run against real Triton in test_reload.py)."""

from __future__ import annotations

import dataclasses

from tritonmesh import reload
from tritonmesh.config import EndpointConfig, VariantConfig
from tritonmesh.reload import restart_keys


def test_every_key_is_applied_live_or_refused() -> None:
    endpoint = {f.name for f in dataclasses.fields(EndpointConfig)}
    assert endpoint == {*reload._AT_START, *reload._LIVE}
    variant = {f.name for f in dataclasses.fields(VariantConfig)}
    assert variant == {*reload._VARIANT_AT_START, *reload._VARIANT_LIVE}


def test_a_new_endpoint_name_is_refused_by_name() -> None:
    running = EndpointConfig(name="prod", variants=(VariantConfig("A"),))
    renamed = dataclasses.replace(running, name="staging")
    assert restart_keys(running, renamed) == ["endpoint"]
    weighted = dataclasses.replace(running, variants=(VariantConfig("A", weight=3.0),))
    assert restart_keys(running, weighted) == []
