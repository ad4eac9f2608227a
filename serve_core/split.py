"""Traffic-split math: validation, normalisation and the weighted draw (pure functions)."""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import math
from collections.abc import Container, Mapping
from typing import Any

from .errors import NotFoundError, ServeTypeError, ValidationError

WEIGHT_SUM_TOLERANCE = 1e-3
"""How far the weights may sum from 1.0 before ``split`` refuses them."""


@dataclasses.dataclass(frozen=True)
class Traffic:
    """An endpoint's normalised weights, in the order the user gave them."""

    backends: tuple[str, ...]
    weights: tuple[float, ...]
    cumulative: tuple[float, ...]

    @classmethod
    def of(cls, weights: Mapping[str, float]) -> Traffic:
        backends = tuple(weights)
        values = tuple(float(weights[b]) for b in backends)
        running, cumulative = 0.0, []
        for value in values:
            running += value
            cumulative.append(running)
        return cls(backends, values, tuple(cumulative))

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.backends, self.weights))

    def draw(self, u: float) -> str:
        """Pick a backend for a uniform number ``u`` in [0, 1)."""
        return draw(self.backends, self.cumulative, u)


def validate_weights(
    endpoint: str, weights: Any, registered: Container[str]
) -> dict[str, float]:
    """Check a traffic dict and return it normalised to sum exactly 1.

    ``registered`` is looked up, not copied (a dict or set: O(1) per backend named).

    Raises:
        ServeTypeError: not a dict, or a weight is not a number.
        NotFoundError: a backend is not registered.
        ValidationError: empty, negative or non-finite weights, or a sum not within
            ``WEIGHT_SUM_TOLERANCE`` of 1.
    """
    if not isinstance(weights, Mapping):
        raise ServeTypeError(f"traffic for endpoint {endpoint!r} must be a dict of tag -> weight")
    if not weights:
        raise ValidationError(f"traffic for endpoint {endpoint!r} names no backend")
    for tag, weight in weights.items():
        if tag not in registered:
            raise NotFoundError(f"backend {tag!r} is not registered")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ServeTypeError(f"weight of {tag!r} must be a number, got {weight!r}")
        if not math.isfinite(weight) or weight < 0:
            raise ValidationError(f"weight of {tag!r} must be a finite number >= 0, got {weight}")
    total = math.fsum(weights.values())
    if abs(total - 1.0) > WEIGHT_SUM_TOLERANCE:
        raise ValidationError(
            f"weights must sum to 1.0, got {total:g} for endpoint {endpoint!r}"
        )
    return {tag: float(weight) / total for tag, weight in weights.items()}


def draw(backends: tuple[str, ...], cumulative: tuple[float, ...], u: float) -> str:
    """Weighted choice by cumulative weights and bisection.

    Zero-weight backends are never chosen: bisect_right skips equal cumulative values.
    """
    index = bisect.bisect_right(cumulative, u * cumulative[-1])
    return backends[min(index, len(backends) - 1)]


def shard_draw(shard_key: str) -> float:
    """A stable number in [0, 1) for a shard key (the same in every process)."""
    digest = hashlib.blake2b(shard_key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64
