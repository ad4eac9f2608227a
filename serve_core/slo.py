"""Service-level objectives: validating SLO arguments and turning them into deadlines.

``absolute_slo_ms`` is milliseconds since the Unix epoch (as in the original) and
``relative_slo_ms`` is added to the arrival time; both become one monotonic deadline.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .clock import Clock
from .errors import ValidationError
from .queues import NO_DEADLINE


def _milliseconds(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValidationError(f"{name} must be a number of milliseconds, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValidationError(f"{name} must be a number of milliseconds, got {value!r}") from None
    if not math.isfinite(number) or number < 0:
        raise ValidationError(f"{name} must be a finite number >= 0, got {value!r}")
    return number


@dataclasses.dataclass(frozen=True, slots=True)
class SLO:
    """A validated SLO: at most one of the two fields is set."""

    relative_ms: float | None = None
    absolute_ms: float | None = None

    @classmethod
    def parse(cls, relative_slo_ms: Any = None, absolute_slo_ms: Any = None) -> SLO:
        """Validate SLO arguments (strings are accepted, as from a query string).

        Raises:
            ValidationError: both given, negative, or not a number.
        """
        relative = _milliseconds("relative_slo_ms", relative_slo_ms)
        absolute = _milliseconds("absolute_slo_ms", absolute_slo_ms)
        if relative is not None and absolute is not None:
            raise ValidationError("give relative_slo_ms or absolute_slo_ms, not both")
        if relative is None and absolute is None:
            return NO_SLO  # one object: callers test ``slo is NO_SLO`` to skip the deadline math
        return cls(relative, absolute)

    def deadline(self, clock: Clock) -> float:
        """The monotonic deadline for a query arriving now."""
        if self.relative_ms is not None:
            return clock.monotonic() + self.relative_ms / 1000.0
        if self.absolute_ms is not None:
            return clock.monotonic() + (self.absolute_ms / 1000.0 - clock.wall())
        return NO_DEADLINE


NO_SLO = SLO()
"""No deadline: the SLO of handles and requests that name none."""
