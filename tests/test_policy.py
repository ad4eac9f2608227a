"""Routing policies as pure strategy objects."""

from __future__ import annotations

import random

import pytest

from serve_core.errors import NotFoundError, ServeTypeError, ValidationError
from serve_core.policy import Policy, PowerOfTwoPolicy, RoutePolicy
from serve_core.split import Traffic


def build(name: str, weights: dict[str, float], **kwargs: object) -> Policy:
    return RoutePolicy.resolve(name).build(Traffic.of(weights), random.Random(3), dict(kwargs))


def no_queues(tag: str) -> int:
    return 0


def test_round_robin_alternates_ignoring_weights() -> None:
    policy = build("RoundRobin", {"a": 0.9, "b": 0.1})
    assert [policy.choose(None, no_queues) for _ in range(6)] == ["a", "b"] * 3


def test_round_robin_state_is_per_instance() -> None:
    first = build("RoundRobin", {"a": 0.5, "b": 0.5})
    second = build("RoundRobin", {"a": 0.5, "b": 0.5})
    assert first.choose(None, no_queues) == "a"
    assert second.choose(None, no_queues) == "a"


def test_fixed_packing_gives_packs_in_turn() -> None:
    policy = build("FixedPacking", {"a": 0.5, "b": 0.5}, packing_num=4)
    assert [policy.choose(None, no_queues) for _ in range(10)] == ["a"] * 4 + ["b"] * 4 + ["a"] * 2


def test_fixed_packing_default_and_validation() -> None:
    policy = build("FixedPacking", {"a": 0.5, "b": 0.5})
    assert [policy.choose(None, no_queues) for _ in range(6)] == ["a"] * 3 + ["b"] * 3
    with pytest.raises(ValidationError):
        build("FixedPacking", {"a": 1.0}, packing_num=0)


def test_power_of_two_prefers_shorter_queue() -> None:
    lengths = {"a": 3, "b": 0}
    policy = build("PowerOfTwo", {"a": 0.5, "b": 0.5})
    assert [policy.choose(None, lengths.__getitem__) for _ in range(20)] == ["b"] * 20


def test_power_of_two_with_one_live_backend() -> None:
    policy = build("PowerOfTwo", {"a": 0.0, "b": 1.0})
    assert {policy.choose(None, no_queues) for _ in range(20)} == {"b"}


def test_random_follows_weights_and_shard_keys() -> None:
    policy = build("Random", {"a": 0.0, "b": 1.0})
    assert {policy.choose(None, no_queues) for _ in range(50)} == {"b"}
    policy = build("Random", {"a": 0.5, "b": 0.5})
    assert len({policy.choose("session-1", no_queues) for _ in range(50)}) == 1


def test_unknown_policy_kwargs_are_rejected() -> None:
    with pytest.raises(ServeTypeError, match="policy_kwargs"):
        build("RoundRobin", {"a": 1.0}, packing_num=2)


def test_register_custom_policy() -> None:
    class AlwaysLast(Policy):
        def choose(self, shard_key, queue_len):
            return self.traffic.backends[-1]

    spec = RoutePolicy.register("AlwaysLastForTest", AlwaysLast)
    try:
        assert RoutePolicy.resolve("AlwaysLastForTest") is spec
        assert "AlwaysLastForTest" in RoutePolicy.names()
        assert build("AlwaysLastForTest", {"a": 0.5, "b": 0.5}).choose(None, no_queues) == "b"
    finally:
        delattr(RoutePolicy, "AlwaysLastForTest")


def test_register_rejects_bad_input() -> None:
    with pytest.raises(ServeTypeError):
        RoutePolicy.register("NotAPolicy", dict)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        RoutePolicy.register("_private", PowerOfTwoPolicy)
    with pytest.raises(NotFoundError):
        RoutePolicy.resolve("Nope")
