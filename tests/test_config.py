"""BackendConfig validation."""

from __future__ import annotations

import logging

import pytest

from serve_core import BackendConfig
from serve_core.config import DEFAULT_MAX_QUEUE_SIZE
from serve_core.errors import ServeTypeError, ValidationError
from serve_core.executors.base import EXECUTORS, ExecutorEntry, create_executor


def test_defaults() -> None:
    config = BackendConfig()
    assert (config.num_replicas, config.max_batch_size, config.max_queue_size) == (1, None, DEFAULT_MAX_QUEUE_SIZE)
    assert config.drop_expired is False and config.executor is None
    assert config.max_concurrent_queries is None  # the executor's default


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"num_replicas": 0}, ValidationError),
        ({"num_replicas": None}, ServeTypeError),
        ({"num_replicas": 1.5}, ServeTypeError),
        ({"max_batch_size": 0}, ValidationError),
        ({"max_batch_size": True}, ServeTypeError),
        ({"max_queue_size": 0}, ValidationError),
        ({"max_concurrent_queries": 0}, ValidationError),
        ({"max_concurrent_queries": 2.0}, ServeTypeError),
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
        config.num_replica = 2


def test_assignment_is_validated() -> None:
    config = BackendConfig()
    config.num_replicas = 3
    assert config.num_replicas == 3
    with pytest.raises(ValueError):
        config.num_replicas = 0
    assert config.num_replicas == 3


def test_keyword_only() -> None:
    with pytest.raises(TypeError):
        BackendConfig(2)  # type: ignore[call-arg]


def test_copy_and_dict_round_trip() -> None:
    config = BackendConfig(num_replicas=2, resources={"x": 1})
    copy = config.copy(max_batch_size=4)
    assert copy.max_batch_size == 4 and config.max_batch_size is None
    copy.resources["x"] = 5  # type: ignore[index]
    assert config.resources == {"x": 1}
    assert BackendConfig.from_dict(config.to_dict()) == config
    with pytest.raises(TypeError):
        BackendConfig.from_dict({"bogus": 1})


# ------------------------------------------------------------ options other executors ignore
def test_ray_init_kwargs_on_another_default_executor_are_reported(make_serve, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="serve_core"):
        make_serve(executor="thread", ray_init_kwargs={"num_cpus": 1})
    assert "ray_init_kwargs are only used by the ray executor" in caplog.text


def test_placement_hints_on_an_executor_that_ignores_them_are_reported_once(make_serve, caplog) -> None:
    srv = make_serve(executor="thread")
    with caplog.at_level(logging.WARNING, logger="serve_core"):
        srv.create_backend(lambda: None, "b", backend_config=BackendConfig(num_gpus=1, resources={"tpu": 1}))
        srv.create_backend(lambda: None, "plain")
        config = srv.get_backend_config("b")
        config.num_replicas = 2  # starts one more replica: no second warning
        srv.set_backend_config("b", config)
    warnings = [r.getMessage() for r in caplog.records if "ignores them" in r.getMessage()]
    assert warnings == ["backend 'b': num_gpus=1, resources={'tpu': 1} only place replicas on the ray "
                        "executor; the 'thread' executor ignores them"]


class OptionProbe:
    """An executor that records the options it was built with."""

    name = "probe"
    places_replicas = False
    built: list[dict[str, object]] = []

    def __init__(self, **options: object) -> None:
        OptionProbe.built.append(options)

    def start_replica(self, spec: object) -> object:
        raise AssertionError("not started in this test")

    def shutdown(self) -> None:
        pass


def test_executors_built_by_name_get_only_the_options_they_take(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(EXECUTORS, "probe", ExecutorEntry(f"{__name__}:OptionProbe", ("ray_init_kwargs",)))
    monkeypatch.setitem(EXECUTORS, "bare-probe", ExecutorEntry(f"{__name__}:OptionProbe"))
    monkeypatch.setattr(OptionProbe, "built", [])
    options = {"ray_init_kwargs": {"num_cpus": 1}, "other": 1}
    create_executor("probe", options)
    create_executor("bare-probe", options)
    assert OptionProbe.built == [{"ray_init_kwargs": {"num_cpus": 1}}, {}]
