"""Code identity: a digest of what a backend does, so an edited definition is never taken for the old one.

:func:`code_id` walks a backend's function or class and its init arguments and hashes what
decides its behaviour, the same in every process and across restarts:

* a function: its name, bytecode, constants (nested functions' code included), the names
  it uses, its defaults, the values in its closure, its attributes (``@accept_batch``), and
  the module-level values it reads by name: plain data (numbers, strings, containers of
  them) by value, functions and classes of its own module by walking them in turn, anything
  imported from elsewhere by ``module:qualname``;
* a class: its name, bases, and every attribute it defines (methods walked as functions);
* init arguments: plain data by value.

Left out on purpose: line numbers, file names and docstrings (moving or documenting code
does not change it), and the state of other objects (an instance held in a global counts
by its type only; library code counts by its import path, not its source).

:func:`shape_id` is the same walk without the *values* of module globals and class
attributes (their types stay): state a module keeps at run time (a cache, a counter, a model
loaded lazily) changes ``code_id`` but not ``shape_id``, while any edit of the code does.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import types
from typing import Any

from .handle import ServeHandle

_DATA = (type(None), bool, int, float, complex, str, bytes)
_SKIPPED_CLASS_ATTRS = frozenset({"__dict__", "__weakref__", "__doc__", "__module__", "__qualname__"})
DIGEST_CHARS = 32


def code_id(target: Any, init_args: tuple[Any, ...] = ()) -> str:
    """The identity of a backend definition: equal for the same code and arguments, different
    after any edit of a constant, default, closure value or called name."""
    return _digest(target, init_args, values=True)


def shape_id(target: Any, init_args: tuple[Any, ...] = ()) -> str:
    """Like :func:`code_id`, but blind to the values module globals and class attributes hold now."""
    return _digest(target, init_args, values=False)


def _digest(target: Any, init_args: tuple[Any, ...], values: bool) -> str:
    walker = _Walker(getattr(target, "__module__", None), values)
    walker.feed(target)
    walker.feed(tuple(init_args))
    return walker.digest.hexdigest()[:DIGEST_CHARS]


class _Walker:
    def __init__(self, home: str | None, values: bool) -> None:
        self.home = home  # the target's module: its functions and classes are walked, not named
        self.values = values  # False: globals and class attributes that are data count by type
        self.digest = hashlib.sha256()
        self.seen: dict[int, int] = {}

    def feed_state(self, obj: Any) -> None:
        """A value a module or class holds (it may change at run time)."""
        if self.values or not isinstance(obj, (*_DATA, tuple, list, set, frozenset, dict)):
            self.feed(obj)
        else:
            self.emit("state", type(obj).__name__)

    def emit(self, *parts: object) -> None:
        for part in parts:
            self.digest.update(repr(part).encode("utf-8", "backslashreplace"))
            self.digest.update(b"\0")

    def feed(self, obj: Any) -> None:
        if isinstance(obj, _DATA):
            self.emit(type(obj).__name__, obj)
            return
        if id(obj) in self.seen:  # cycles: a method reading its own class, a recursive function
            self.emit("seen", self.seen[id(obj)])
            return
        self.seen[id(obj)] = len(self.seen)
        if isinstance(obj, (tuple, list)):
            self.emit(type(obj).__name__, len(obj))
            for item in obj:
                self.feed(item)
        elif isinstance(obj, (set, frozenset)):
            self.emit(type(obj).__name__, sorted(repr(item) for item in obj))
        elif isinstance(obj, dict):
            self.emit("dict", len(obj))
            for key in sorted(obj, key=repr):
                self.feed(key)
                self.feed(obj[key])
        elif isinstance(obj, types.CodeType):
            self._code(obj)
        elif isinstance(obj, types.FunctionType):
            self._function(obj)
        elif isinstance(obj, type):
            self._class(obj)
        else:
            self._other(obj)

    def _other(self, obj: Any) -> None:
        if isinstance(obj, types.ModuleType):
            self.emit("module", obj.__name__)
        elif isinstance(obj, (staticmethod, classmethod)):
            self.emit(type(obj).__name__)
            self.feed(obj.__func__)
        elif isinstance(obj, property):
            self.emit("property")
            for accessor in (obj.fget, obj.fset, obj.fdel):
                self.feed(accessor)
        elif isinstance(obj, functools.partial):
            self.emit("partial")
            self.feed(obj.func)
            self.feed(obj.args)
            self.feed(obj.keywords)
        elif isinstance(obj, enum.Enum):
            self.emit("enum", _name(type(obj)), obj.name)
        elif isinstance(obj, ServeHandle):  # what it calls, not which instance made it (ids change on restart)
            self.emit("handle", obj.endpoint_name, obj.method_name, obj.slo, obj.shard_key)
        elif hasattr(obj, "__module__") and hasattr(obj, "__qualname__"):  # builtins and the like
            self.emit("named", _name(obj))
        else:
            self.emit("instance", _name(type(obj)))

    def _code(self, code: types.CodeType) -> None:
        self.emit(
            "code",
            code.co_name,
            code.co_code,
            code.co_argcount,
            code.co_posonlyargcount,
            code.co_kwonlyargcount,
            code.co_flags,
            code.co_names,
            code.co_varnames,
            code.co_freevars,
            code.co_cellvars,
        )
        for const in code.co_consts:
            self.feed(const)

    def _function(self, func: types.FunctionType) -> None:
        if func.__module__ != self.home:
            self.emit("function", _name(func))
            return
        self.emit("function", func.__qualname__)
        self._code(func.__code__)
        self.feed(func.__defaults__)
        self.feed(func.__kwdefaults__)
        self.feed(dict(func.__dict__))
        for cell in func.__closure__ or ():
            try:
                self.feed(cell.cell_contents)
            except ValueError:  # an empty cell
                self.emit("empty cell")
        for name in sorted(_global_names(func.__code__)):
            if name in func.__globals__:
                self.emit("global", name)
                self.feed_state(func.__globals__[name])

    def _class(self, cls: type) -> None:
        if cls.__module__ != self.home:
            self.emit("class", _name(cls))
            return
        self.emit("class", cls.__qualname__, [_name(base) for base in cls.__bases__])
        for base in cls.__bases__:
            self.feed(base)
        for key in sorted(vars(cls)):
            if key not in _SKIPPED_CLASS_ATTRS:
                self.emit("attr", key)
                self.feed_state(vars(cls)[key])


def _global_names(code: types.CodeType) -> set[str]:
    """The names a code object (and the code nested in it) may read from its globals."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _name(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', type(obj).__qualname__)}"
