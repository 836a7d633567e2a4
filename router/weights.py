"""Live weights and capacities (SageMaker's ``UpdateEndpointWeightsAndCapacities``).

:func:`update_weights` checks every entry first and then applies them all with no
``await`` in between, so no request is routed under half an update. A SIGHUP reload
sets each variant's weight and ``max_concurrency_per_instance`` back to what its file
says (:mod:`tritonmesh.reload`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from tritonmesh.balancer import Balancer, Variant

__all__ = ["WeightError", "WeightUpdate", "update_weights"]


@dataclass(frozen=True, slots=True)
class WeightUpdate:
    variant: str
    weight: float
    capacity: int | None = None  # max_concurrency_per_instance; None: unchanged


class WeightError(ValueError):
    """An update refused as a whole; ``code_name`` is the gRPC status to answer with."""

    def __init__(self, message: str, code_name: str = "INVALID_ARGUMENT"):
        super().__init__(message)
        self.code_name = code_name


def update_weights(balancer: Balancer, updates: Sequence[WeightUpdate]) -> list[Variant]:
    """Apply ``updates`` to ``balancer``'s variants, all or none; returns the variants
    changed. Raises :class:`WeightError` naming the first entry refused."""
    if not updates:
        raise WeightError("no variants given: name at least one variant and its weight")
    changed: dict[str, Variant] = {}
    for update in updates:
        variant = balancer.by_name.get(update.variant)
        if variant is None:
            names = ", ".join(sorted(balancer.by_name))
            raise WeightError(f"no variant '{update.variant}' (this endpoint has: {names}); "
                              "nothing was changed", "NOT_FOUND")
        if update.variant in changed:
            raise WeightError(f"variant '{update.variant}' is named twice; nothing was "
                              "changed")
        if not (math.isfinite(update.weight) and update.weight >= 0):
            raise WeightError(f"variant '{update.variant}': weight must be a finite number "
                              f">= 0, got {update.weight}; nothing was changed")
        if update.capacity is not None and update.capacity < 1:
            raise WeightError(f"variant '{update.variant}': max_concurrency_per_instance must "
                              f"be at least 1, got {update.capacity}; nothing was changed")
        changed[update.variant] = variant
    weights = {v.name: v.weight for v in balancer.variants}
    weights.update((u.variant, u.weight) for u in updates)
    if not any(weights.values()):
        raise WeightError("every variant's weight would be 0, and requests need a variant "
                          "to go to; nothing was changed")
    for update in updates:
        variant = changed[update.variant]
        variant.weight = update.weight
        if update.capacity is not None:
            variant.limit = update.capacity
            variant.dispatch()  # a higher limit frees capacity for waiting requests now
    return list(changed.values())
