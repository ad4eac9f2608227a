"""Validated configuration objects: :class:`BackendConfig` and :class:`AutoscalingConfig`.

``BackendConfig`` is keyword-only and validated on construction *and* on attribute
assignment, because the original API edits a fetched config in place
(``cfg.num_replicas = 2; serve.set_backend_config(tag, cfg)``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from .errors import ServeTypeError, ValidationError

DEFAULT_MAX_QUEUE_SIZE = 10_000
"""Queries a backend queue holds before ``remote()`` raises ``BackPressureError``."""

# Fields that decide where a replica is placed: changing one replaces the replicas.
PLACEMENT_FIELDS = ("num_cpus", "num_gpus", "resources", "memory", "object_store_memory", "executor")


def _positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ServeTypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValidationError(f"{name} must be >= 1, got {value}")


def _non_negative_number(name: str, value: Any, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ServeTypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValidationError(f"{name} must be a finite number >= 0, got {value}")


def _resources(name: str, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise ServeTypeError(f"{name} must be a dict of resource name to amount")
    for key, amount in value.items():
        if not isinstance(key, str):
            raise ServeTypeError(f"{name} keys must be strings, got {key!r}")
        _non_negative_number(f"{name}[{key!r}]", amount, allow_none=False)


def _executor_name(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, str):
        raise ServeTypeError(f"{name} must be an executor name or None")


def _boolean(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ServeTypeError(f"{name} must be a bool, got {type(value).__name__}")


def _positive_number(name: str, value: Any) -> None:
    _non_negative_number(name, value, allow_none=False)
    if value == 0:
        raise ValidationError(f"{name} must be > 0, got {value}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AutoscalingConfig:
    """How many replicas a backend runs, chosen from its load (``BackendConfig(autoscaling=...)``).

    Every :data:`serve_core.autoscale.DECISION_PERIOD_S` the desired count is
    ``ceil((queued + in flight) / target_ongoing_requests)``, clamped to
    ``[min_replicas, max_replicas]``; the replica count changes to it only once it has
    wanted more for ``upscale_delay_s`` (or fewer for ``downscale_delay_s``) without a break.
    Removed replicas drain, as with ``num_replicas``. The defaults are Ray Serve's.

    Args:
        min_replicas: the fewest replicas (>= 1; the count it starts with).
        max_replicas: the most replicas (>= ``min_replicas``).
        target_ongoing_requests: calls queued or running per replica to aim for (> 0).
        upscale_delay_s, downscale_delay_s: how long the wish must hold before acting (>= 0).
    """

    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0

    def __post_init__(self) -> None:
        _positive_int("min_replicas", self.min_replicas)
        _positive_int("max_replicas", self.max_replicas)
        _positive_number("target_ongoing_requests", self.target_ongoing_requests)
        _non_negative_number("upscale_delay_s", self.upscale_delay_s, allow_none=False)
        _non_negative_number("downscale_delay_s", self.downscale_delay_s, allow_none=False)
        if self.max_replicas < self.min_replicas:
            raise ValidationError(
                f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AutoscalingConfig:
        unknown = set(data) - {field.name for field in dataclasses.fields(cls)}
        if unknown:
            raise ServeTypeError(f"unknown AutoscalingConfig fields: {sorted(unknown)}")
        return cls(**data)


def _autoscaling(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, AutoscalingConfig):
        raise ServeTypeError(f"{name} must be an AutoscalingConfig or None, got {type(value).__name__}")


_VALIDATORS: dict[str, Callable[[str, Any], None]] = {
    "num_replicas": _positive_int,
    "max_batch_size": lambda n, v: _positive_int(n, v, allow_none=True),
    "max_queue_size": _positive_int,
    "max_concurrent_queries": lambda n, v: _positive_int(n, v, allow_none=True),
    "batch_wait_timeout_s": lambda n, v: _non_negative_number(n, v, allow_none=False),
    "drop_expired": _boolean,
    "executor": _executor_name,
    "num_cpus": _non_negative_number,
    "num_gpus": _non_negative_number,
    "memory": _non_negative_number,
    "object_store_memory": _non_negative_number,
    "resources": _resources,
    "autoscaling": _autoscaling,
    "health_check_period_s": _positive_number,
    "health_check_timeout_s": _positive_number,
    "call_timeout_s": lambda n, v: None if v is None else _positive_number(n, v),
    "caller_runs": _boolean,
}

DEFAULT_HEALTH_CHECK_PERIOD_S = 10.0
DEFAULT_HEALTH_CHECK_TIMEOUT_S = 30.0


@dataclasses.dataclass(kw_only=True, eq=True)
class BackendConfig:
    """How a backend runs.

    Args:
        num_replicas: replicas to run (>= 1).
        max_batch_size: ``None`` for single calls, else the largest batch (>= 1);
            requires an ``@accept_batch`` target.
        batch_wait_timeout_s: how long a batch that is not full may wait to fill,
            counted from its oldest query's arrival (0: it leaves at once, the original's
            rule). It leaves earlier when waiting longer would make its tightest deadline
            miss, judged by the execution time observed for batches of its size.
        max_queue_size: bound of the backend queue; a full queue rejects new
            queries with ``BackPressureError``.
        max_concurrent_queries: calls a replica may hold at once; ``None`` takes the
            executor's default (1, the original's rule, on inline, thread and process; 32
            on Ray). 1 keeps every waiting query in the deadline-ordered queue. More hands
            a replica calls ahead while it runs the previous one (it still runs them one
            by one, in the order received).
        drop_expired: fail queries whose deadline passed with
            ``DeadlineExceededError`` instead of running them (the original ran them).
        executor: executor name for this backend; ``None`` uses the instance default.
        num_cpus, num_gpus, memory, object_store_memory, resources: placement
            hints for executors that place replicas (Ray).
        autoscaling: choose the replica count from the load (:class:`AutoscalingConfig`);
            exclusive with ``num_replicas`` (leave it at its default, 1).
        health_check_period_s: how often a class backend's ``check_health()`` runs on each
            replica (> 0).
        health_check_timeout_s: how long one check may take before the replica counts as
            unhealthy (> 0).
        call_timeout_s: how long one replica call may run (``None``: no limit); past it the
            call fails with ``DeadlineExceededError`` and its replica is replaced.
        caller_runs: a caller that blocks on the answer (an HTTP request's thread under a
            WSGI server) and finds a synchronous thread replica free runs the call itself,
            under that replica (still one call at a time), instead of handing it to the
            replica's thread (docs/executors.md, "Caller-runs"). ``False`` keeps every call
            on the replica's own thread (a backend with thread-bound state needs that). Off
            while ``call_timeout_s`` is set; a caller with a timeout runs calls only of a backend
            whose recent calls were short (:mod:`serve_core.callerruns`).
    """

    num_replicas: int = 1
    max_batch_size: int | None = None
    batch_wait_timeout_s: float = 0.0
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE
    max_concurrent_queries: int | None = None
    drop_expired: bool = False
    executor: str | None = None
    num_cpus: float | None = None
    num_gpus: float | None = None
    memory: float | None = None
    object_store_memory: float | None = None
    resources: dict[str, float] | None = None
    autoscaling: AutoscalingConfig | None = None
    health_check_period_s: float = DEFAULT_HEALTH_CHECK_PERIOD_S
    health_check_timeout_s: float = DEFAULT_HEALTH_CHECK_TIMEOUT_S
    call_timeout_s: float | None = None
    caller_runs: bool = True

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Validate what involves several fields (assignment checks each field alone).

        Raises:
            ValidationError: ``num_replicas`` set beside ``autoscaling``.
        """
        if self.autoscaling is not None and self.num_replicas != 1:
            raise ValidationError(
                f"num_replicas={self.num_replicas} and autoscaling are mutually exclusive: leave num_replicas "
                "at its default (the autoscaler chooses between min_replicas and max_replicas)"
            )

    @property
    def initial_replicas(self) -> int:
        """How many replicas to start with: ``num_replicas``, or the autoscaler's ``min_replicas``."""
        return self.num_replicas if self.autoscaling is None else self.autoscaling.min_replicas

    def __setattr__(self, name: str, value: Any) -> None:
        validator = _VALIDATORS.get(name)
        if validator is None:
            raise ServeTypeError(f"BackendConfig has no field {name!r}")
        validator(name, value)
        if name == "resources" and value is not None:
            value = dict(value)
        object.__setattr__(self, name, value)

    def copy(self, **changes: Any) -> BackendConfig:
        """Return a detached copy, optionally with some fields changed."""
        return BackendConfig.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """The JSON-safe form (used by stores and for comparison)."""
        data = dataclasses.asdict(self)
        if data["resources"] is not None:
            data["resources"] = dict(data["resources"])
        return data  # autoscaling: asdict made it a dict too

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BackendConfig:
        """Rebuild from :meth:`to_dict` output; unknown keys are a ``TypeError``."""
        unknown = set(data) - set(_VALIDATORS)
        if unknown:
            raise ServeTypeError(f"unknown BackendConfig fields: {sorted(unknown)}")
        autoscaling = data.get("autoscaling")
        if isinstance(autoscaling, dict):
            data = {**data, "autoscaling": AutoscalingConfig.from_dict(autoscaling)}
        return cls(**data)

    def placement(self) -> dict[str, Any]:
        """The fields that decide where a replica runs."""
        return {name: getattr(self, name) for name in PLACEMENT_FIELDS}
