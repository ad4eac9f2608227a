"""Code identity: any edit that changes what a backend does is seen, and never silently kept."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from serve_core import ConflictError, Serve
from serve_core.fingerprint import code_id
from serve_core.kv.memory import MemoryKVStore

from .conftest import WAIT

MakeServe = Callable[..., Serve]

MODULE = """
ANSWER = "hello"

def helper(name):
    return name.upper()

def other(name):
    return name.lower()

def backend(request=None, name="world", punctuation="!"):
    return ANSWER + " " + helper(name) + punctuation

def make(value):
    def closure(request=None):
        return value
    return closure

class Model:
    def __init__(self, size):
        self.size = size

    def __call__(self, request=None):
        return "model" * self.size
"""

EDITS = {
    "a changed constant": ('return ANSWER + " "', 'return ANSWER + ", "'),
    "a changed default": ('punctuation="!"', 'punctuation="?"'),
    "a changed called name": ("+ helper(name) +", "+ other(name) +"),
    "a changed helper it calls": ("return name.upper()", "return name.title()"),
    "a changed module constant it reads": ('ANSWER = "hello"', 'ANSWER = "hi"'),
}


def _load(source: str, tmp_path: Path, name: str = "edited") -> ModuleType:
    path = tmp_path / f"{name}_{abs(hash(source))}.py"
    path.write_text(textwrap.dedent(source))
    spec = importlib.util.spec_from_file_location("backends_under_edit", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_an_edit_changes_the_code_id(edit: str, tmp_path: Path) -> None:
    before, after = EDITS[edit]
    original = _load(MODULE, tmp_path)
    assert before in MODULE
    edited = _load(MODULE.replace(before, after), tmp_path)
    assert code_id(original.backend) != code_id(edited.backend)


def test_a_changed_closure_value_or_init_argument_changes_the_code_id(tmp_path: Path) -> None:
    module = _load(MODULE, tmp_path)
    assert code_id(module.make(1)) == code_id(module.make(1))
    assert code_id(module.make(1)) != code_id(module.make(2))
    assert code_id(module.Model, (1,)) != code_id(module.Model, (2,))


def test_the_same_code_has_the_same_id_in_another_process(tmp_path: Path) -> None:
    """Moved lines and comments aside, the id is a function of the code (not of memory or hash seeds)."""
    module = _load(MODULE, tmp_path)
    shifted = _load("# a comment and a blank line\n\n" + MODULE, tmp_path)
    assert code_id(shifted.backend) == code_id(module.backend)
    assert code_id(shifted.Model, (3,)) == code_id(module.Model, (3,))
    path = tmp_path / "again.py"
    path.write_text(textwrap.dedent(MODULE))
    script = (
        "import importlib.util, sys\n"
        "from serve_core.fingerprint import code_id\n"
        f"spec = importlib.util.spec_from_file_location('backends_under_edit', {str(path)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(code_id(m.backend), code_id(m.Model, (3,)), code_id(m.make({'b': {2, 1}})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=WAIT,
        env={"PYTHONHASHSEED": "123", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [
        code_id(module.backend), code_id(module.Model, (3,)), code_id(module.make({"b": {1, 2}}))
    ]


def test_an_edited_backend_under_its_tag_is_a_conflict_naming_the_store(
    make_serve: MakeServe, tmp_path: Path
) -> None:
    store = MemoryKVStore("registry")
    srv = make_serve(kv_store_connector=lambda ns: store, executor="inline")
    module = _load(MODULE, tmp_path)
    srv.create_backend(module.backend, "greet:v1")
    srv.create_backend(module.backend, "greet:v1")  # the same code: a no-op
    edited = _load(MODULE.replace('ANSWER = "hello"', 'ANSWER = "hi"'), tmp_path)
    with pytest.raises(ConflictError) as caught:
        srv.create_backend(edited.backend, "greet:v1")
    message = str(caught.value)
    assert "MemoryKVStore" in message and "'greet:v2'" in message and "replace=True" in message
    srv.create_endpoint("greet")
    srv.link("greet", "greet:v1")
    assert srv.get_handle("greet").remote().result(WAIT) == "hello WORLD!"  # the old code still serves


def test_replace_swaps_the_code_on_every_instance(make_serve: MakeServe, tmp_path: Path) -> None:
    from serve_core.testing import FakeClock

    store, clock = MemoryKVStore("registry"), FakeClock()
    one = make_serve(kv_store_connector=lambda ns: store, executor="inline", clock=clock)
    other = make_serve(kv_store_connector=lambda ns: store, executor="inline", clock=clock)
    module = _load(MODULE, tmp_path)
    one.create_endpoint("greet")
    one.create_backend(module.backend, "greet:v1")
    one.link("greet", "greet:v1")
    other.sync_registry()
    assert other.get_handle("greet").remote().result(WAIT) == "hello WORLD!"
    edited = _load(MODULE.replace('ANSWER = "hello"', 'ANSWER = "hi"'), tmp_path)
    one.create_backend(edited.backend, "greet:v1", replace=True)
    assert one.get_handle("greet").remote().result(WAIT) == "hi WORLD!"
    other.sync_registry()
    assert other.get_handle("greet").remote().result(WAIT) == "hi WORLD!"


def test_serve_core_run_reports_an_edited_backend_in_one_line(tmp_path: Path) -> None:
    app, store = tmp_path / "app.py", str(tmp_path / "s.db")
    source = "import serve_core as serve\nserve.create_backend(lambda request: {answer!r}, 'a:v1')\n"
    app.write_text(source.format(answer="first"))
    assert _serve_then_stop(app, store, tmp_path) == 0
    app.write_text(source.format(answer="edited"))
    done = subprocess.run(
        [sys.executable, "-m", "serve_core.cli", "run", str(app), "--port", "0", "--kv-store", store],
        capture_output=True, text=True, timeout=3 * WAIT, cwd=tmp_path, env=_env(),
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert "ConflictError" in lines[0] and store in lines[0] and "'a:v2'" in lines[0]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))


def _serve_then_stop(app: Path, store: str, cwd: Path) -> int:
    """``serve-core run`` until its banner, then SIGTERM; returns the exit code."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "serve_core.cli", "run", str(app), "--port", "0", "--kv-store", store],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=cwd, env=_env(),
    )
    assert proc.stdout is not None
    for line in proc.stdout:  # ends at the banner, or at EOF if the command died
        if "serving on" in line:
            break
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(WAIT)
    proc.stdout.close()
    return code


class _PlainStore:
    """A 0.8-style store without a signing key: records are not sealed, as on PostgreSQL without a secret."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def put(self, key: str, value: Any) -> None:
        self.data[key] = value

    def as_dict(self) -> dict[str, Any]:
        return dict(self.data)


def shout(request: object = None, name: str = "x") -> str:
    return name.upper()


def test_a_record_stored_before_code_ids_is_adopted_then_guarded(
    make_serve: MakeServe, monkeypatch: pytest.MonkeyPatch
) -> None:
    from .kv.backends import echo

    monkeypatch.delenv("SERVE_CORE_SECRET", raising=False)
    store = _PlainStore()
    first = make_serve(kv_store_connector=lambda ns: store, executor="inline", allow_unsigned_store=True)
    first.create_backend(echo, "b:v1")
    record = dict(store.data["backend/b:v1"])
    del record["code_id"], record["accepts_batch"]  # as an older serve_core wrote it
    store.data["backend/b:v1"] = record
    first.shutdown()
    srv = make_serve(kv_store_connector=lambda ns: store, executor="inline", allow_unsigned_store=True)
    assert srv.restored.backends == ["b:v1"]
    srv.create_backend(echo, "b:v1")  # the deployment file again: the id is recorded now
    assert store.data["backend/b:v1"]["code_id"] == code_id(echo)
    with pytest.raises(ConflictError):
        srv.create_backend(shout, "b:v1")


def test_state_a_module_keeps_changes_the_code_id_but_not_the_shape(tmp_path: Path) -> None:
    from serve_core.fingerprint import shape_id

    module = _load(MODULE, tmp_path)
    code, shape = code_id(module.backend), shape_id(module.backend)
    setattr(module, "ANSWER", "changed at run time")  # noqa: B010 - e.g. a cache or a model loaded lazily
    assert code_id(module.backend) != code and shape_id(module.backend) == shape
    edited = _load(MODULE.replace("+ helper(name) +", "+ other(name) +"), tmp_path)
    assert shape_id(edited.backend) != shape
