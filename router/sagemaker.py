"""SageMaker's ``CreateEndpointConfig`` JSON, translated into tritonmesh's own keys."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tritonmesh.configvalues import ConfigError, _expect

__all__: list[str] = []


def _from_sagemaker(data: Mapping[str, Any], endpoint_keys: frozenset[str]) -> dict[str, Any]:
    """Translate ``CreateEndpointConfig`` JSON into tritonmesh's own keys."""
    variants = []
    pvs = _expect(data["ProductionVariants"], list, "ProductionVariants")
    for i, pv in enumerate(pvs):
        where = f"ProductionVariants[{i}]"
        _expect(pv, dict, where)
        if "VariantName" not in pv:
            raise ConfigError(f"{where}.VariantName: required")
        routing = pv.get("RoutingConfig", {})
        _expect(routing, dict, f"{where}.RoutingConfig")
        variant: dict[str, Any] = {
            "name": pv["VariantName"],
            "weight": pv.get("InitialVariantWeight", 1.0),
            "routing_strategy": routing.get("RoutingStrategy", "RANDOM"),
            "local_workers": pv.get("InitialInstanceCount", 1),
        }
        variants.append(variant)
    out: dict[str, Any] = {"variants": variants}
    # tritonmesh's own endpoint keys beside SageMaker's: a `tls` dropped here would serve
    # plaintext without a word.
    for key in endpoint_keys - {"endpoint", "variants"}:
        if key in data:
            out[key] = data[key]
    if "EndpointConfigName" in data:
        out["endpoint"] = data["EndpointConfigName"]
    return out
