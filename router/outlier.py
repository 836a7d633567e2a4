"""Passive outlier detection: instances that fail requests leave the pick set for a while.

Least-outstanding routing has a known failure: an instance that fails fast looks
idle and attracts everything. So failures that say "this instance is broken"
(UNAVAILABLE, INTERNAL, a connection that cannot be made) count against it; after
``consecutive_failures`` in a row it is ejected for a back-off that doubles with each
ejection (capped), and at most ``max_ejected_fraction`` of a variant is ejected this
way. A connection that cannot be made is proof on its own and ejects at once,
without the cap: when every instance is down, requests get UNAVAILABLE immediately
instead of waiting on dead connections.

Ejection is this detector's own flag (``Instance.ejected``); the health checker's
``healthy`` is another, and the pick set needs both (Envoy's split). An ejected
instance returns after its back-off, on the next passing active health probe
(:meth:`OutlierDetector.probe_passed`, as Envoy's
``successful_active_health_check_uneject_host``): a restarting Triton accepts
connections before its models are ready. Its record
of ejections is forgotten once it has served successfully for ``max_ejection_s`` past
its last ejection, so one bad hour does not cost it the longest back-off forever.
"""

from __future__ import annotations

import logging
import re
import time
from typing import TYPE_CHECKING, Final

from tritonmesh.instance import InstanceState

if TYPE_CHECKING:
    from tritonmesh.instance import Instance

__all__ = ["INSTANCE_FAILURES", "OutlierDetector", "blames_instance"]

log = logging.getLogger("tritonmesh.outlier")

# gRPC status codes (by name) that blame the instance rather than the request, and the
# router's own PER_TRY_TIMEOUT: an attempt that outlived its variant's per_try_timeout_s.
INSTANCE_FAILURES: Final = frozenset({"UNAVAILABLE", "INTERNAL", "PER_TRY_TIMEOUT"})

# An error inside a stream carries Triton's message and no status code, so the instance is
# blamed by the message. Only wordings known to mean "this server is broken" are listed:
# Triton 2.51's Python backend, whose stub died, keeps reporting the model READY (so health
# checks pass) and answers each request at once with this, INTERNAL in ModelInfer.
_INSTANCE_FAILURE_MESSAGES: Final = (
    re.compile(r"Stub process '[^']*' is not healthy"),
)


def blames_instance(message: str) -> bool:
    """Whether an in-stream error message says the instance, not the request, failed."""
    return any(p.search(message) for p in _INSTANCE_FAILURE_MESSAGES)


class OutlierDetector:
    def __init__(self, *, consecutive_failures: int = 5, base_ejection_s: float = 1.0,
                 max_ejection_s: float = 30.0, max_ejected_fraction: float = 0.5):
        self.consecutive_failures = consecutive_failures
        self.base_ejection_s = base_ejection_s
        self.max_ejection_s = max_ejection_s
        self.max_ejected_fraction = max_ejected_fraction

    def success(self, instance: Instance) -> None:
        instance.failures = 0
        if instance.ejections and \
                time.monotonic() > instance.ejected_until + self.max_ejection_s:
            instance.ejections = 0

    def failure(self, instance: Instance, code_name: str) -> None:
        if code_name not in INSTANCE_FAILURES:
            instance.failures = 0
            return
        instance.failures += 1
        if instance.failures >= self.consecutive_failures and self._may_eject(instance):
            self.eject(instance, f"{instance.failures} consecutive {code_name} failures")

    def stream_error(self, instance: Instance, message: str) -> None:
        """A request inside a stream ended with an error: INTERNAL if its message blames
        the instance; otherwise the request's fault, which breaks a run of failures as
        any non-instance status does in ModelInfer."""
        self.failure(instance, "INTERNAL" if blames_instance(message) else "UNKNOWN")

    def connect_failure(self, instance: Instance) -> None:
        self.eject(instance, "connection failed")

    def probe_passed(self, instance: Instance) -> None:
        """An active health probe of ``instance`` passed: it returns once its back-off is
        over."""
        if instance.ejected and time.monotonic() >= instance.ejected_until:
            log.info("instance %s returns after its ejection", instance.address)
            instance.ejected = False
            instance.variant.sync(instance)

    def _may_eject(self, instance: Instance) -> bool:
        variant = instance.variant
        members = [i for i in variant.live_instances() if i.state is InstanceState.ACTIVE]
        ejected = sum(1 for i in members if i.ejected)
        return ejected + 1 <= self.max_ejected_fraction * len(members)

    def eject(self, instance: Instance, reason: str) -> None:
        if instance.ejected:
            return
        seconds = min(self.base_ejection_s * 2 ** instance.ejections, self.max_ejection_s)
        instance.ejections += 1
        instance.failures = 0
        instance.ejected_until = time.monotonic() + seconds
        log.warning("ejecting %s for %.1fs: %s", instance.address, seconds, reason)
        instance.ejected = True
        instance.variant.sync(instance)
