"""Split math: validation, normalisation, the weighted draw and shard keys."""

from __future__ import annotations

import random

import pytest

from serve_core.errors import NotFoundError, ServeTypeError, ValidationError
from serve_core.split import WEIGHT_SUM_TOLERANCE, Traffic, shard_draw, validate_weights

DRAWS = 10_000


def frequencies(weights: dict[str, float], seed: int = 7) -> dict[str, float]:
    traffic = Traffic.of(weights)
    rng = random.Random(seed)
    counts = dict.fromkeys(weights, 0)
    for _ in range(DRAWS):
        counts[traffic.draw(rng.random())] += 1
    return {tag: count / DRAWS for tag, count in counts.items()}


@pytest.mark.parametrize(
    "weights",
    [
        {"a": 0.5, "b": 0.5},
        {"a": 0.7, "b": 0.3},
        {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4},
        {"a": 0.05, "b": 0.95},
    ],
)
def test_draw_frequencies_match_weights(weights: dict[str, float]) -> None:
    observed = frequencies(weights)
    for tag, weight in weights.items():
        # 10k draws: the standard error is <= 0.005, so 0.02 is four sigma.
        assert observed[tag] == pytest.approx(weight, abs=0.02), (tag, observed)


def test_zero_weight_is_never_drawn_and_weight_one_always() -> None:
    assert frequencies({"a": 0.0, "b": 1.0, "c": 0.0}) == {"a": 0.0, "b": 1.0, "c": 0.0}
    assert frequencies({"a": 1.0, "b": 0.0}) == {"a": 1.0, "b": 0.0}


def test_last_backend_does_not_always_win() -> None:
    # The original's weighted loop lacked a break and always picked the last backend.
    assert frequencies({"first": 0.9, "last": 0.1})["first"] > 0.85


def test_draw_edges() -> None:
    traffic = Traffic.of({"a": 0.5, "b": 0.5})
    assert traffic.draw(0.0) == "a"
    assert traffic.draw(0.999999) == "b"


def test_shard_key_is_stable_and_spreads() -> None:
    traffic = Traffic.of({"a": 0.5, "b": 0.5})
    assert {traffic.draw(shard_draw("user-42")) for _ in range(100)} == {traffic.draw(shard_draw("user-42"))}
    assert shard_draw("user-42") == shard_draw("user-42")
    chosen = {traffic.draw(shard_draw(f"user-{i}")) for i in range(200)}
    assert chosen == {"a", "b"}
    assert all(0.0 <= shard_draw(f"k{i}") < 1.0 for i in range(1000))


def test_validate_normalises_within_tolerance() -> None:
    weights = validate_weights("e", {"a": 0.5, "b": 0.5 - WEIGHT_SUM_TOLERANCE / 2}, ["a", "b"])
    assert sum(weights.values()) == pytest.approx(1.0, abs=1e-12)
    assert weights["a"] > weights["b"]


@pytest.mark.parametrize(
    ("weights", "error", "match"),
    [
        ({"a": 0.5, "b": 0.49}, ValidationError, "sum to 1.0, got 0.99"),
        ({"a": 1.5, "b": -0.5}, ValidationError, ">= 0"),
        ({"a": "1"}, ServeTypeError, "number"),
        ({"a": True}, ServeTypeError, "number"),
        ({"a": float("nan")}, ValidationError, "finite"),
        ({}, ValidationError, "names no backend"),
        ({"zzz": 1.0}, NotFoundError, "not registered"),
        ([("a", 1.0)], ServeTypeError, "dict"),
    ],
)
def test_validate_rejects(weights: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        validate_weights("e", weights, ["a", "b"])


def test_validation_errors_subclass_builtins() -> None:
    with pytest.raises(ValueError):
        validate_weights("e", {"a": 2.0}, ["a"])
    with pytest.raises(KeyError):
        validate_weights("e", {"x": 1.0}, ["a"])
    with pytest.raises(TypeError):
        validate_weights("e", None, ["a"])
