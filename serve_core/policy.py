"""Routing policies: which backend of an endpoint gets the next query.

A policy is a small strategy object built for one endpoint's current traffic
(a new one is built on every ``split``, so cycles restart as in the original).
It has one decision method, :meth:`Policy.choose`, and keeps its state on the instance.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from typing import Any, ClassVar

from .errors import NotFoundError, ServeTypeError, ValidationError
from .split import Traffic, shard_draw

QueueLength = Callable[[str], int]


class Policy:
    """Base class: subclass it and implement :meth:`choose` to add a policy."""

    def __init__(self, traffic: Traffic, rng: random.Random) -> None:
        self.traffic = traffic
        self.rng = rng

    def choose(self, shard_key: str | None, queue_len: QueueLength) -> str:
        """Return the backend tag for the next query."""
        raise NotImplementedError

    def _uniform(self, shard_key: str | None) -> float:
        return shard_draw(shard_key) if shard_key is not None else self.rng.random()


class RandomPolicy(Policy):
    """Independent weighted draw; a shard key always maps to the same backend."""

    def choose(self, shard_key: str | None, queue_len: QueueLength) -> str:
        backends = self.traffic.backends
        if len(backends) == 1:  # linked to one backend: no draw (nor a number taken from the rng)
            return backends[0]
        return self.traffic.draw(self._uniform(shard_key))


class RoundRobinPolicy(Policy):
    """Cycles through the backends in order, ignoring weights (as the original)."""

    def __init__(self, traffic: Traffic, rng: random.Random) -> None:
        super().__init__(traffic, rng)
        self._next = 0

    def choose(self, shard_key: str | None, queue_len: QueueLength) -> str:
        backends = self.traffic.backends
        tag = backends[self._next % len(backends)]
        self._next += 1
        return tag


class FixedPackingPolicy(Policy):
    """Gives ``packing_num`` consecutive queries to each backend in turn, ignoring weights."""

    def __init__(self, traffic: Traffic, rng: random.Random, packing_num: int = 3) -> None:
        super().__init__(traffic, rng)
        if isinstance(packing_num, bool) or not isinstance(packing_num, int) or packing_num < 1:
            raise ValidationError(f"packing_num must be an int >= 1, got {packing_num!r}")
        self.packing_num = packing_num
        self._count = 0

    def choose(self, shard_key: str | None, queue_len: QueueLength) -> str:
        backends = self.traffic.backends
        tag = backends[(self._count // self.packing_num) % len(backends)]
        self._count += 1
        return tag


class PowerOfTwoPolicy(Policy):
    """Draws two distinct backends by weight and takes the one with the shorter queue."""

    def choose(self, shard_key: str | None, queue_len: QueueLength) -> str:
        traffic = self.traffic
        candidates = [b for b, w in zip(traffic.backends, traffic.weights) if w > 0]
        if len(candidates) < 2:
            return candidates[0] if candidates else traffic.backends[0]
        first = traffic.draw(self._uniform(shard_key))
        rest = {b: w for b, w in zip(traffic.backends, traffic.weights) if w > 0 and b != first}
        second = Traffic.of(rest).draw(self.rng.random())
        return second if queue_len(second) < queue_len(first) else first


@dataclasses.dataclass(frozen=True)
class PolicySpec:
    """A registered policy: its name and the class that implements it."""

    name: str
    value: type[Policy]

    def build(self, traffic: Traffic, rng: random.Random, kwargs: dict[str, Any]) -> Policy:
        try:
            return self.value(traffic, rng, **kwargs)
        except TypeError as exc:
            raise ServeTypeError(f"policy {self.name} rejected policy_kwargs {kwargs}: {exc}") from exc


class RoutePolicy:
    """The registry of routing policies, used as ``init(queueing_policy=RoutePolicy.X)``.

    ``RoutePolicy.register("Name", MyPolicy)`` adds a policy (a :class:`Policy` subclass)
    that is then available as ``RoutePolicy.Name`` or by its name.
    """

    Random: ClassVar[PolicySpec] = PolicySpec("Random", RandomPolicy)
    RoundRobin: ClassVar[PolicySpec] = PolicySpec("RoundRobin", RoundRobinPolicy)
    PowerOfTwo: ClassVar[PolicySpec] = PolicySpec("PowerOfTwo", PowerOfTwoPolicy)
    FixedPacking: ClassVar[PolicySpec] = PolicySpec("FixedPacking", FixedPackingPolicy)

    @classmethod
    def register(cls, name: str, policy_cls: type[Policy]) -> PolicySpec:
        """Register a policy class under ``name`` and return its spec."""
        if not name.isidentifier() or name.startswith("_"):
            raise ValidationError(f"policy name must be a public identifier, got {name!r}")
        if not (isinstance(policy_cls, type) and issubclass(policy_cls, Policy)):
            raise ServeTypeError("a policy must be a subclass of serve_core.policy.Policy")
        if name in ("register", "resolve", "names"):
            raise ValidationError(f"{name!r} is reserved")
        spec = PolicySpec(name, policy_cls)
        setattr(cls, name, spec)
        return spec

    @classmethod
    def resolve(cls, policy: PolicySpec | str) -> PolicySpec:
        """Accept a spec or a registered name."""
        if isinstance(policy, PolicySpec):
            return policy
        spec = getattr(cls, policy, None) if isinstance(policy, str) else None
        if not isinstance(spec, PolicySpec):
            raise NotFoundError(f"unknown routing policy {policy!r}; known: {cls.names()}")
        return spec

    @classmethod
    def names(cls) -> list[str]:
        return [n for n, v in vars(cls).items() if isinstance(v, PolicySpec)]
