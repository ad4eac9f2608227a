"""BackendConfig validation."""

from __future__ import annotations

import pytest

from serve_core import BackendConfig
from serve_core.config import DEFAULT_MAX_QUEUE_SIZE
from serve_core.errors import ServeTypeError, ValidationError


def test_defaults() -> None:
    config = BackendConfig()
    assert (config.num_replicas, config.max_batch_size, config.max_queue_size) == (1, None, DEFAULT_MAX_QUEUE_SIZE)
    assert config.drop_expired is False and config.executor is None


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"num_replicas": 0}, ValidationError),
        ({"num_replicas": None}, ServeTypeError),
        ({"num_replicas": 1.5}, ServeTypeError),
        ({"max_batch_size": 0}, ValidationError),
        ({"max_batch_size": True}, ServeTypeError),
        ({"max_queue_size": 0}, ValidationError),
        ({"num_cpus": -1}, ValidationError),
        ({"resources": {"gpu_kind": -1}}, ValidationError),
        ({"resources": ["x"]}, ServeTypeError),
        ({"drop_expired": "yes"}, ServeTypeError),
        ({"executor": 3}, ServeTypeError),
    ],
)
def test_invalid_values(kwargs: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        BackendConfig(**kwargs)  # type: ignore[arg-type]


def test_unknown_field_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        BackendConfig(num_replica=2)  # type: ignore[call-arg]
    config = BackendConfig()
    with pytest.raises(TypeError):
        config.num_replica = 2  # type: ignore[attr-defined]


def test_assignment_is_validated() -> None:
    config = BackendConfig()
    config.num_replicas = 3
    assert config.num_replicas == 3
    with pytest.raises(ValueError):
        config.num_replicas = 0
    assert config.num_replicas == 3


def test_keyword_only() -> None:
    with pytest.raises(TypeError):
        BackendConfig(2)  # type: ignore[misc]


def test_copy_and_dict_round_trip() -> None:
    config = BackendConfig(num_replicas=2, resources={"x": 1})
    copy = config.copy(max_batch_size=4)
    assert copy.max_batch_size == 4 and config.max_batch_size is None
    copy.resources["x"] = 5  # type: ignore[index]
    assert config.resources == {"x": 1}
    assert BackendConfig.from_dict(config.to_dict()) == config
    with pytest.raises(TypeError):
        BackendConfig.from_dict({"bogus": 1})
