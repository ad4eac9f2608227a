"""Autoscaling decisions: how many replicas a backend's load asks for, and when to act on it.

:class:`Autoscaler` is pure: fed the time, the load (queued plus in-flight calls) and the
current replica count, it answers the count to scale to, or ``None``. The backend's runtime
asks it every :data:`DECISION_PERIOD_S` of its clock (a timer), so tests drive it with the
fake clock.
"""

from __future__ import annotations

import math

from .config import AutoscalingConfig

DECISION_PERIOD_S = 1.0
"""How often a backend's load is looked at."""


class Autoscaler:
    """The replica count an :class:`AutoscalingConfig` asks for, with its delays.

    A wish to scale up (down) must hold at every decision for ``upscale_delay_s``
    (``downscale_delay_s``) before it is acted on; a decision that does not share it starts
    the wait again. When acting, the count moves to what the latest load asks for.
    """

    def __init__(self, config: AutoscalingConfig) -> None:
        self.config = config
        self._up_since: float | None = None
        self._down_since: float | None = None

    def wanted(self, ongoing: int) -> int:
        """The count ``ongoing`` calls ask for, within the bounds."""
        config = self.config
        raw = math.ceil(ongoing / config.target_ongoing_requests) if ongoing > 0 else 0
        return max(config.min_replicas, min(config.max_replicas, raw))

    def decide(self, now: float, ongoing: int, current: int) -> int | None:
        """The count to scale to now, or ``None`` to keep ``current``."""
        target = self.wanted(ongoing)
        if target > current:
            self._down_since = None
            self._up_since = now if self._up_since is None else self._up_since
            if now - self._up_since >= self.config.upscale_delay_s:
                self._up_since = None
                return target
        elif target < current:
            self._up_since = None
            self._down_since = now if self._down_since is None else self._down_since
            if now - self._down_since >= self.config.downscale_delay_s:
                self._down_since = None
                return target
        else:
            self._up_since = self._down_since = None
        return None
