"""The module-level functions have the signatures of the ``Serve`` methods they forward to."""

from __future__ import annotations

import importlib.util
import inspect
import os
import pydoc
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

import serve_core as serve
from serve_core import Serve

from .conftest import require

FORWARDED = [
    "create_endpoint",
    "create_backend",
    "link",
    "split",
    "get_handle",
    "get_backend_config",
    "set_backend_config",
    "get_traffic_policy",
    "stat",
    "wsgi_app",
    "http_address",
]

# The directory holding the serve_core package. The editable install imports it through
# an import hook that mypy cannot follow, so the type check finds it through MYPYPATH.
PACKAGE_PARENT = Path(serve.__file__).resolve().parents[1]

USER_CODE = """\
import serve_core as serve

serve.init()
serve.create_endpoint("e", "/e")
serve.link("e", "b")
x: object = serve.get_handle("e").remote(x=1).result()
serve.shutdown()
"""


def _without_self(func: Any) -> inspect.Signature:
    signature = inspect.signature(func)
    parameters = list(signature.parameters.values())
    assert parameters[0].name == "self"
    return signature.replace(parameters=parameters[1:])


@pytest.mark.parametrize("name", FORWARDED)
def test_function_has_the_method_signature(name: str) -> None:
    function = getattr(serve, name)
    assert inspect.isfunction(function) and not hasattr(function, "__wrapped__")
    assert inspect.signature(function) == _without_self(getattr(Serve, name))


@pytest.mark.parametrize("name", FORWARDED)
def test_function_has_the_method_docstring(name: str) -> None:
    assert inspect.getdoc(getattr(serve, name)) == inspect.getdoc(getattr(Serve, name))


def test_init_has_the_constructor_signature() -> None:
    # A keyword added to Serve.__init__ and not to init (or a changed default) fails here.
    expected = _without_self(Serve.__init__).replace(return_annotation="Serve")
    assert inspect.signature(serve.init) == expected


@pytest.mark.parametrize("name", [*FORWARDED, "init"])
def test_help_does_not_show_self(name: str) -> None:
    function = getattr(serve, name)
    assert "self" not in str(inspect.signature(function))
    assert "self" not in pydoc.plain(pydoc.render_doc(function))


def test_init_warns_only_about_arguments_given() -> None:
    instance = serve.init(start_server=False, executor="inline", http_port=9000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert serve.init(start_server=False) is instance  # the defaults were not asked for
        assert serve.init(start_server=False, executor="inline", http_port=9000) is instance
    with pytest.warns(UserWarning, match=r"\['http_port'\]"):
        assert serve.init(start_server=False, http_port=9001) is instance


def test_user_code_passes_mypy_strict(tmp_path: Path) -> None:
    require(importlib.util.find_spec("mypy") is not None, "mypy is not installed")
    (tmp_path / "user.py").write_text(USER_CODE)
    command = [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--cache-dir", str(tmp_path / "cache")]
    # Silent imports check serve_core as an installed package would be: its own code is
    # type-checked by the project's configuration, not by the user's --strict.
    command += ["--follow-imports=silent", "user.py"]
    env = {**os.environ, "MYPYPATH": str(PACKAGE_PARENT)}
    out = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
