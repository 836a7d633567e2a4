"""How long a request of a given cost takes on one instance: a line fitted to its recent ones.

Dispatch ahead (``dispatch_ahead_s``) sends the next waiting request to an instance shortly
before its running request ends, so the instance does not sit idle while the answer
travels to the router and the next request travels back. That needs a prediction of *when*
the running request ends, and the peak-EWMA speed of LEAST_OUTSTANDING_WORK is the wrong
tool for it: it is pessimistic on purpose (a slow sample replaces it at once), and it is a
ratio, seconds per unit, while a generation costs a fixed part (prefill, gRPC, the router)
plus a part per token. Off by a few percent on a 400 ms generation, the request handed ahead
would wait behind it, or the dispatch would come after the instance already freed.

So each instance keeps a least-squares line ``seconds = a + b * cost`` over its recent
successful requests (timed from when the router sent them), exponentially weighted
(``alpha`` per sample, a memory of about ``1 / alpha`` requests). Five running sums; an
update and a prediction are a few float operations, done in Python because they run once
per request on the release path, beside work that already costs microseconds.
"""

from __future__ import annotations

import math
from typing import Final

__all__ = ["ServiceTime"]

# Samples before a prediction is trusted.
MIN_SAMPLES: Final = 8


class ServiceTime:
    """An exponentially weighted least-squares fit of service seconds against cost."""

    __slots__ = ("_alpha", "_n", "_x", "_xx", "_xy", "_y", "samples")

    def __init__(self, alpha: float = 0.02):
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        self._alpha = alpha
        self._n = self._x = self._y = self._xx = self._xy = 0.0
        self.samples = 0

    def observe(self, cost: float, seconds: float) -> None:
        """One finished request: its cost and the seconds it took.

        A sample whose square overflows is ignored: costs come from clients, and one
        absurd value must not turn the sums into infinities for good.
        """
        if not (math.isfinite(cost * cost) and math.isfinite(cost * seconds)):
            return
        keep = 1.0 - self._alpha
        self._n = self._n * keep + 1.0
        self._x = self._x * keep + cost
        self._y = self._y * keep + seconds
        self._xx = self._xx * keep + cost * cost
        self._xy = self._xy * keep + cost * seconds
        self.samples += 1

    def predict(self, cost: float) -> float | None:
        """Expected seconds for a request of ``cost``; None before ``MIN_SAMPLES``, or for
        a cost no finite time can be predicted for."""
        if self.samples < MIN_SAMPLES or not math.isfinite(cost):
            return None
        n, x, y = self._n, self._x, self._y
        spread = n * self._xx - x * x
        if spread <= 1e-9 * n * self._xx:
            # Every recent request cost the same: no slope to fit. Scale the mean.
            return y / x * cost if x > 0.0 else y / n
        slope = (n * self._xy - x * y) / spread
        if slope < 0.0:  # noise on a flat line; a longer request is never expected faster
            return y / n
        return max(0.0, (y - slope * x) / n + slope * cost)
