"""Tools from ``--tools``: plain Python functions (sync or ``async def``) with type hints and
a Google-style docstring, and their JSON schemas, made by the library the ecosystem uses for
this (``transformers.utils.get_json_schema``, what ``apply_chat_template(tools=[fn])`` does
itself), so the model sees the schema its chat template was trained to read::

    def multiply(a: int, b: int) -> int:
        \"\"\"Multiply two integers.

        Args:
            a: The first factor.
            b: The second factor.
        \"\"\"
        return a * b

``--tools mymodule:multiply,add`` imports them from the current directory or the Python
path (as ``--reward`` is); ``--tools calculator`` is a built-in (gspo.train.tools.builtin).
A function without a docstring, an ``Args:`` line per argument or a type hint per argument
is refused at start (ValueError: the function and the fix), not when the model calls it.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable

from gspo.train.rewards import import_user

BUILTIN = {"calculator": "gspo.train.tools.builtin:calculator"}
FIX = ("give every argument a type hint and write a Google-style docstring: a description, "
       "then 'Args:' with one 'name: description' line per argument (docs/tools.md)")  # fmt: skip


def load_tools(spec: str) -> dict[str, Callable]:
    """``{name: function}`` for ``--tools`` ``spec``: ``module:fn1,fn2`` or built-in names
    (``calculator``), comma-separated. ValueError for a module or function that is not
    there, a name given twice, or a function whose schema cannot be made (``tool_schema``)."""
    if ":" in spec:
        module, _, names = spec.partition(":")
        paths = [f"{module}:{name.strip()}" for name in names.split(",")]
    else:
        unknown = [n for n in spec.split(",") if n.strip() not in BUILTIN]
        if unknown:
            raise ValueError(f"--tools {spec!r}: {unknown[0]!r} is not a built-in tool "
                             f"({', '.join(BUILTIN)}); give your functions as "
                             "'module:fn1,fn2'")  # fmt: skip
        paths = [BUILTIN[n.strip()] for n in spec.split(",")]
    tools: dict[str, Callable] = {}
    for path in paths:
        fn = import_user("--tools", path)
        if not callable(fn) or isinstance(fn, type):
            module, _, name = path.partition(":")
            raise ValueError(f"--tools {spec!r}: module {module!r} has no function {name!r}")
        name = tool_schema(fn)["function"]["name"]
        if name in tools:
            raise ValueError(f"--tools {spec!r}: {name!r} is given twice")
        tools[name] = fn
    return tools


def tool_schema(fn: Callable) -> dict:
    """The JSON schema ``{"type": "function", "function": {name, description,
    parameters}}`` of ``fn`` (transformers.utils.get_json_schema); ValueError naming the
    function and the fix when its hints or docstring do not make one."""
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(fn)
    except Exception as err:  # noqa: BLE001 - transformers' parsing errors have no common base
        name = getattr(fn, "__qualname__", repr(fn))
        raise ValueError(f"tool {name}: no JSON schema ({' '.join(str(err).split())}); "
                         f"{FIX}") from None  # fmt: skip


def method_schema(cls: type, name: str) -> dict:
    """The schema of method ``name`` of ``cls`` as its instances' bound method would have
    (``self`` dropped), without making an instance: a TRL-shaped environment's tool."""
    method = getattr(cls, name)
    signature = inspect.signature(method)
    params = list(signature.parameters.values())[1:]  # without self
    try:
        hints = typing.get_type_hints(method)
    except Exception as err:  # noqa: BLE001 - an unresolvable annotation
        raise ValueError(f"tool {cls.__qualname__}.{name}: its type hints do not resolve "
                         f"({err}); {FIX}") from None  # fmt: skip

    def stub(*args, **kwargs):  # only its signature, hints and docstring are read
        raise NotImplementedError

    stub.__name__ = stub.__qualname__ = name
    stub.__doc__ = method.__doc__
    stub.__signature__ = signature.replace(parameters=params)
    stub.__annotations__ = {k: v for k, v in hints.items() if k != "self"}
    schema = tool_schema(stub)
    return schema
